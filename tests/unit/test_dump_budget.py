"""A regression guard on cost that is not a timing: how many times the agent runs py-spy per
minute under simulated steady traffic with nothing stuck.

The real Monitor, Scanner, Tracker and py-spy output parser run against a /proc tree built in
tmp_path (two gthread workers: a heartbeating main thread and four pool threads that serve
requests and go back to the same futex) and a py-spy whose runner is injected: it counts the
calls and answers with a real captured dump (tests/fixtures/pyspy/idle_gthread.python.json).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from builders import FIXTURES, activity, proc

from agent.analysis import AnalysisSettings, Tracker
from agent.monitor import Monitor
from agent.pyspy import PySpy
from agent.signatures import load_catalog
from agent.types import DumpKind, WorkerRef

IDLE = json.loads((FIXTURES / "idle_gthread.python.json").read_text())
MAIN_TID = 2655
POOL_TIDS = (2676, 2681, 2682, 2683)
# Where each thread blocks (syscall args, sp, pc): the pool's work-queue futex, the epoll.
FUTEX = "202 0x7f00aa 0x189 0x0 0x0 0x0 0xffffffff 0x7ffe10 0x7f3c01"
EPOLL = "232 0x5 0x7f00bb 0x3f 0x3e8 0x0 0x0 0x7ffe20 0x7f3c02"
REQUEST = "7 0x7ffe30 0x1 0xffffffff 0x0 0x0 0x0 0x7ffe40 0x7f3c03"  # mid-request, in poll
SETTINGS = AnalysisSettings(stuck_after=10, suspect_after=2, dump_interval=300, native_gap=5)


class FakeProc:
    """A /proc tree of gthread workers whose threads' schedstat and syscall files we move."""

    def __init__(self, root: Path, pids: Sequence[int]) -> None:
        self.root = root
        self.cpu: dict[tuple[int, int], list[int]] = {}
        for pid in pids:
            tids = (pid, *(pid + (t - MAIN_TID) for t in POOL_TIDS))
            for tid in tids:
                task = root / str(pid) / "task" / str(tid)
                task.mkdir(parents=True)
                name = "gunicorn" if tid == pid else "ThreadPoolExe"
                (task / "stat").write_text(f"{tid} ({name}) S {' '.join(['1'] * 49)}\n")
                self.cpu[(pid, tid)] = [1_000_000, 10]
                self.set(pid, tid, EPOLL if tid == pid else FUTEX)
            stat = f"{pid} (gunicorn) S {' '.join(['1'] * 16)} {len(tids)} {' '.join(['1'] * 32)}\n"
            (root / str(pid) / "stat").write_text(stat)

    def set(self, pid: int, tid: int, syscall: str, *, cpu_ns: int = 0, runs: int = 0) -> None:
        cpu = self.cpu[(pid, tid)]
        cpu[0] += cpu_ns
        cpu[1] += runs
        task = self.root / str(pid) / "task" / str(tid)
        (task / "schedstat").write_text(f"{cpu[0]} 0 {cpu[1]}\n")
        (task / "syscall").write_text(syscall + "\n")


class Workers:
    def __init__(self, refs: tuple[WorkerRef, ...]) -> None:
        self.refs = refs

    def workers(self) -> tuple[tuple[int, ...], tuple[WorkerRef, ...]]:
        return (1,), self.refs

    def forget(self, pid: int) -> None:
        pass


class CountingRunner:
    """py-spy, injected: counts each run and answers with the captured idle dump."""

    def __init__(self) -> None:
        self.dumps: list[float] = []
        self.now = 0.0

    def __call__(self, argv: Sequence[str], *, timeout: float) -> tuple[int, str, str]:
        if "--version" in argv:
            return 0, "py-spy 0.4.3\n", ""
        self.dumps.append(self.now)
        pid = int(argv[argv.index("--pid") + 1])
        threads = [
            {**t, "pid": pid, "os_thread_id": pid + (t["os_thread_id"] - MAIN_TID)} for t in IDLE
        ]
        return 0, json.dumps(threads), ""


