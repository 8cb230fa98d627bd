"""The Monitor's error paths, driven with the real classes: Monitor, Scanner (over a /proc tree
built in tmp_path), Tracker, IncidentBook, the real catalog and the real deadlock fixture dump
(tests/fixtures/pyspy/libpq_ssl_with_https.native.json), from a StackSource that fails on cue.

The worker is this test process itself (its real pid and start time), so the Monitor's check
of whether a "vanished" worker is really gone asks the real system.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from builders import fixture
from prometheus_client import CollectorRegistry

from agent.analysis import AnalysisSettings, IncidentBook, Tracker
from agent.errors import (
    AgentError,
    NativeUnwindFailed,
    NotPython,
    ProcessVanished,
    PtraceDenied,
    PySpyBadOutput,
    PySpyFailed,
    PySpyMissing,
    PySpyTimeout,
)
from agent.incidents import IncidentStore
from agent.metrics import AgentCollector
from agent.monitor import SAMPLE_ERROR_REASONS, Monitor
from agent.probe.client import ProbeClient
from agent.procfs import Scanner
from agent.sampler import Mode, Sampler
from agent.signatures import load_catalog
from agent.types import Incident, StackSnapshot, ThreadStack, WorkerRef

SIG = "libpq_ssl_with_https"
SETTINGS = AnalysisSettings(stuck_after=5, suspect_after=2, native_gap=1)
DEADLOCK = fixture("libpq_ssl_with_https.native")
FIXTURE_PID = DEADLOCK.worker.pid  # its main thread's tid too
# Where each fixture thread blocks: the libpq pool threads in poll(-1), the harvest thread in a
# TLS read, the main thread in epoll_wait (syscall args, sp, pc).
POINTS = {
    "poll": "7 0x7ffd5e0 0x1 0xffffffff 0x0 0x0 0x0 0x7ffd5a8 0x7f3c1e2d",
    "read": "0 0x9 0x7f00aa 0x4000 0x0 0x0 0x0 0x7ffd5b8 0x7f3c1e3e",
    "epoll_wait": "232 0x5 0x7f00bb 0x3f 0x3e8 0x0 0x0 0x7ffe20 0x7f3c02",
}


def me() -> WorkerRef:
    """This process as a worker: a pid that is really running, with its real start time."""
    return WorkerRef(os.getpid(), psutil.Process().create_time(), master_pid=1)


def gone() -> WorkerRef:
    """A worker that really exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = WorkerRef(child.pid, psutil.Process(child.pid).create_time(), master_pid=1)
    child.wait(10)
    return ref


def deadlock_for(ref: WorkerRef, at: float) -> StackSnapshot:
    """The fixture dump as a dump of `ref` (its main thread is the worker's pid)."""
    threads = tuple(
        replace(t, tid=ref.pid) if t.tid == FIXTURE_PID else t for t in DEADLOCK.threads
    )
    return replace(DEADLOCK, worker=ref, taken_at=at, threads=threads)


class FakeProc:
    """A /proc tree for one worker whose threads (the fixture's) sit blocked, never running."""

    def __init__(self, root: Path, ref: WorkerRef) -> None:
        self.root = root
        self.ref = ref
        self.cpu: dict[int, list[int]] = {}
        for t in deadlock_for(ref, 0.0).threads:
            task = root / str(ref.pid) / "task" / str(t.tid)
            task.mkdir(parents=True)
            (task / "stat").write_text(f"{t.tid} (gunicorn) S {' '.join(['1'] * 49)}\n")
            self.cpu[t.tid] = [1_000_000, 10]
            inner = t.frames[0].function if t.frames else "poll"
            self.set(t.tid, POINTS.get(inner, POINTS["poll"]))
        count = len(self.cpu)
        stat = f"{ref.pid} (gunicorn) S {' '.join(['1'] * 16)} {count} {' '.join(['1'] * 32)}\n"
        (root / str(ref.pid) / "stat").write_text(stat)

    def set(self, tid: int, syscall: str | None = None, *, cpu_ns: int = 0, runs: int = 0) -> None:
        cpu = self.cpu[tid]
        cpu[0] += cpu_ns
        cpu[1] += runs
        task = self.root / str(self.ref.pid) / "task" / str(tid)
        (task / "schedstat").write_text(f"{cpu[0]} 0 {cpu[1]}\n")
        if syscall is not None:
            (task / "syscall").write_text(syscall + "\n")


