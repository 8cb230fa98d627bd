"""Tracker, dump planning, verdicts and incidents: pure, with the clock passed in."""

from __future__ import annotations

import pytest
from builders import (
    GTHREAD_IDLE_POOL,
    GTHREAD_MAIN,
    GTHREAD_REQUEST,
    POLL_POINT,
    WORKER,
    activity,
    fixture,
    native,
    proc,
    py,
    snapshot,
    stack,
)

from agent.analysis import (
    AnalysisSettings,
    IncidentBook,
    Tracker,
    request_capacity,
)
from agent.signatures import load_catalog
from agent.types import DumpKind, ThreadActivity, ThreadState, WorkerRef, WorkerState

SETTINGS = AnalysisSettings(stuck_after=10, suspect_after=2, dump_interval=30, native_gap=5)
MAIN, POOL, OTHER = 100, 101, 102

IN_LIBPQ = (
    native("poll", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    native("PQsocketPoll", "/site-packages/psycopg2_binary.libs/libpq-a17e3caa.so.5.17"),
    native("PQconnectdb", "/site-packages/psycopg2_binary.libs/libpq-a17e3caa.so.5.17"),
    py("connect", "psycopg2/__init__.py", 122),
    *GTHREAD_REQUEST,
)
IN_HANDSHAKE = (
    native("read", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    native("BIO_read", "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"),
    py("SSLSocket.do_handshake", "ssl.py", 1383),
    py("harvest", "app.py", 5),
)


def tracker(**overrides: float) -> Tracker:
    settings = AnalysisSettings(**{**SETTINGS.__dict__, **overrides})
    t = Tracker(load_catalog(), settings)
    t.retain([WORKER])
    return t


def states(t: Tracker, now: float) -> dict[int, ThreadState]:
    (report,) = t.judge(now)
    return {th.tid: th.state for th in report.threads}


def dump(t: Tracker, at: float, *stacks_: tuple[int, tuple], is_native: bool = False) -> None:  # type: ignore[type-arg]
    t.observe_stacks(
        snapshot(*(stack(*frames, tid=tid, is_native=is_native) for tid, frames in stacks_),
                 at=at, is_native=is_native)
    )  # fmt: skip


def test_a_blocked_thread_is_stuck_exactly_after_stuck_after() -> None:
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=5, runs=10), at=0))
    dump(t, 2.5, (POOL, IN_LIBPQ))
    for now in (1, 2, 3, 4, 5, 6, 7, 8, 9):
        t.observe_proc(proc(activity(tid=POOL, cpu_ns=5, runs=10), at=now))
        assert states(t, now)[POOL] is ThreadState.RUNNING, now
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=5, runs=10), at=10))
    (report,) = t.judge(10)
    assert report.threads[0].state is ThreadState.STUCK
    assert report.threads[0].stuck_for == 10
    assert report.state is WorkerState.STUCK


def test_an_idle_thread_is_never_stuck() -> None:
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL), activity(tid=MAIN), at=0))
    dump(t, 0.5, (POOL, GTHREAD_IDLE_POOL), (MAIN, GTHREAD_MAIN))
    t.observe_proc(proc(activity(tid=POOL), activity(tid=MAIN), at=3600))
    assert set(states(t, 3600).values()) == {ThreadState.IDLE}


class Sim:
    """Drives a Tracker the way the Monitor does, once a second: scan, plan, dump (which costs a
    blocked thread a few microseconds and two context switches), re-scan, judge."""

    def __init__(self, t: Tracker, frames: tuple = IN_LIBPQ, resolution_ns: int = 1,  # type: ignore[type-arg]
                 timed: bool = False) -> None:  # fmt: skip
        self.t, self.frames, self.resolution, self.timed = t, frames, resolution_ns, timed
        self.cpu = self.runs = 0
        self.point = POLL_POINT
        self.dumps = 0
        self.scan(0)

    def scan(self, at: float, *, after_dump: bool = False) -> None:
        sample = proc(activity(tid=POOL, cpu_ns=self.cpu, runs=self.runs, point=self.point,
                               timed=self.timed), at=at, resolution_ns=self.resolution)  # fmt: skip
        self.t.observe_proc(sample, after_dump=after_dump)

    def second(self, now: float, *, cpu_ns: int = 0, runs: int = 0, dump_cost_ns: int = 20_000
               ) -> ThreadState:  # fmt: skip
        """One more second in which the thread used cpu_ns and was scheduled `runs` times."""
        self.cpu += cpu_ns
        self.runs += runs
        self.scan(now)
        for _, kind in self.t.plan(now):
            self.dumps += 1
            dump(self.t, now + 0.01, (POOL, self.frames), is_native=kind is DumpKind.NATIVE)
            self.cpu += dump_cost_ns
            self.runs += 2
            self.scan(now + 0.02, after_dump=True)
        return states(self.t, now + 0.03)[POOL]


