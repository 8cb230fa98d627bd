"""`deadlock-agent diagnose`: one look at a gunicorn's workers, for a person at a terminal.

The agent's own pieces on a short window of `seconds`, without a running agent: procfs scans,
py-spy dumps, the Tracker's verdicts with the catalog (stuck = no progress for the whole
window), locks.prove on what procfs.read_lock_waits reads, and the versions of what each worker
maps (agent.versions). Rendering (text, JSON) and the exit code are pure functions of the
Diagnosis.
"""

from __future__ import annotations

import logging
import re
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import locks, procfs, versions
from agent.analysis import AnalysisSettings, Tracker
from agent.discovery import Discovery, is_gunicorn_cmdline
from agent.errors import (
    EXIT_DEADLOCKED,
    EXIT_OK,
    EXIT_SPINNING,
    EXIT_STUCK,
    AgentError,
    NativeUnwindFailed,
    NotGunicorn,
    ProcessVanished,
    PtraceDenied,
)
from agent.locks import LockProof
from agent.monitor import StackSource
from agent.render import TOP_FRAMES, top_frames
from agent.signatures import Catalog, load_catalog
from agent.types import ThreadReport, ThreadState, WorkerRef, WorkerReport, WorkerState
from agent.versions import Versions

log = logging.getLogger(__name__)

DEFAULT_SECONDS = 3.0
#: How often /proc is scanned within the window (a spin is a thread hot scan after scan).
SCAN_EVERY = 0.25
IDLE_FRAMES = 3  # an idle thread's top frames shown in text (JSON has TOP_FRAMES for all)

EXIT_OF_VERDICT = {
    WorkerState.OK: EXIT_OK,
    WorkerState.STUCK: EXIT_STUCK,
    WorkerState.DEADLOCKED: EXIT_DEADLOCKED,
    WorkerState.SPINNING: EXIT_SPINNING,
}
_SEVERITY = (WorkerState.OK, WorkerState.SPINNING, WorkerState.STUCK, WorkerState.DEADLOCKED)
# The worker class, from the main thread's frames (for the reader; analysis has its own).
_WORKER_CLASS = re.compile(r"gunicorn/workers/(\w+)\.py$")
_ASYNCIO = re.compile(r"(^|/)(uvicorn(_worker)?/_?workers|asyncio/base_events)\.py$")


@dataclass(frozen=True)
class WorkerDiagnosis:
    """One worker: the tracker's verdict, its lock graph, and what it runs."""

    report: WorkerReport
    worker_class: str | None
    proof: LockProof | None  # None: no thread in a mutex wait (or it could not be read)
    versions: Versions | None  # None: /proc/PID/maps could not be read


@dataclass(frozen=True)
class Diagnosis:
    """Everything one `diagnose` run found."""

    seconds: float
    masters: tuple[int, ...]
    workers: tuple[WorkerDiagnosis, ...]
    errors: tuple[str, ...] = ()  # workers that could not be looked at, one line each

    @property
    def verdict(self) -> WorkerState:
        """The gravest worker verdict (ok when there is none)."""
        states = [w.report.state for w in self.workers]
        return max(states, key=_SEVERITY.index, default=WorkerState.OK)


def exit_code(diagnosis: Diagnosis) -> int:
    """0 when every worker is ok, else the gravest verdict's code (EXIT_OF_VERDICT)."""
    return EXIT_OF_VERDICT[diagnosis.verdict]


def window_settings(seconds: float, *, native: bool = True) -> AnalysisSettings:
    """The agent's analysis scaled to one window: stuck after `seconds` without progress."""
    return AnalysisSettings(
        stuck_after=seconds,
        suspect_after=seconds / 2,
        native_gap=0.0,
        native=native,
        max_dumps_per_minute=1_000_000,  # diagnose dumps each worker a fixed three times
        interval=SCAN_EVERY,
    )


