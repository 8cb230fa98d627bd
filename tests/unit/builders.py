"""Small keyword-only builders for threads, frames and snapshots, and the py-spy fixtures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from agent.analysis import AnalysisSettings, IncidentBook, Tracker
from agent.pyspy import parse_dump
from agent.signatures import load_catalog
from agent.types import (
    Frame,
    Incident,
    ProcSample,
    StackSnapshot,
    ThreadActivity,
    ThreadStack,
    WorkerRef,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "pyspy"

WORKER = WorkerRef(pid=100, create_time=1000.0, master_pid=1)


POLL_POINT = "0x7ffd5e0 0x1 0xffffffff 0x0 0x0 0x0 0x7ffd5a8 0x7f3c1e2d"


def activity(
    *, tid: int, cpu_ns: int = 0, runs: int = 0, state: str = "S", start: int = 1,
    point: str | None = POLL_POINT, timed: bool = False,
) -> ThreadActivity:
    """One /proc thread reading: on-CPU ns, times scheduled, where it blocks and whether that
    wait has a timeout."""
    return ThreadActivity(
        tid=tid, start_ticks=start, comm="gunicorn", state=state, cpu_ns=cpu_ns,
        runs=runs, syscall=7, wchan="do_sys_poll", blocked_at=point, timed_wait=timed,
    )  # fmt: skip


def proc(
    *threads: ThreadActivity, at: float, worker: WorkerRef = WORKER, resolution_ns: int = 1
) -> ProcSample:
    """A /proc scan of one worker."""
    return ProcSample(worker=worker, taken_at=at, threads=threads, resolution_ns=resolution_ns)


def py(function: str, file: str, line: int = 1) -> Frame:
    """A Python frame."""
    return Frame(function=function, file=file, line=line)


def native(function: str, module: str) -> Frame:
    """A native frame."""
    return Frame(function=function, file=module, module=module)


def stack(
    *frames: Frame, tid: int, name: str | None = None, is_native: bool = False
) -> ThreadStack:
    """A thread's stack, innermost frame first."""
    return ThreadStack(tid=tid, name=name, frames=frames, native=is_native)


def snapshot(
    *stacks: ThreadStack, at: float, is_native: bool = False, worker: WorkerRef = WORKER
) -> StackSnapshot:
    """A py-spy dump of one worker."""
    return StackSnapshot(worker=worker, taken_at=at, native=is_native, threads=stacks)


def fixture(name: str, *, at: float = 0.0) -> StackSnapshot:
    """A checked-in real py-spy dump, parsed as the agent parses it (pid taken from the file)."""
    text = (FIXTURES / f"{name}.json").read_text()
    native_dump = name.endswith(".native")
    pid = int(json.loads(text)[0]["pid"])
    worker = WorkerRef(pid=pid, create_time=1000.0, master_pid=1)
    return parse_dump(text, worker=worker, taken_at=at, native=native_dump)


# Frames of a request thread in gunicorn's gthread worker, under the app.
GTHREAD_REQUEST = (
    py("app", "app.py", 10),
    py("ThreadWorker.handle_request", "gunicorn/workers/gthread.py", 771),
    py("ThreadWorker.handle", "gunicorn/workers/gthread.py", 553),
    py("_WorkItem.run", "concurrent/futures/thread.py", 58),
    py("_worker", "concurrent/futures/thread.py", 83),
    py("Thread.run", "threading.py", 982),
)
GTHREAD_IDLE_POOL = (
    py("_worker", "concurrent/futures/thread.py", 81),
    py("Thread.run", "threading.py", 982),
)
GTHREAD_MAIN = (
    py("EpollSelector.select", "selectors.py", 468),
    py("ThreadWorker.wait_for_and_dispatch_events", "gunicorn/workers/gthread.py", 398),
    py("ThreadWorker.run", "gunicorn/workers/gthread.py", 425),
)


def deadlock_incident(*, at: float = 10.0, pid: int | None = None) -> Incident:
    """A real incident: the fixture dump judged by the real tracker."""
    snap = fixture("libpq_ssl_with_https.native", at=2)
    if pid is not None:
        snap = replace(snap, worker=WorkerRef(pid, 1000.0, 1))
    tracker = Tracker(load_catalog(), AnalysisSettings(stuck_after=5, suspect_after=2))
    tracker.retain([snap.worker])
    acts = tuple(ThreadActivity(t.tid, 1, "gunicorn", "S", 0, 0, 7, None) for t in snap.threads)
    tracker.observe_proc(ProcSample(snap.worker, 0.0, acts))
    tracker.observe_stacks(snap)
    (incident,), _ = IncidentBook().update(tracker.judge(at), at)
    return incident