TIMED, UNTIMED = True, False
TICK = 10_000_000


@pytest.mark.parametrize(
    ("cpu_per_second", "runs_per_second", "timed", "resolution", "stuck"),
    [
        (0, 0, UNTIMED, 1, True),
        (0, 3, UNTIMED, 1, True),  # woken without CPU (someone else's ptrace, a spurious wake)
        (15_000, 1, UNTIMED, 1, True),  # someone else's py-spy dumping it every other second
        (500_000, 10, TIMED, 1, True),  # psycopg 3 waiting in 100 ms poll slices, 50 us a wake
        (1_030_000, 13, TIMED, 1, True),  # the costliest poller measured (Event.wait(0.1) loop)
        (3_000_000, 7, UNTIMED, 1, False),  # serving 2 s queries: ~6 ms per request
        (3_000_000, 14, TIMED, 1, False),  # ...seen as restart_syscall after a dump
        (27_000, 1, UNTIMED, 1, False),  # the slowest stream measured: 100 B a second, asleep
        (386_000, 5, UNTIMED, 1, False),  # the busiest stream measured
        (5_000_000, 5, UNTIMED, 1, False),  # light work
        (0, 0, UNTIMED, TICK, True),  # no schedstat: clock ticks
        (TICK, 2, UNTIMED, TICK, True),  # ...where 1 tick per 2 s is a ptrace's noise
        (2 * TICK, 2, UNTIMED, TICK, False),
    ],
    ids=["frozen", "woken-without-cpu", "foreign-ptrace", "psycopg3-poll-slices",
         "event-wait-loop", "2s-queries", "2s-queries-restarted", "slowest-stream",
         "busiest-stream", "light-work", "ticks-frozen", "ticks-noise", "ticks-busy"],
)  # fmt: skip
def test_progress_is_cpu_nanoseconds_beyond_what_a_blocked_thread_accrues(
    cpu_per_second: int, runs_per_second: int, timed: bool, resolution: int, stuck: bool
) -> None:
    sim = Sim(tracker(), resolution_ns=resolution, timed=timed)
    verdicts = [
        sim.second(now, cpu_ns=cpu_per_second, runs=runs_per_second) for now in range(1, 31)
    ]
    assert (verdicts[-1] is ThreadState.STUCK) is stuck
    if not stuck:  # and never once on the way
        assert ThreadState.STUCK not in verdicts


def test_a_healthy_thread_on_the_same_line_is_never_stuck_however_often_it_is_dumped() -> None:
    # Back-to-back 2 s queries: every dump catches it at the same line; 1.4 ms per request.
    sim = Sim(tracker(stuck_after=5))
    verdicts = []
    for now in range(1, 61):
        verdicts.append(sim.second(now, cpu_ns=1_400_000 if now % 2 else 0, runs=4 * (now % 2)))
    assert ThreadState.STUCK not in verdicts


def test_a_stuck_thread_that_resumes_light_work_leaves_stuck_within_suspect_after() -> None:
    # It was stuck for 15 s, re-dumped all along; each re-dump must not throw away what it
    # earned since (the old re-baseline kept it stuck in 60 of 60 cycles).
    sim = Sim(tracker(stuck_after=10, suspect_after=2))
    for now in range(1, 16):
        sim.second(now)
    assert states(sim.t, 15.5)[POOL] is ThreadState.STUCK
    resumed = [sim.second(now, cpu_ns=5_000_000, runs=5) for now in range(16, 76)]
    first_ok = resumed.index(ThreadState.RUNNING)
    assert first_ok + 1 <= 2 + 1, resumed  # within suspect_after + 1 s
    assert ThreadState.STUCK not in resumed[first_ok:]


def test_a_stuck_thread_polling_in_slices_is_not_redumped_every_cycle() -> None:
    # psycopg 3: wakes 10 times a second at the same blocking point, with no progress: its
    # stack is still the one dumped, and it is stuck.
    sim = Sim(tracker(), timed=True)
    for now in range(1, 31):
        state = sim.second(now, cpu_ns=500_000, runs=10)
    assert state is ThreadState.STUCK
    assert sim.dumps <= 4, sim.dumps  # the first look, the native one, the new-stuck one