def find_workers(
    pid: int | None, *, proc: str = procfs.DEFAULT_PROC
) -> tuple[tuple[int, ...], tuple[WorkerRef, ...]]:
    """(masters, workers) for a master or worker pid, or found by command line when None."""
    if pid is None:
        masters, refs = Discovery().workers()
        if not refs:
            raise NotGunicorn("no gunicorn master with workers found by command line; pass a PID")
        return masters, refs
    cmdline, parent = procfs.read_cmdline(pid, proc=proc)
    if not is_gunicorn_cmdline(cmdline):
        shown = " ".join(cmdline)[:80] or "(no command line: a kernel thread or a zombie)"
        raise NotGunicorn(f"not a gunicorn master or worker: {shown}", pid=pid)
    masters, refs = Discovery(master_pid=pid).workers()
    if refs:
        return masters, refs
    try:
        parent_cmdline, _ = procfs.read_cmdline(parent, proc=proc)
    except ProcessVanished:
        parent_cmdline = ()
    if is_gunicorn_cmdline(parent_cmdline):
        masters, refs = Discovery(master_pid=parent).workers()
        mine = tuple(ref for ref in refs if ref.pid == pid)
        if mine:
            return masters, mine
    raise NotGunicorn("a gunicorn process with no workers and no gunicorn master", pid=pid)


class _Window:
    """The scans and dumps of one run, folded into one Tracker."""

    def __init__(
        self, tracker: Tracker, stacks: StackSource, proc: str, clock: Callable[[], float]
    ) -> None:
        self.tracker = tracker
        self.stacks = stacks
        self.proc = proc
        self.clock = clock
        self.scanner = procfs.Scanner(proc)
        self.errors: list[str] = []

    def gone(self, ref: WorkerRef, err: AgentError) -> None:
        self.errors.append(str(err))
        self.tracker.forget(ref)
        self.scanner.forget(ref)

    def scan(self, *, after_dump: WorkerRef | None = None) -> None:
        refs = [after_dump] if after_dump is not None else list(self.tracker.workers)
        for ref in refs:
            try:
                sample = self.scanner.scan(ref, now=self.clock())
            except ProcessVanished as err:
                self.gone(ref, err)
                continue
            self.tracker.observe_proc(sample, after_dump=after_dump is not None)

    def dump(self, *, native: bool) -> None:
        for ref in self.tracker.workers:
            kind = native and self.tracker.native_allowed(ref)
            try:
                try:
                    snapshot = self.stacks.dump(ref, native=kind)
                except NativeUnwindFailed:
                    if not kind:
                        raise
                    self.tracker.native_failed(ref)  # gevent: Python frames only
                    snapshot = self.stacks.dump(ref, native=False)
            except PtraceDenied:
                raise  # the person can fix it: say so, not half an answer
            except AgentError as err:
                self.gone(ref, err)
                continue
            self.tracker.observe_stacks(snapshot)
            self.scan(after_dump=ref)  # the dump stopped every thread: re-baseline

    def locks(self) -> dict[WorkerRef, LockProof]:
        proofs = {}
        for ref in self.tracker.workers:
            try:
                waits, live, elsewhere = procfs.read_lock_waits(ref.pid, proc=self.proc)
            except AgentError as err:
                self.errors.append(str(err))
                continue
            if waits:
                proof = locks.prove(waits, live, alive_elsewhere=elsewhere)
                self.tracker.observe_locks(ref, proof)
                proofs[ref] = proof
        return proofs


def diagnose(
    pid: int | None,
    *,
    stacks: StackSource,
    seconds: float = DEFAULT_SECONDS,
    native: bool = True,
    catalog: Catalog | None = None,
    proc: str = procfs.DEFAULT_PROC,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    workers: tuple[tuple[int, ...], tuple[WorkerRef, ...]] | None = None,
) -> Diagnosis:
    """Watch the workers of `pid` (a master or one worker; None: discover) for `seconds`.

    Scan and dump (natively) at the start, scan every SCAN_EVERY, dump again halfway (two
    dumps of a hot thread's stack make a spin), then scan, dump natively, read the mutex
    waits and judge: a thread that made no progress over the whole window is stuck.
    `workers` (masters, workers) skips finding them from `pid`."""
    masters, refs = workers if workers is not None else find_workers(pid, proc=proc)
    tracker = Tracker(catalog or load_catalog(), window_settings(seconds, native=native))
    tracker.retain(refs)
    window = _Window(tracker, stacks, proc, clock)
    try:
        window.scan()
        window.dump(native=native)
        end = clock() + seconds  # from after the first dumps: they cost no thread its window
        halfway = False
        while (now := clock()) < end:
            sleep(min(SCAN_EVERY, end - now))
            window.scan()
            if not halfway and clock() >= end - seconds / 2:
                window.dump(native=False)
                halfway = True
        window.scan()
        window.dump(native=native)
        proofs = window.locks()
        reports = tracker.judge(clock())
    finally:
        window.scanner.close()
    if not reports and window.errors:  # not one worker could be looked at: no verdict at all
        raise AgentError(window.errors[0])
    found = tuple(
        WorkerDiagnosis(
            report=report,
            worker_class=worker_class(report),
            proof=proofs.get(report.worker),
            versions=procfs.read_versions(report.worker.pid, proc=proc),
        )
        for report in reports
    )
    return Diagnosis(seconds, masters, found, tuple(window.errors))