class Workers:
    """Discovery, faked: the same workers every cycle; a bug on cue."""

    def __init__(self, *refs: WorkerRef) -> None:
        self.refs = tuple(refs)
        self.forgotten: list[int] = []
        self.fail: BaseException | None = None

    def workers(self) -> tuple[tuple[int, ...], tuple[WorkerRef, ...]]:
        if self.fail is not None:
            fail, self.fail = self.fail, None
            raise fail
        return (1,), self.refs

    def forget(self, pid: int) -> None:
        self.forgotten.append(pid)


class Stacks:
    """A StackSource answering with the real deadlock dump, or raising what it is told to
    (`fail[n]` for its n-th call, or `fail_next` for the next call)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.calls: list[bool] = []  # native?
        self.fail: dict[int, AgentError] = {}
        self.fail_next: list[AgentError] = []

    def dump(
        self, worker: WorkerRef, *, native: bool, nonblocking: bool = False
    ) -> StackSnapshot:
        self.calls.append(native)
        error = self.fail.pop(len(self.calls), None) or (
            self.fail_next.pop(0) if self.fail_next else None
        )
        if error is not None:
            raise error
        snap = deadlock_for(worker, self.clock())
        if not native:  # a Python-only dump: the same threads without their native frames
            snap = replace(snap, native=False, threads=tuple(
                ThreadStack(t.tid, t.name, tuple(f for f in t.frames if not f.native), False)
                for t in snap.threads
            ))  # fmt: skip
        return snap


class World:
    """A Monitor over one deadlocked worker, with a clock the test moves."""

    def __init__(
        self, tmp_path: Path, ref: WorkerRef, *, store: IncidentStore | None = None,
        listeners: tuple[Callable[[Incident], None], ...] = (),
    ) -> None:
        self.now = 0.0
        self.ref = ref
        self.proc = FakeProc(tmp_path / "proc", ref)
        self.workers = Workers(ref)
        self.stacks = Stacks(lambda: self.now)
        self.events: list[Incident] = []
        self.tracker = Tracker(load_catalog(), SETTINGS)
        self.monitor = Monitor(
            workers=self.workers, stacks=self.stacks, tracker=self.tracker,
            proc=str(tmp_path / "proc"), clock=lambda: self.now,
            listeners=(*listeners, self.events.append), incidents=IncidentBook(), store=store,
        )  # fmt: skip

    def run(self, until: float) -> None:
        while self.now < until:
            self.monitor.cycle()
            self.now += 1.0

    @property
    def opened(self) -> list[Incident]:
        return [i for i in self.events if i.resolved_at is None]

    @property
    def resolved(self) -> list[Incident]:
        return [i for i in self.events if i.resolved_at is not None]

    def wake(self) -> None:
        """Every thread wakes without progress and blocks again somewhere else (a new stack
        pointer): verdicts are held, and the tracker plans a re-check dump."""
        for tid in self.proc.cpu:
            task = self.proc.root / str(self.ref.pid) / "task" / str(tid)
            point = (task / "syscall").read_text().split()
            point[-2] = hex(int(point[-2], 16) + 0x40)
            self.proc.set(tid, " ".join(point), cpu_ns=5_000, runs=2)

    def metric(self, name: str, **labels: str) -> float | None:
        registry = CollectorRegistry()
        registry.register(AgentCollector(
            lambda: self.monitor.last_report, version="t", py_spy_version="t"
        ))  # fmt: skip
        return registry.get_sample_value(name, labels)


def errors(world: World, reason: str) -> float | None:
    return world.metric("deadlock_agent_sample_errors_total", reason=reason)


# --- the bug: a py-spy error read as "vanished" on a live, deadlocked worker ---------------------


def test_a_vanished_misread_on_a_live_deadlocked_worker_keeps_its_incident(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, me())
    world.run(until=8)
    assert [i.signature_name for i in world.opened] == [SIG]
    # py-spy says "No such file or directory" (classify_failure: ProcessVanished) about a worker
    # that is still running, on the re-check dump that someone else's ptrace calls for.
    misread = ProcessVanished("py-spy: No such file or directory", pid=me().pid)
    world.stacks.fail_next.append(misread)
    world.wake()
    calls = len(world.stacks.calls)
    world.run(until=25)
    assert len(world.stacks.calls) > calls, "no dump was planned after the wake-up"
    assert not world.stacks.fail_next, "the misread was never raised"
    assert len(world.opened) == 1, world.events  # one hang, one notification
    assert world.resolved == []
    assert world.metric("deadlock_agent_deadlocks_detected_total", signature=SIG) == 1
    assert world.metric("deadlock_agent_deadlocked_workers", signature=SIG) == 1
    assert errors(world, "vanished") == 1
    assert world.tracker.workers == (world.ref,)  # its state was kept
    assert world.workers.forgotten == []
    assert world.monitor.incidents.open and world.monitor.incidents.open[0] is world.opened[0]


def test_a_worker_that_really_vanished_is_forgotten_and_its_incident_resolved(
    tmp_path: Path,
) -> None:
    ref = gone()
    world = World(tmp_path, ref)
    world.run(until=8)
    assert [i.signature_name for i in world.opened] == [SIG]
    world.stacks.fail_next.append(ProcessVanished("py-spy: No such process", pid=ref.pid))
    world.wake()
    while world.stacks.fail_next and world.now < 20:
        world.run(until=world.now + 1)
    world.workers.refs = ()  # discovery no longer lists it either
    world.run(until=world.now + 2)
    assert len(world.resolved) == 1 and len(world.opened) == 1
    assert world.tracker.workers == ()
    assert world.workers.forgotten == [ref.pid]
    assert errors(world, "vanished") == 1


@pytest.mark.parametrize(
    "error",
    [
        PySpyFailed("py-spy failed: Error: Failed to find a python interpreter in the .data "
                    "section", pid=1),
        PySpyBadOutput("unreadable py-spy JSON: Expecting value", pid=1),
        PySpyTimeout("py-spy did not finish within 1s; killed", pid=1),
    ],
    ids=lambda e: e.reason,
)  # fmt: skip
def test_a_dump_failing_because_the_worker_exited_counts_as_vanished(
    tmp_path: Path, error: AgentError
) -> None:
    """The target exited mid-dump: whatever py-spy said, the worker is gone and forgotten."""
    ref = gone()
    world = World(tmp_path, ref)
    world.stacks.fail[1] = error
    world.run(until=1)
    assert errors(world, "vanished") == 1 and errors(world, error.reason) == 0
    assert world.workers.forgotten == [ref.pid]


def test_a_reused_pid_counts_as_vanished(tmp_path: Path) -> None:
    """The pid runs, but another process (another start time): the worker is gone."""
    ref = replace(me(), create_time=me().create_time - 3600)
    world = World(tmp_path, ref)
    world.run(until=8)
    world.stacks.fail_next.append(ProcessVanished("py-spy: No such process", pid=ref.pid))
    world.wake()
    while world.stacks.fail_next and world.now < 20:
        world.run(until=world.now + 1)
    world.workers.refs = ()
    world.run(until=world.now + 2)
    assert world.workers.forgotten == [ref.pid]
    assert len(world.resolved) == 1


# --- every other error of a dump: counted under its reason, the worker and incident kept ---------


@pytest.mark.parametrize(
    "error",
    [
        PySpyTimeout("py-spy did not finish within 1s; killed", pid=1),
        PySpyBadOutput("unreadable py-spy JSON: Expecting value", pid=1),
        PySpyFailed("py-spy failed: Error: something broke", pid=1),
        PySpyMissing("cannot run '/gone/py-spy': not found", pid=1),
        PtraceDenied("py-spy was denied access", pid=1),
    ],
    ids=lambda e: e.reason,
)
def test_a_failing_re_check_is_counted_and_the_incident_held(
    tmp_path: Path, error: AgentError
) -> None:
    world = World(tmp_path, me())
    world.run(until=8)
    world.stacks.fail_next.extend([error, error])
    world.wake()
    world.run(until=16)
    assert errors(world, error.reason) == 2, world.monitor.last_report
    assert len(world.opened) == 1 and world.resolved == []
    assert world.tracker.workers == (world.ref,)
    assert world.metric("deadlock_agent_deadlocked_workers", signature=SIG) == 1  # still named


def test_a_failing_dump_makes_that_cycle_incomplete_and_the_next_recovers(tmp_path: Path) -> None:
    world = World(tmp_path, me())
    world.stacks.fail[1] = PySpyTimeout("py-spy did not finish within 1s; killed", pid=1)
    world.monitor.cycle()
    assert world.metric("deadlock_agent_up") == 0
    assert errors(world, "timeout") == 1
    world.now = 1.0
    world.monitor.cycle()  # the first look, retried
    assert world.metric("deadlock_agent_up") == 1
    assert len(world.stacks.calls) == 2


def test_a_process_without_python_is_counted_once_and_never_dumped_again(tmp_path: Path) -> None:
    world = World(tmp_path, me())
    world.stacks.fail[1] = NotPython(
        "py-spy: Failed to find python version from target process", pid=me().pid
    )
    world.run(until=30)
    assert world.stacks.calls == [False]
    assert errors(world, "not_python") == 1
    assert world.opened == []  # no Python stack: never called stuck
    assert world.metric("deadlock_agent_workers", state="ok") == 1


def test_native_unwind_failure_falls_back_to_python_frames_for_good(tmp_path: Path) -> None:
    world = World(tmp_path, me())
    world.run(until=5)  # the first look (Python frames), then stuck: a native dump is wanted
    assert world.stacks.calls[0] is False
    first_native = world.stacks.calls.index(True) + 1
    world2 = World(tmp_path / "again", me())
    world2.stacks.fail[first_native] = NativeUnwindFailed("py-spy: UNW_EINVAL", pid=1)
    world2.run(until=12)
    assert errors(world2, "native_unwind") == 1
    # The same cycle fell back to a Python dump; no native dump was asked for again.
    assert world2.stacks.calls[first_native] is False
    assert True not in world2.stacks.calls[first_native:]
    assert not world2.tracker.native_allowed(world2.ref)
    assert [i.signature_name for i in world2.opened] == [SIG]  # still named from Python frames


def test_a_failing_listener_neither_stops_the_others_nor_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_incident: Incident) -> None:
        raise RuntimeError("webhook client bug")

    world = World(tmp_path, me(), listeners=(broken,))
    with caplog.at_level(logging.ERROR, logger="agent.monitor"):
        world.run(until=10)
    assert [i.signature_name for i in world.opened] == [SIG]  # the next listener still heard
    assert "incident listener" in caplog.text and "webhook client bug" in caplog.text
    assert world.monitor.last_report is not None and world.monitor.last_report.finished_at == 9
    assert errors(world, "internal") == 0


def test_a_failing_store_is_counted_and_the_incident_still_notified(tmp_path: Path) -> None:
    """The store's directory became a file (a read-only directory is no obstacle to root)."""
    store = IncidentStore(tmp_path / "incidents")
    (tmp_path / "incidents").rmdir()
    (tmp_path / "incidents").write_text("not a directory")
    world = World(tmp_path, me(), store=store)
    world.run(until=10)
    assert errors(world, "incident_store") == 1
    assert len(world.opened) == 1 and world.resolved == []