def test_a_thread_woken_to_another_blocking_point_is_redumped() -> None:
    sim = Sim(tracker())
    for now in range(1, 12):
        sim.second(now)
    assert states(sim.t, 11.5)[POOL] is ThreadState.STUCK
    dumps = sim.dumps
    sim.point = "0x5 0x7ffd 0x10 0x0 0x0 0x0 0x7ffd5a8 0x7f3c1e99"  # it moved, cheaply
    sim.second(12, runs=2)
    assert sim.dumps == dumps + 1


def test_our_own_dump_does_not_count_as_the_thread_running() -> None:
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL, runs=10), at=0))
    dump(t, 3, (POOL, IN_LIBPQ), is_native=True)
    # The dump stopped the thread: +2 voluntary switches, seen by the re-baselining scan.
    t.observe_proc(proc(activity(tid=POOL, runs=12), at=3.01), after_dump=True)
    t.observe_proc(proc(activity(tid=POOL, runs=12), at=4))
    assert t.plan(4) == []
    t.observe_proc(proc(activity(tid=POOL, runs=12), at=10))
    assert states(t, 10)[POOL] is ThreadState.STUCK


def test_a_stuck_thread_woken_by_someone_elses_ptrace_stays_stuck_and_is_rechecked() -> None:
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL, runs=10), at=0))
    dump(t, 3, (POOL, IN_LIBPQ), is_native=True)
    t.observe_proc(proc(activity(tid=POOL, runs=10), at=11))
    assert states(t, 11)[POOL] is ThreadState.STUCK
    t.observe_proc(proc(activity(tid=POOL, runs=14), at=12))  # an outside py-spy came by
    assert states(t, 12)[POOL] is ThreadState.STUCK
    # Re-checked now, not after suspect_after; natively, as it has just become stuck.
    assert t.plan(12) == [(WORKER, DumpKind.NATIVE)]
    dump(t, 12.1, (POOL, IN_LIBPQ), is_native=True)
    t.observe_proc(proc(activity(tid=POOL, runs=16), at=12.2), after_dump=True)
    (report,) = t.judge(13)
    assert report.threads[0].state is ThreadState.STUCK
    assert report.threads[0].stuck_for == 13  # unchanged since it stopped at 0


def test_a_changed_stack_restarts_the_clock() -> None:
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL, runs=1), at=0))
    dump(t, 3, (POOL, IN_LIBPQ))
    t.observe_proc(proc(activity(tid=POOL, runs=5), at=6))  # it ran
    dump(t, 8, (POOL, (py("other", "app.py", 3), *GTHREAD_REQUEST)))
    t.observe_proc(proc(activity(tid=POOL, runs=5), at=12))
    assert states(t, 12)[POOL] is ThreadState.RUNNING
    t.observe_proc(proc(activity(tid=POOL, runs=5), at=16))
    assert states(t, 16)[POOL] is ThreadState.STUCK


def test_plan_is_cheap_when_all_is_quiet_and_seen() -> None:
    t = tracker(dump_interval=300)
    t.observe_proc(proc(activity(tid=POOL), activity(tid=MAIN), at=0))
    assert t.plan(0) == [(WORKER, DumpKind.PYTHON)]  # never dumped: first look
    dump(t, 0.1, (POOL, GTHREAD_IDLE_POOL), (MAIN, GTHREAD_MAIN))
    for now in range(1, 30):  # the main thread wakes (heartbeats) at the same point
        t.observe_proc(proc(activity(tid=POOL), activity(tid=MAIN, runs=now), at=now))
        assert t.plan(now) == [], now
    # The pool thread serves requests (real CPU) and comes back to the very futex it was
    # dumped idle in: its idle stack is its stack again, no dump needed.
    for now in range(30, 60):
        cpu = (now - 29) * 2_000_000
        t.observe_proc(proc(activity(tid=POOL, cpu_ns=cpu, runs=now), activity(tid=MAIN), at=now))
        assert t.plan(now) == [], now
    assert states(t, 60)[POOL] is ThreadState.IDLE
    # A thread that keeps running elsewhere is looked at again after --dump-interval.
    for now in range(60, 302, 2):
        t.observe_proc(proc(activity(tid=POOL, cpu_ns=60_000_000), activity(
            tid=MAIN, cpu_ns=now * 1_000_000, point=f"0x{now:x} 0x1 0x0 0x7ffd 0x7f1"), at=now))
        planned = t.plan(now)
        assert planned == ([] if now < 300.1 else [(WORKER, DumpKind.PYTHON)]), now


