"""asyncio event-loop workers (uvicorn's UvicornWorker under gunicorn; issue #6): the loop's thread
serves every request, an idle loop is idle, a blocked loop is stuck, a busy loop is not. On real
py-spy dumps (tests/fixtures/pyspy/README.md, `uvicorn_*`) and on hand-built frames."""

from __future__ import annotations

import pytest
from builders import activity, fixture, proc, py, snapshot, stack

from agent.analysis import AnalysisSettings, Tracker, request_capacity
from agent.signatures import Candidate, load_catalog
from agent.types import Frame, StackSnapshot, ThreadStack, WorkerRef, WorkerState

SETTINGS = AnalysisSettings(stuck_after=10, suspect_after=2, dump_interval=30, native_gap=5)
CATALOG = load_catalog()
DUMPS = [
    "uvicorn_idle.python",
    "uvicorn_idle.native",
    "uvicorn_blocked.python",
    "uvicorn_blocked.native",
    "uvicorn_busy.python",
    "uvicorn_busy.native",
    "uvicorn_uvloop_idle.python",
    "uvicorn_uvloop_idle.native",
    "uvicorn_uvloop_blocked.python",
    "uvicorn_uvloop_blocked.native",
]
IDLE = ["uvicorn_idle.python", "uvicorn_idle.native"]
UVLOOP_IDLE = ["uvicorn_uvloop_idle.python", "uvicorn_uvloop_idle.native"]
BLOCKED = [
    "uvicorn_blocked.python",
    "uvicorn_blocked.native",
    "uvicorn_uvloop_blocked.python",
    "uvicorn_uvloop_blocked.native",
]


def main_thread(snap: StackSnapshot) -> ThreadStack:
    return next(s for s in snap.threads if s.tid == snap.worker.pid)


def frozen(name: str, *, now: float, create_time: float | None = None) -> Tracker:
    """A tracker fed a real dump taken at 2 s, every thread frozen (no CPU) from 0 to `now`.

    `create_time` makes it another worker (same pid, so its main thread is still its main)."""
    snap = fixture(name, at=2)
    if create_time is not None:
        worker = WorkerRef(snap.worker.pid, create_time, master_pid=1)
        snap = snapshot(*snap.threads, at=2, is_native=snap.native, worker=worker)
    t = Tracker(load_catalog(), SETTINGS)
    t.retain([snap.worker])
    threads = tuple(activity(tid=s.tid) for s in snap.threads)
    t.observe_proc(proc(*threads, at=0, worker=snap.worker))
    t.observe_stacks(snap)
    t.observe_proc(proc(*threads, at=now, worker=snap.worker))
    return t


@pytest.mark.parametrize("name", DUMPS)
def test_the_event_loop_thread_of_a_uvicorn_worker_serves_requests(name: str) -> None:
    snap = fixture(name)
    (report,) = frozen(name, now=3).judge(3)
    request = {th.tid for th in report.threads if th.request}
    assert request == {snap.worker.pid}  # the main thread; not the loop's executor thread


@pytest.mark.parametrize("name", IDLE)
def test_an_event_loop_waiting_in_select_is_idle(name: str) -> None:
    rule = CATALOG.idle_rule(main_thread(fixture(name)))
    # The gunicorn rule covers it: selectors.py innermost, gunicorn/workers/base.py below.
    assert rule is not None
    assert rule.name == "gunicorn worker event loop"


@pytest.mark.parametrize("name", UVLOOP_IDLE)
def test_an_idle_uvloop_loop_is_idle_though_py_spy_sees_nothing_inside_it(name: str) -> None:
    rule = CATALOG.idle_rule(main_thread(fixture(name)))
    assert rule is not None
    assert rule.name == "uvloop event loop waiting for I/O (uvicorn[standard])"


@pytest.mark.parametrize("name", [*BLOCKED, "uvicorn_busy.python", "uvicorn_busy.native"])
def test_a_blocked_or_busy_loop_is_not_idle(name: str) -> None:
    assert CATALOG.idle_rule(main_thread(fixture(name))) is None


def test_an_asyncio_loop_in_a_background_thread_waiting_for_io_is_idle() -> None:
    loop_thread = stack(
        py("EpollSelector.select", "selectors.py", 468),
        py("BaseEventLoop._run_once", "asyncio/base_events.py", 1884),
        py("BaseEventLoop.run_forever", "asyncio/base_events.py", 607),
        py("Thread.run", "threading.py", 982),
        tid=7,
        name="apm-event-loop",
    )
    rule = CATALOG.idle_rule(loop_thread)
    assert rule is not None
    assert rule.name == "asyncio event loop waiting for I/O"


@pytest.mark.parametrize("name", [*IDLE, *UVLOOP_IDLE])
def test_an_idle_uvicorn_worker_is_ok_forever_and_at_full_capacity(name: str) -> None:
    (report,) = frozen(name, now=3600).judge(3600)
    assert report.state is WorkerState.OK
    assert request_capacity([report]) == 1.0