@pytest.mark.parametrize("requests_per_second", [0, 4, 20], ids=["idle", "4-rps", "20-rps"])
def test_steady_traffic_with_nothing_stuck_costs_no_py_spy_runs_after_the_first_look(
    tmp_path: Path, requests_per_second: int
) -> None:
    pids = (3000, 4000)
    fake = FakeProc(tmp_path, pids)
    refs = tuple(WorkerRef(pid, 100.0, 1) for pid in pids)
    runner = CountingRunner()
    clock = [0.0]
    pyspy = PySpy(runner=runner, search_dirs=(), path="/usr/bin:/bin", clock=lambda: clock[0])
    pyspy.executable = "/usr/bin/true"  # found: the runner answers for it
    monitor = Monitor(
        workers=Workers(refs), stacks=pyspy, tracker=Tracker(load_catalog(), SETTINGS),
        proc=str(tmp_path), clock=lambda: clock[0], listeners=[],
    )  # fmt: skip
    served = 0
    minutes = 5
    for second in range(minutes * 60):
        clock[0] = runner.now = float(second)
        for pid in pids:
            fake.set(pid, pid, EPOLL, cpu_ns=90_000, runs=1)  # the heartbeat
            for n in range(requests_per_second // len(pids)):
                tid = pid + (POOL_TIDS[(served + n) % len(POOL_TIDS)] - MAIN_TID)
                # a request: ~6 ms of CPU, and back to the work queue's futex
                fake.set(pid, tid, FUTEX, cpu_ns=6_000_000, runs=14)
            served += requests_per_second // len(pids)
        report = monitor.cycle()
        assert all(w.state.value == "ok" for w in report.workers), report
    per_minute = [sum(1 for at in runner.dumps if m * 60 <= at < (m + 1) * 60)
                  for m in range(minutes)]  # fmt: skip
    # The design's bound: a first look at each worker, then nothing while every thread that
    # ran is back at the idle point it was dumped in, and never more than the budget.
    assert per_minute[0] <= len(pids), per_minute
    assert sum(per_minute[1:]) == 0, per_minute
    assert max(per_minute) <= SETTINGS.max_dumps_per_minute
    assert monitor.last_report is not None
    assert {t.state.value for w in monitor.last_report.workers for t in w.threads} == {"idle"}


def test_the_budget_bounds_dumps_when_every_thread_is_a_suspect(tmp_path: Path) -> None:
    # Churn-like: threads keep stopping at new points, so every worker wants a dump every
    # cycle. The per-minute budget holds, and what does not fit is counted as deferred.
    pids = tuple(range(5000, 5000 + 20 * 1000, 1000))
    fake = FakeProc(tmp_path, pids)
    refs = tuple(WorkerRef(pid, 100.0, 1) for pid in pids)
    runner = CountingRunner()
    clock = [0.0]
    pyspy = PySpy(runner=runner, search_dirs=(), path="/usr/bin:/bin", clock=lambda: clock[0])
    pyspy.executable = "/usr/bin/true"
    monitor = Monitor(
        workers=Workers(refs), stacks=pyspy, tracker=Tracker(load_catalog(), SETTINGS),
        proc=str(tmp_path), clock=lambda: clock[0], listeners=[],
    )  # fmt: skip
    for second in range(180):
        clock[0] = runner.now = float(second)
        for pid in pids:
            tid = pid + (POOL_TIDS[second % 4] - MAIN_TID)
            point = REQUEST.replace("0x7ffe30", hex(0x7FFE30 + second))
            fake.set(pid, tid, point, cpu_ns=6_000_000, runs=14)  # ran, stopped somewhere new
        monitor.cycle()
    for minute in range(3):
        in_minute = [at for at in runner.dumps if minute * 60 <= at < (minute + 1) * 60]
        assert len(in_minute) <= SETTINGS.max_dumps_per_minute, (minute, len(in_minute))
    assert monitor.last_report is not None and monitor.last_report.dumps_deferred > 0


def test_a_settled_worker_is_skipped_until_a_thread_leaves_its_idle_point(tmp_path: Path) -> None:
    """Plan and judge skip a worker whose threads all sit where their last dump saw them, at an
    idle point; a thread that moves to a new blocking point and stops there is news, and is
    dumped as a suspect within suspect_after of going quiet."""
    pids = (3000,)
    fake = FakeProc(tmp_path, pids)
    refs = tuple(WorkerRef(pid, 100.0, 1) for pid in pids)
    runner = CountingRunner()
    clock = [0.0]
    pyspy = PySpy(runner=runner, search_dirs=(), path="/usr/bin:/bin", clock=lambda: clock[0])
    pyspy.executable = "/usr/bin/true"
    tracker = Tracker(load_catalog(), SETTINGS)
    monitor = Monitor(
        workers=Workers(refs), stacks=pyspy, tracker=tracker,
        proc=str(tmp_path), clock=lambda: clock[0], listeners=[],
    )  # fmt: skip

    def tick(second: int) -> object:
        clock[0] = runner.now = float(second)
        fake.set(3000, 3000, EPOLL, cpu_ns=90_000, runs=1)  # the heartbeat, back at its point
        return monitor.cycle().workers[0]

    for second in range(5):
        tick(second)
    assert len(runner.dumps) == 1  # the first look
    settled = tick(5)
    assert tick(6) is settled and tick(7) is settled  # judged once, then reused
    pool = 3000 + (POOL_TIDS[0] - MAIN_TID)
    clock[0] = 8.0
    fake.set(3000, pool, REQUEST, cpu_ns=6_000_000, runs=14)  # serves, then stops in poll
    for second in range(8, 12):
        tick(second)
    assert runner.dumps[1:] == [10.0], runner.dumps  # quiet for suspect_after: dumped


def test_a_long_lived_worker_never_dumped_is_a_suspect_not_a_first_look() -> None:
    """A respawned worker that hangs again at once: its threads block before any dump saw
    them. Once it has lived stuck_after, its first look is as urgent as a suspect's, so a
    budget spent on the first deadlocks does not hide the second for a minute; a young worker
    (churn) still waits behind the share kept for suspects."""
    settings = AnalysisSettings(stuck_after=5, suspect_after=2, max_dumps_per_minute=12)
    tracker = Tracker(load_catalog(), settings)
    worker = WorkerRef(pid=300, create_time=1.0, master_pid=1)
    tracker.retain([worker])
    tracker.observe_proc(proc(activity(tid=300, cpu_ns=5_000_000, runs=9), at=0.0, worker=worker))
    tracker._dumped_at.extend([0.0] * 9)  # 9 of 12 spent: less than the share kept for suspects
    assert tracker.plan(3.0) == []  # quiet 3 s, lived 3 s: a first look, deferred
    assert tracker.plan(6.0) == [(worker, DumpKind.PYTHON)]  # lived 6 s >= stuck_after: urgent