def test_plan_escalates_python_then_native_for_a_busy_looking_quiet_thread() -> None:
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL), at=0))
    dump(t, 0.1, (POOL, GTHREAD_IDLE_POOL))
    def busy(**kw: int) -> ThreadActivity:  # took a request: blocked elsewhere than idle
        return activity(tid=POOL, point="0x9 0x1 0xffffffff 0x7ffd 0x7f2", **kw)
    t.observe_proc(proc(busy(cpu_ns=900_000, runs=3), at=1))
    t.observe_proc(proc(busy(cpu_ns=900_000, runs=3), at=2))
    assert t.plan(2) == []  # quiet for 1 s only
    t.observe_proc(proc(busy(cpu_ns=900_000, runs=3), at=3))
    assert t.plan(3) == [(WORKER, DumpKind.PYTHON)]  # quiet 2 s, stack unseen since it ran
    dump(t, 3.1, (POOL, (py("connect", "psycopg2/__init__.py", 122), *GTHREAD_REQUEST)))
    t.observe_proc(proc(busy(cpu_ns=900_000, runs=5), at=3.2), after_dump=True)
    t.observe_proc(proc(busy(cpu_ns=900_000, runs=5), at=4))
    assert t.plan(4) == [(WORKER, DumpKind.NATIVE)]  # not idle: which library is it in?
    dump(t, 4.1, (POOL, IN_LIBPQ), is_native=True)
    t.observe_proc(proc(busy(cpu_ns=900_000, runs=7), at=4.2), after_dump=True)
    t.observe_proc(proc(busy(cpu_ns=900_000, runs=7), at=5))
    assert t.plan(5) == []  # known, native, current: nothing more to learn


def test_native_dumps_respect_the_gap_and_the_switch() -> None:
    t = tracker(native=False)
    t.observe_proc(proc(activity(tid=POOL), at=0))
    dump(t, 0.1, (POOL, (py("connect", "psycopg2/__init__.py", 122), *GTHREAD_REQUEST)))
    t.observe_proc(proc(activity(tid=POOL), at=3))
    assert t.plan(3) == []  # --no-native: Python frames are all we will get
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL), at=0))
    dump(t, 0.1, (POOL, GTHREAD_REQUEST), is_native=True)
    dump(t, 1, (POOL, (py("x", "app.py"), *GTHREAD_REQUEST)))
    t.observe_proc(proc(activity(tid=POOL), at=3))
    assert t.plan(3) == []  # last native dump 2.9 s ago < native_gap 5 s
    assert t.plan(5.2) == [(WORKER, DumpKind.NATIVE)]


def real(name: str, *, frozen_from: float, now: float) -> Tracker:
    """A tracker fed a real fixture dump, with every thread frozen since `frozen_from`."""
    snap = fixture(name, at=frozen_from + 2)
    t = Tracker(load_catalog(), SETTINGS)
    t.retain([snap.worker])
    threads = tuple(activity(tid=s.tid) for s in snap.threads)
    t.observe_proc(proc(*threads, at=frozen_from, worker=snap.worker))
    t.observe_stacks(snap)
    t.observe_proc(proc(*threads, at=now, worker=snap.worker))
    return t


def test_real_libpq_ssl_with_https_dump_is_deadlocked_after_stuck_after() -> None:
    t = real("libpq_ssl_with_https.native", frozen_from=0, now=9)
    (early,) = t.judge(9)
    assert early.state is WorkerState.OK
    assert not early.findings
    (report,) = t.judge(10)
    assert report.state is WorkerState.DEADLOCKED
    (finding,) = report.findings
    assert finding.signature.name == "libpq_ssl_with_https"
    roles = dict(finding.threads)
    assert roles["https"].name == "NR-Harvest-Thread"
    assert roles["libpq"].request
    assert request_capacity([report]) == 0.0  # every request thread of this worker hung


def test_real_libpq_alone_dump_is_stuck_not_deadlocked() -> None:
    (report,) = real("libpq_alone.native", frozen_from=0, now=10).judge(10)
    assert report.state is WorkerState.STUCK
    assert report.findings == ()
    harvest = next(th for th in report.threads if th.name == "NR-Harvest-Thread")
    assert harvest.state is ThreadState.IDLE