@pytest.mark.parametrize(
    "name",
    [*DUMPS[2:], "uvicorn_idle.python"],
)
def test_no_signature_matches_an_event_loop_shape(name: str) -> None:
    snap = fixture(name)
    candidates = [Candidate(s, stuck=CATALOG.idle_rule(s) is None) for s in snap.threads]
    assert [
        sig.name for sig in CATALOG.signatures if CATALOG.assign_roles(sig, candidates)
    ] == []


@pytest.mark.parametrize("name", BLOCKED)
def test_a_blocked_event_loop_is_stuck_and_out_of_capacity(name: str) -> None:
    t = frozen(name, now=10)
    (early,) = t.judge(9.9)
    assert early.state is WorkerState.OK
    (report,) = t.judge(10)
    assert report.state is WorkerState.STUCK
    by_name = {th.name: th for th in report.threads}
    assert by_name["MainThread"].request
    assert by_name["MainThread"].stuck_for == 10
    if "asyncio_0" in by_name:  # an earlier /db's default executor thread, idle
        assert not by_name["asyncio_0"].request
    assert request_capacity([report]) == 0.0


def test_issue_6_two_blocked_uvicorn_workers_give_zero_capacity_one_gives_half() -> None:
    both = [
        *frozen("uvicorn_blocked.native", now=12, create_time=1.0).judge(12),
        *frozen("uvicorn_blocked.python", now=12, create_time=2.0).judge(12),
    ]
    assert [r.state for r in both] == [WorkerState.STUCK, WorkerState.STUCK]
    assert request_capacity(both) == 0.0
    one = [both[0], *frozen("uvicorn_idle.python", now=12).judge(12)]
    assert request_capacity(one) == 0.5


def test_a_loop_busy_with_short_awaits_is_never_stuck() -> None:
    """CPU moves every second and the dumps catch it at different points: running, at capacity."""
    pid = 500
    busy = stack(*main_thread(fixture("uvicorn_busy.native")).frames, tid=pid, is_native=True)
    waiting = stack(*main_thread(fixture("uvicorn_idle.native")).frames, tid=pid, is_native=True)
    worker = WorkerRef(pid=pid, create_time=1.0, master_pid=1)
    t = Tracker(load_catalog(), SETTINGS)
    t.retain([worker])
    for now in range(61):
        cpu = now * 40_000_000  # 40 ms of CPU a second: a loop doing real work
        t.observe_proc(proc(activity(tid=pid, cpu_ns=cpu, runs=now * 500), at=now, worker=worker))
        if now % 3 == 0:
            shape = busy if now % 2 else waiting
            t.observe_stacks(snapshot(shape, at=now + 0.01, is_native=True, worker=worker))
        (report,) = t.judge(now)
        assert report.state is WorkerState.OK, now
        assert request_capacity([report]) == 1.0, now


# Other asyncio worker classes, hand-built from their sources: uvicorn-worker (the package that
# replaces uvicorn.workers) and gunicorn 27's own ASGI worker.
LOOP = (
    py("EpollSelector.select", "selectors.py", 468),
    py("BaseEventLoop._run_once", "asyncio/base_events.py", 1884),
    py("BaseEventLoop.run_forever", "asyncio/base_events.py", 607),
    py("BaseEventLoop.run_until_complete", "asyncio/base_events.py", 640),
)
UVICORN_WORKER_PACKAGE = (
    *LOOP,
    py("Runner.run", "asyncio/runners.py", 118),
    py("UvicornWorker.run", "uvicorn_worker/_workers.py", 101),
    py("Worker.init_process", "gunicorn/workers/base.py", 146),
    py("Arbiter.spawn_worker", "gunicorn/arbiter.py", 752),
)
GUNICORN_ASGI = (
    *LOOP,
    py("ASGIWorker.run", "gunicorn/workers/gasgi.py", 155),
    py("Worker.init_process", "gunicorn/workers/base.py", 146),
    py("ASGIWorker.init_process", "gunicorn/workers/gasgi.py", 52),
    py("Arbiter.spawn_worker", "gunicorn/arbiter.py", 752),
)
# Any other worker class running an asyncio loop on its main thread.
OTHER_ASYNCIO = (
    *LOOP,
    py("Runner.run", "asyncio/runners.py", 118),
    py("run", "asyncio/runners.py", 190),
    py("MyAsgiWorker.run", "myproject/workers.py", 40),
    py("Worker.init_process", "gunicorn/workers/base.py", 146),
)


@pytest.mark.parametrize(
    "frames",
    [UVICORN_WORKER_PACKAGE, GUNICORN_ASGI, OTHER_ASYNCIO],
    ids=["uvicorn-worker-package", "gunicorn-gasgi", "any-asyncio-loop-worker"],
)
def test_the_main_thread_of_any_asyncio_worker_serves_requests(
    frames: tuple[Frame, ...],
) -> None:
    worker = WorkerRef(pid=400, create_time=1.0, master_pid=1)
    t = Tracker(load_catalog(), SETTINGS)
    t.retain([worker])
    t.observe_proc(proc(activity(tid=400), at=0, worker=worker))
    t.observe_stacks(snapshot(stack(*frames, tid=400), at=2, worker=worker))
    (report,) = t.judge(2)
    (main,) = report.threads
    assert main.request
    assert main.stack is not None
    assert CATALOG.idle_rule(main.stack) is not None
    assert request_capacity([report]) == 1.0