def worker_class(report: WorkerReport) -> str | None:
    """gthread, sync, ggevent, asyncio...: from the main thread's frames; None if unknown."""
    main = next((t for t in report.threads if t.tid == report.worker.pid), None)
    if main is None or main.stack is None:
        return None
    files = [f.file for f in main.stack.frames if not f.native]
    for file in files:
        if found := _WORKER_CLASS.search(file):
            return found.group(1)
    return "asyncio" if any(_ASYNCIO.search(file) for file in files) else None


# ---- rendering (pure) -------------------------------------------------------------------


def _state(thread: ThreadReport) -> str:
    if thread.state is ThreadState.STUCK:
        return f"stuck (no progress in {thread.stuck_for:.1f} s)"
    if thread.state is ThreadState.SPINNING:
        return f"spinning (on CPU, stack unchanged for {thread.stuck_for:.1f} s)"
    return thread.state.value


def _names(report: WorkerReport) -> dict[int, str]:
    return {t.tid: t.name for t in report.threads if t.name}


def lock_record(proof: LockProof, names: dict[int, str], live: set[int]) -> dict[str, Any]:
    """The lock graph as JSON: edges (waiter -> mutex -> owner), cycles and orphans."""
    return {
        "edges": [
            {
                "waiter": waiter,
                "waiter_name": names.get(waiter),
                "mutex": f"{address:#x}",
                "owner": owner,
                "owner_name": names.get(owner),
                "owner_alive": owner in live,
            }
            for waiter, address, owner in proof.edges
        ],
        "cycles": [list(cycle) for cycle in proof.cycles],
        "orphans": [{"waiter": waiter, "owner": owner} for waiter, owner in proof.orphans],
    }


def worker_record(worker: WorkerDiagnosis) -> dict[str, Any]:
    """One worker as JSON."""
    report = worker.report
    names = _names(report)
    note = versions.tls_note(worker.versions) if worker.versions is not None else None
    return {
        "pid": report.worker.pid,
        "master_pid": report.worker.master_pid,
        "worker_class": worker.worker_class,
        "verdict": report.state.value,
        "threads": [
            {
                "tid": t.tid,
                "name": t.name,
                "state": t.state.value,
                "request": t.request,
                "stuck_seconds": round(t.stuck_for, 1),
                "top_frames": top_frames(t.stack, TOP_FRAMES),
            }
            for t in report.threads
        ],
        "findings": [
            {
                "signature": f.signature.name,
                "class": f.signature.hang_class.value,
                "summary": f.signature.summary,
                "remedy": f.signature.remedy,
                "references": list(f.signature.references),
                "threads": [{"role": role, "tid": t.tid, "name": t.name} for role, t in f.threads],
            }
            for f in report.findings
        ],
        "locks": (
            lock_record(worker.proof, names, {t.tid for t in report.threads})
            if worker.proof is not None
            else None
        ),
        "versions": worker.versions.as_dict() if worker.versions is not None else None,
        "version_note": note,
    }


def to_record(diagnosis: Diagnosis) -> dict[str, Any]:
    """The whole diagnosis as one JSON document."""
    return {
        "seconds": diagnosis.seconds,
        "masters": list(diagnosis.masters),
        "verdict": diagnosis.verdict.value,
        "exit_code": exit_code(diagnosis),
        "workers": [worker_record(w) for w in diagnosis.workers],
        "errors": list(diagnosis.errors),
    }


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent=indent, subsequent_indent=indent + "  ")