def test_real_idle_workers_are_ok_and_their_request_threads_known() -> None:
    (gthread,) = real("idle_gthread.python", frozen_from=0, now=100).judge(100)
    assert gthread.state is WorkerState.OK
    assert {th.state for th in gthread.threads} == {ThreadState.IDLE}
    assert sum(th.request for th in gthread.threads) == 4  # the pool, not the main thread
    (sync,) = real("idle_sync.python", frozen_from=0, now=100).judge(100)
    assert [th.request for th in sync.threads] == [True]  # sync: the main thread serves
    assert request_capacity([gthread, sync]) == 1.0


def test_a_busy_https_thread_caught_mid_call_is_not_inside_openssl() -> None:
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL), activity(tid=OTHER), at=0))
    dump(t, 2.1, (POOL, IN_LIBPQ), (OTHER, IN_HANDSHAKE), is_native=True)
    for now in range(3, 12):  # the HTTPS thread keeps running: it is not blocked in OpenSSL
        t.observe_proc(proc(activity(tid=POOL), activity(tid=OTHER, cpu_ns=now * 5_000_000),
                             at=now))  # fmt: skip
    (report,) = t.judge(11)
    assert report.state is WorkerState.STUCK


def test_respawned_worker_state_is_dropped() -> None:
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL), at=0))
    dump(t, 2, (POOL, IN_LIBPQ))
    t.observe_proc(proc(activity(tid=POOL), at=11))
    assert t.judge(11)[0].state is WorkerState.STUCK
    reborn = WorkerRef(pid=WORKER.pid, create_time=WORKER.create_time + 11, master_pid=1)
    t.retain([reborn])  # same pid, new process
    assert t.workers == (reborn,)
    t.observe_proc(proc(activity(tid=POOL), at=12, worker=reborn))
    (report,) = t.judge(12)
    assert report.worker == reborn
    assert report.state is WorkerState.OK


def test_incidents_are_opened_once_held_while_stuck_and_resolved() -> None:
    book = IncidentBook()
    t = real("libpq_ssl_with_https.native", frozen_from=0, now=10)
    reports = t.judge(10)
    opened, resolved = book.update(reports, 10)
    assert [i.signature_name for i in opened] == ["libpq_ssl_with_https"] and resolved == []
    for now in (11, 12, 13):
        assert book.update(reports, now) == ([], [])
    # Still stuck but the HTTPS thread moved on: same incident, not a new one.
    stuck_only = [r.__class__(r.worker, WorkerState.STUCK, r.threads, ()) for r in reports]
    assert book.update(stuck_only, 14) == ([], [])
    assert book.totals["libpq_ssl_with_https"] == 1
    ok = [r.__class__(r.worker, WorkerState.OK, r.threads, ()) for r in reports]
    opened, resolved = book.update(ok, 15)
    assert opened == [] and [i.resolved_at for i in resolved] == [15]
    assert book.open == ()
    book.update(reports, 20)  # a new hang of the same worker is a new incident
    assert book.totals["libpq_ssl_with_https"] == 2


def test_incident_resolves_when_its_worker_is_gone() -> None:
    book = IncidentBook()
    reports = real("libpq_ssl_with_https.native", frozen_from=0, now=10).judge(10)
    book.update(reports, 10)
    opened, resolved = book.update([], 11)
    assert opened == [] and len(resolved) == 1


def test_a_long_stuck_worker_without_signature_becomes_one_incident() -> None:
    book = IncidentBook(stuck_incident_after=30)
    t = real("libpq_alone.native", frozen_from=0, now=10)
    assert book.update(t.judge(10), 10) == ([], [])  # stuck, but not for long enough
    opened, _ = book.update(t.judge(30), 30)
    (incident,) = opened
    assert incident.signature is None and incident.signature_name == "none"
    assert incident.verdict is WorkerState.STUCK
    assert {role for role, _ in incident.threads} == {"stuck"}
    assert "no known signature" in incident.summary and incident.remedy
    assert book.update(t.judge(40), 40) == ([], [])
    assert book.totals == {}  # not a deadlock: deadlocks_detected_total does not move


