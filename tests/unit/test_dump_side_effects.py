"""The Tracker's plan spares workers whose threads are blocked writing to a pipe or socket: a
py-spy dump can cut such a write short (research fact 6: a 1 MB pipe write, dumped once,
delivered 65 536 bytes and returned). Once a dump has seen the thread at that write, no
re-check, native refresh or periodic refresh is planned while it stays there."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
from builders import GTHREAD_IDLE_POOL, GTHREAD_MAIN, GTHREAD_REQUEST, WORKER, py, snapshot, stack

from agent.analysis import AnalysisSettings, Tracker
from agent.procfs import Scanner
from agent.signatures import load_catalog
from agent.types import (
    DumpKind,
    ProcSample,
    ThreadActivity,
    ThreadState,
    WorkerRef,
    WorkerState,
)

SETTINGS = AnalysisSettings(stuck_after=5, suspect_after=2, native_gap=1, dump_interval=10)
MAIN, WRITER, POOL = WORKER.pid, WORKER.pid + 1, WORKER.pid + 2
EPOLL = "0x5 0x7f00bb 0x3f 0x7ffe20 0x7f3c02"
WAITS = {  # syscall name -> (number, its blocking point: fd 0x9 first)
    "write": (1, "0x9 0x7f5500 0x100000 0x7ffd10 0x7f3c11"),
    "sendto": (44, "0x9 0x7f5500 0x4000 0x7ffd20 0x7f3c12"),
    "poll": (7, "0x7ffd5e0 0x1 0xffffffff 0x7ffd5a8 0x7f3c1e"),
}
# A request thread writing its log line into a pipe nobody reads (log_sink_backpressure's shape).
WRITING = (py("StreamHandler.flush", "logging/__init__.py", 1113), *GTHREAD_REQUEST)


def thread(tid: int, syscall: str, point: str, fd_kind: str | None = None) -> ThreadActivity:
    number = WAITS[syscall][0] if syscall in WAITS else 232
    return ThreadActivity(
        tid=tid, start_ticks=1, comm="gunicorn", state="S", cpu_ns=1_000_000, runs=10,
        syscall=number, wchan=None, blocked_at=point, syscall_name=syscall, fd_kind=fd_kind,
    )  # fmt: skip


def plans(syscall: str, fd_kind: str | None) -> tuple[list[tuple[float, DumpKind]], Tracker]:
    """Every dump the plan asks for over 30 s of a request thread blocked in `syscall`."""
    tracker = Tracker(load_catalog(), SETTINGS)
    tracker.retain([WORKER])
    threads = (
        thread(MAIN, "epoll_wait", EPOLL),
        thread(WRITER, syscall, WAITS[syscall][1], fd_kind),
        thread(POOL, "futex", "0x7f00aa 0x189 0x0 0x7ffe10 0x7f3c01"),
    )
    live = frozenset(t.tid for t in threads)
    tracker.observe_proc(ProcSample(WORKER, 0.0, threads, tids=live))
    planned: list[tuple[float, DumpKind]] = []
    for second in range(31):
        now = float(second)
        if second:
            tracker.observe_proc(ProcSample(WORKER, now, (), tids=live))  # nothing ran
        for ref, kind in tracker.plan(now):
            assert ref == WORKER
            planned.append((now, kind))
            deep = kind is DumpKind.NATIVE
            tracker.observe_stacks(snapshot(
                stack(*GTHREAD_MAIN, tid=MAIN, is_native=deep),
                stack(*WRITING, tid=WRITER, is_native=deep),
                stack(*GTHREAD_IDLE_POOL, tid=POOL, is_native=deep), at=now, is_native=deep,
            ))  # fmt: skip
            tracker.observe_proc(ProcSample(WORKER, now, threads, tids=live), after_dump=True)
        tracker.judge(now)
    return planned, tracker


@pytest.mark.parametrize(
    ("syscall", "fd_kind"), [("write", "pipe"), ("sendto", "socket")], ids=["pipe", "socket"]
)
def test_a_thread_blocked_writing_to_a_pipe_or_socket_is_dumped_once(
    syscall: str, fd_kind: str
) -> None:
    planned, tracker = plans(syscall, fd_kind)
    # The first look, and no re-dump after it (any other stuck thread gets a native dump as a
    # suspect and another when it turns stuck: see the next test).
    assert planned == [(0.0, DumpKind.PYTHON)]
    (report,) = tracker.judge(30.0)
    assert report.state is WorkerState.STUCK  # judged from that one dump and /proc
    writer = next(t for t in report.threads if t.tid == WRITER)
    assert writer.state is ThreadState.STUCK and writer.stuck_for >= 25


@pytest.mark.parametrize(
    ("syscall", "fd_kind"), [("poll", None), ("write", "other")], ids=["poll", "regular-file"]
)
def test_any_other_stuck_thread_gets_its_native_re_dump(syscall: str, fd_kind: str | None) -> None:
    planned, _ = plans(syscall, fd_kind)
    assert planned == [(0.0, DumpKind.PYTHON), (2.0, DumpKind.NATIVE), (6.0, DumpKind.NATIVE)]


def test_procfs_names_the_pipe_a_real_blocked_writer_writes_to() -> None:
    """A real process blocked writing 1 MB into a pipe nobody reads: the Scanner says write(2)
    on a pipe (read from /proc/PID/fd/N), which is what the plan above keys on."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import os; os.write(1, b'x' * 1_000_000)"],
        stdout=subprocess.PIPE,
    )
    try:
        ref = WorkerRef(child.pid, psutil.Process(child.pid).create_time(), 1)
        scanner = Scanner()
        deadline = time.monotonic() + 10
        while True:
            scanner.forget(ref)
            (main,) = [t for t in scanner.scan(ref, now=0.0).threads if t.tid == child.pid]
            if main.syscall_name == "write" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        scanner.close()
        assert (main.syscall_name, main.fd_kind) == ("write", "pipe"), main
    finally:
        child.kill()
        child.communicate()