def _frames(thread: ThreadReport) -> list[str]:
    """Top frames with short module names; an idle thread's Python frames only (its native
    ones are the same epoll or lock wait everywhere)."""
    stack = thread.stack
    if stack is None:
        return []
    if thread.state is ThreadState.IDLE:
        return [str(f) for f in stack.frames if not f.native][:IDLE_FRAMES]
    named = [f for f in stack.frames if not (f.native and f.function.startswith("0x"))]
    return [
        f"{f.function} ({f.module.rsplit('/', 1)[-1]})" if f.module else str(f)
        for f in named[:TOP_FRAMES]
    ]


def _who(tid: int, names: dict[int, str]) -> str:
    return f"tid {tid} ({names[tid]})" if tid in names else f"tid {tid}"


def lock_lines(proof: LockProof, names: dict[int, str], live: set[int]) -> list[str]:
    """The lock graph for people: one edge a line, then each cycle and orphan."""
    lines = ["  lock graph:"]
    for waiter, address, owner in proof.edges:
        gone = "" if owner in live else ", which is gone"
        lines.append(
            f"    {_who(waiter, names)} waits on mutex {address:#x} held by "
            f"{_who(owner, names)}{gone}"
        )
    for cycle in proof.cycles:
        path = " -> ".join(_who(tid, names) for tid in (*cycle, cycle[0]))
        lines.append(f"    CYCLE (proven deadlock): {path}")
    for waiter, owner in proof.orphans:
        lines.append(
            f"    ORPHAN (proven deadlock): {_who(waiter, names)} waits on a mutex whose owner "
            f"tid {owner} is no thread of this worker"
        )
    return lines


def worker_lines(worker: WorkerDiagnosis) -> list[str]:
    """One worker for people: its threads, its verdict and findings, locks and versions."""
    report = worker.report
    names = _names(report)
    lines = [
        f"worker {report.worker.pid} (master {report.worker.master_pid}, "
        f"{worker.worker_class or 'worker class unknown'}): {report.state.value.upper()}"
    ]
    for t in report.threads:
        request = " [request thread]" if t.request else ""
        lines.append(f"  thread {t.tid} {t.name or '?'}: {_state(t)}{request}")
        lines.extend(f"      {frame}" for frame in _frames(t))
    for f in report.findings:
        lines.append(f"  {f.signature.name} ({f.signature.hang_class.value}):")
        lines.extend(_wrap(f.signature.summary, "    "))
        for role, t in f.threads:
            lines.append(f"    [{role}] {_who(t.tid, names)}")
        lines.extend(_wrap(f"Remedy: {f.signature.remedy}", "    "))
        lines.extend(f"    See: {url}" for url in f.signature.references)
    if report.state is WorkerState.STUCK and not report.findings:
        lines.append("  stuck, no known signature: read the stuck threads' frames above")
    if worker.proof is not None and worker.proof.edges:
        lines.extend(lock_lines(worker.proof, names, {t.tid for t in report.threads}))
    if worker.versions is None:
        lines.append("  versions: unknown (/proc/PID/maps not readable)")
    else:
        found = worker.versions.as_dict()
        shown = ", ".join(f"{k} {v}" for k, v in found.items()) or "none of libpq/OpenSSL found"
        lines.append(f"  versions: {shown}")
        note = versions.tls_note(worker.versions)
        if note is not None:
            lines.extend(_wrap(f"note: {note}", "  "))
    return lines


def to_text(diagnosis: Diagnosis) -> str:
    """The whole diagnosis for a terminal."""
    masters = ", ".join(str(m) for m in diagnosis.masters) or "?"
    lines = [
        f"gunicorn master {masters}: {len(diagnosis.workers)} worker(s) watched for "
        f"{diagnosis.seconds:g} s (stuck = no progress in all of it)",
        "",
    ]
    for worker in diagnosis.workers:
        lines.extend(worker_lines(worker))
        lines.append("")
    lines.extend(f"error: {error}" for error in diagnosis.errors)
    verdict = diagnosis.verdict
    lines.append(f"verdict: {verdict.value} (exit {exit_code(diagnosis)})")
    return "\n".join(lines)