def test_a_bug_in_a_cycle_is_counted_as_internal_and_the_loop_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(tmp_path, me())
    world.monitor.interval = 0.01
    world.workers.fail = KeyError("a bug")
    events: queue.SimpleQueue[int] = queue.SimpleQueue()
    cycles = [0]
    real_cycle = world.monitor.cycle

    def counted() -> object:
        cycles[0] += 1
        if cycles[0] == 3:
            events.put(15)
        return real_cycle()

    world.monitor.cycle = counted  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="agent.monitor"):
        assert world.monitor.run(events) == 15
    assert cycles[0] == 3
    assert errors(world, "internal") == 1
    assert "sampling cycle failed; continuing" in caplog.text


def test_each_cause_is_logged_once_however_many_workers_and_cycles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Churn gives every failure a new pid: the log says each cause once, the counter counts
    every one."""
    world = World(tmp_path, me())
    with caplog.at_level(logging.WARNING, logger="agent.monitor"):
        for pid in range(5000, 5100):
            world.monitor._error(PySpyTimeout("py-spy did not finish within 1s; killed", pid=pid))
            world.monitor._error(PySpyBadOutput("unreadable py-spy JSON", pid=pid))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert world.monitor._errors["timeout"] == 100
    assert len(world.monitor._warned) == 2  # bounded by the causes, not the pids


# --- churn: nothing kept for dead workers --------------------------------------------------------


def test_churn_keeps_no_state_of_dead_workers(tmp_path: Path) -> None:
    """A worker respawned every cycle (and the master restarted every 30): the Tracker, the
    Scanner's open files, the Sampler's per-master levels, the probe client and the logged
    causes hold only what is alive, and a worker that exits while listed is counted vanished."""
    now = [0.0]
    stacks = Stacks(lambda: now[0])
    root = tmp_path / "proc"
    scanner = Scanner(str(root))
    probe = ProbeClient(str(tmp_path))
    sampler = Sampler(Mode.AUTO, pyspy=stacks, probe=probe, scanner=scanner)
    tracker = Tracker(load_catalog(), SETTINGS)
    workers = Workers()
    monitor = Monitor(
        workers=workers, sampler=sampler, tracker=tracker, proc=str(root),
        clock=lambda: now[0], listeners=[],
    )  # fmt: skip
    for cycle in range(120):
        now[0] = float(cycle)
        # Start times no real process with these pids has: running() says gone for them.
        ref = WorkerRef(100_000 + cycle, 100.0 + cycle, master_pid=1 + cycle // 30)
        FakeProc(root, ref)
        # One that exited between discovery's listing and the first scan of it.
        stillborn = WorkerRef(200_000 + cycle, 100.0 + cycle, master_pid=ref.master_pid)
        if len(workers.refs) == 2:
            shutil.rmtree(root / str(workers.refs[0].pid))
        workers.refs = (*workers.refs[-1:], ref, stillborn)
        monitor.cycle()
        workers.refs = workers.refs[:-1]
    assert set(tracker.workers) <= set(workers.refs)
    assert len(scanner._watched) <= 2
    assert scanner.open_fds <= 2 * (1 + 2 * len(DEADLOCK.threads))  # stat, schedstat, syscall
    assert set(sampler.levels()) <= {ref.master_pid for ref in workers.refs}
    assert probe._known() == set()
    assert monitor._warned <= set(SAMPLE_ERROR_REASONS)
    assert monitor._errors["vanished"] == 120
    assert monitor._errors["internal"] == 0
    assert workers.forgotten  # each one was really gone: forgotten