def test_a_worker_py_spy_cannot_unwind_gets_python_dumps_only() -> None:
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL), at=0))
    dump(t, 0.1, (POOL, (py("connect", "psycopg2/__init__.py", 122), *GTHREAD_REQUEST)))
    t.observe_proc(proc(activity(tid=POOL), at=3))
    assert t.plan(3) == [(WORKER, DumpKind.NATIVE)]
    t.native_failed(WORKER)  # e.g. gevent: py-spy says UNW_EINVAL
    assert not t.native_allowed(WORKER)
    assert t.plan(3) == []
    assert t.plan(400) == []  # it has not run: nothing to refresh
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=5_000_000, point="0x5 0x1 0x0 0x7ffd 0x7f9"),
                        at=401))  # fmt: skip
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=5_000_000, point="0x5 0x1 0x0 0x7ffd 0x7f9"),
                        at=404))  # fmt: skip
    assert t.plan(404) == [(WORKER, DumpKind.PYTHON)]  # ran, now quiet elsewhere: Python only


def test_a_background_thread_stuck_alone_leaves_the_worker_ok_and_no_incident() -> None:
    # The APM harvest thread in a dead TLS handshake, request threads idle: the thread is
    # honestly stuck, but the worker serves at full capacity and nobody is paged.
    t = tracker()
    t.observe_proc(proc(activity(tid=POOL), activity(tid=OTHER), activity(tid=MAIN), at=0))
    dump(t, 0.1, (POOL, GTHREAD_IDLE_POOL), (OTHER, IN_HANDSHAKE), (MAIN, GTHREAD_MAIN))
    t.observe_proc(proc(activity(tid=POOL), activity(tid=OTHER), activity(tid=MAIN), at=100))
    (report,) = t.judge(100)
    by_tid = {th.tid: th for th in report.threads}
    assert by_tid[OTHER].state is ThreadState.STUCK and not by_tid[OTHER].request
    assert report.state is WorkerState.OK
    assert request_capacity([report]) == 1.0
    book = IncidentBook(stuck_incident_after=30)
    assert book.update([report], 100) == ([], [])


def test_a_stack_seen_twice_across_progress_is_not_stuck_time() -> None:
    # A pool thread caught by two dumps 6 s apart on the same line of two different requests,
    # then back to idle work-queue waits with its re-dump put off (the dump budget): it made
    # progress since its last dump, so that stack is history, never a reason to call it stuck.
    t = tracker(stuck_after=5)
    busy = (py("_busy", "app.py", 42), *GTHREAD_REQUEST)
    point = "0x9 0x1 0xffffffff 0x7ffd 0x7f2"
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=1_000_000, point=point), at=0))
    dump(t, 0.1, (POOL, busy))
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=9_000_000, runs=9, point=point), at=6))
    dump(t, 6.1, (POOL, busy))  # the same line again: a different request
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=9_000_000, runs=9, point=point), at=6.2),
                   after_dump=True)  # fmt: skip
    # It finishes (progress) and waits for work elsewhere; no dump is taken.
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=15_000_000, runs=20), at=7))
    for now in range(8, 30):
        t.observe_proc(proc(activity(tid=POOL, cpu_ns=15_000_000, runs=20), at=now))
        assert states(t, now)[POOL] is not ThreadState.STUCK, now


def test_a_thread_that_hangs_after_progress_is_stuck_once_a_dump_sees_it() -> None:
    t = tracker(stuck_after=5)
    t.observe_proc(proc(activity(tid=POOL), at=0))
    dump(t, 0.1, (POOL, GTHREAD_IDLE_POOL))
    hung = "0x55aa 0x189 0x0 0x7ffd 0x7f9"  # a plain lock, taken twice
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=3_000_000, runs=5, point=hung), at=10))
    for now in (11, 12):
        t.observe_proc(proc(activity(tid=POOL, cpu_ns=3_000_000, runs=5, point=hung), at=now))
        assert states(t, now)[POOL] is ThreadState.IDLE  # its last known stack, until seen
    assert t.plan(12) == [(WORKER, DumpKind.PYTHON)]  # quiet 2 s, unseen
    dump(t, 12.1, (POOL, (py("acquire", "app.py", 7), *GTHREAD_REQUEST)))
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=3_000_000, runs=7, point=hung), at=12.2),
                   after_dump=True)  # fmt: skip
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=3_000_000, runs=7, point=hung), at=14.9))
    assert states(t, 14.9)[POOL] is ThreadState.RUNNING  # 4.9 s since its last progress
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=3_000_000, runs=7, point=hung), at=15))
    assert states(t, 15)[POOL] is ThreadState.STUCK
