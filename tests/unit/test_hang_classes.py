"""Issue 8's verdict machinery: hang classes drive the worker verdict, spinning is its own
state, roles can ask about the syscall, the wait, the thread name and what must be absent,
and a lock proof read from memory is reported as native_mutex_cycle / orphaned_mutex."""

from __future__ import annotations

from dataclasses import replace

from builders import GTHREAD_IDLE_POOL, GTHREAD_REQUEST, WORKER, activity, proc, py, snapshot, stack

from agent.analysis import AnalysisSettings, Tracker
from agent.locks import LockProof
from agent.signatures import Candidate, load_catalog
from agent.types import (
    FramePattern,
    HangClass,
    Role,
    Signature,
    ThreadState,
    Wait,
    WorkerState,
)

SETTINGS = AnalysisSettings(stuck_after=10, suspect_after=2, dump_interval=30, native_gap=5)
CATALOG = load_catalog()
POOL, OTHER = 101, 102
REGEX_SPIN = (py("Pattern.match", "re/__init__.py", 166), py("validate", "app.py", 7),
              *GTHREAD_REQUEST)  # fmt: skip
BUSY_A = (py("render", "app.py", 20), *GTHREAD_REQUEST)
BUSY_B = (py("serialize", "app.py", 40), *GTHREAD_REQUEST)


def tracker(catalog: object = CATALOG) -> Tracker:
    t = Tracker(CATALOG if catalog is CATALOG else catalog, SETTINGS)  # type: ignore[arg-type]
    t.retain([WORKER])
    return t


def busy_for(t: Tracker, seconds: int, shapes: dict[int, tuple]) -> list[ThreadState]:  # type: ignore[type-arg]
    """A pool thread on a CPU all along; dumps wherever the plan asks, showing shapes[s]."""
    seen = []
    cpu = 0
    shape = shapes[0]
    for s in range(seconds + 1):
        cpu += 950_000_000  # 95 % of a core each second
        shape = shapes.get(s, shape)
        t.observe_proc(proc(activity(tid=POOL, cpu_ns=cpu, runs=10 * s, point=None), at=s))
        for _ref, _kind in t.plan(float(s)):
            t.observe_stacks(snapshot(stack(*shape, tid=POOL), at=s))
        (report,) = t.judge(float(s))
        seen.append(report.threads[0].state)
    return seen


def test_a_thread_on_a_cpu_in_the_same_function_for_stuck_after_is_spinning() -> None:
    t = tracker()
    seen = busy_for(t, 12, {0: REGEX_SPIN})
    assert ThreadState.SPINNING not in seen[:10]
    assert seen[10:] == [ThreadState.SPINNING] * 3
    (report,) = t.judge(12.0)
    assert report.state is WorkerState.SPINNING  # a request thread spins
    assert report.threads[0].stuck_for >= 10


def test_a_busy_request_moving_through_its_code_is_never_spinning() -> None:
    # On a CPU all along, but each dump finds it somewhere else.
    t = tracker()
    shapes = (BUSY_A, BUSY_B, REGEX_SPIN)
    seen = busy_for(t, 30, {s: shapes[s % 3] for s in range(31)})
    assert ThreadState.SPINNING not in seen
    assert ThreadState.STUCK not in seen


def test_a_short_burst_of_cpu_in_one_function_is_not_spinning() -> None:
    t = tracker()
    seen = busy_for(t, 8, {0: REGEX_SPIN})
    t.observe_proc(proc(activity(tid=POOL, cpu_ns=9 * 950_000_000, runs=90), at=9.0))
    (report,) = t.judge(9.0)
    assert ThreadState.SPINNING not in seen
    assert report.threads[0].state is not ThreadState.SPINNING
    assert report.state is WorkerState.OK


def role(**kw: object) -> Role:
    return Role(name="r", any_of=(FramePattern(file="app\\.py$"),), **kw)  # type: ignore[arg-type]


def test_roles_can_ask_for_the_syscall_the_wait_and_the_thread_name() -> None:
    s = stack(py("fetch", "app.py"), tid=POOL, name="NR-Harvest-Thread")
    recv = replace(activity(tid=POOL), syscall_name="recvfrom", timed_wait=False)
    poll = replace(activity(tid=POOL), syscall_name="poll", timed_wait=True)
    assert CATALOG.role_matches(role(syscall=("recvfrom", "read")), s, recv)
    assert not CATALOG.role_matches(role(syscall=("recvfrom", "read")), s, poll)
    assert not CATALOG.role_matches(role(syscall=("recvfrom",)), s, None)  # unknown: no
    assert CATALOG.role_matches(role(wait=Wait.FOREVER), s, recv)
    assert not CATALOG.role_matches(role(wait=Wait.FOREVER), s, poll)
    assert CATALOG.role_matches(role(wait=Wait.TIMED), s, poll)
    assert CATALOG.role_matches(role(thread="^NR-"), s, recv)
    assert not CATALOG.role_matches(role(thread="^NR-"), replace(s, name="Thread-3"),
                                    replace(recv, comm="python"))  # fmt: skip


def test_an_absent_role_vetoes_the_match_when_any_other_thread_fits_it() -> None:
    waiter = Role(name="waiter", stuck=True, any_of=(FramePattern(function="acquire"),))
    holder = Role(name="holder", absent=True, any_of=(FramePattern(function="holding"),))
    sig = Signature("orphan_like", "s", "restart", (waiter, holder), HangClass.DEADLOCK)
    stuck = Candidate(stack(py("acquire", "x.py"), tid=1), stuck=True)
    busy_holder = Candidate(stack(py("holding", "x.py"), tid=2))
    bystander = Candidate(stack(py("other", "x.py"), tid=3))
    assert CATALOG.assign_roles(sig, [stuck], [bystander]) == (0,)
    assert CATALOG.assign_roles(sig, [stuck], [busy_holder]) is None
    assert CATALOG.assign_roles(sig, [stuck, busy_holder]) is None


def stuck_pair(t: Tracker) -> None:
    """Two request threads blocked in a futex wait for 12 s, their stacks seen."""
    futex = "0x7f00aa 0x80 0x2 0x7ffe10 0x7f3c01"
    t.observe_proc(proc(*(replace(activity(tid=tid, point=futex), syscall_name="futex")
                          for tid in (POOL, OTHER)), at=0))  # fmt: skip
    lock_frames = (py("lock_ab", "native_locks.py", 3), *GTHREAD_REQUEST)
    t.observe_stacks(snapshot(stack(*lock_frames, tid=POOL), stack(*lock_frames, tid=OTHER), at=3))
    for s in (5, 8, 11, 13):
        t.observe_proc(replace(proc(at=s), tids=frozenset({POOL, OTHER})))
        t.judge(float(s))


def test_a_proven_mutex_cycle_makes_the_worker_deadlocked_naming_both_threads() -> None:
    t = tracker()
    stuck_pair(t)
    assert t.lock_suspects() == [WORKER]
    (before,) = t.judge(13.0)
    assert before.state is WorkerState.STUCK and not before.findings
    t.observe_locks(WORKER, LockProof(
        cycles=((POOL, OTHER),), orphans=(),
        edges=((POOL, 0x1000, OTHER), (OTHER, 0x2000, POOL)),
    ))  # fmt: skip
    (report,) = t.judge(14.0)
    assert report.state is WorkerState.DEADLOCKED
    (finding,) = report.findings
    assert finding.signature.name == "native_mutex_cycle"
    assert [(r, th.tid) for r, th in finding.threads] == [
        (f"waits for {OTHER} (mutex 0x1000)", POOL), (f"waits for {POOL} (mutex 0x2000)", OTHER),
    ]


def test_an_orphaned_mutex_names_the_waiter_and_the_gone_owner() -> None:
    t = tracker()
    stuck_pair(t)
    t.observe_locks(WORKER, LockProof(cycles=(), orphans=((POOL, 4242),),
                                      edges=((POOL, 0x1000, 4242),)))  # fmt: skip
    (report,) = t.judge(14.0)
    assert report.state is WorkerState.DEADLOCKED
    assert [(f.signature.name, [r for r, _ in f.threads]) for f in report.findings] == [
        ("orphaned_mutex", ["waits for 4242, gone (mutex 0x1000)"])
    ]


def test_no_proof_no_claim_and_a_proof_about_threads_not_stuck_is_ignored() -> None:
    t = tracker()
    stuck_pair(t)
    t.observe_locks(WORKER, LockProof(cycles=(), orphans=(), edges=()))
    (report,) = t.judge(14.0)
    assert report.state is WorkerState.STUCK and not report.findings
    t2 = tracker()
    t2.observe_proc(proc(activity(tid=POOL), at=0))
    t2.observe_stacks(snapshot(stack(*GTHREAD_IDLE_POOL, tid=POOL), at=1))
    t2.observe_locks(WORKER, LockProof(cycles=((POOL, OTHER),), orphans=(), edges=()))
    (idle,) = t2.judge(20.0)
    assert idle.state is WorkerState.OK and not idle.findings
    assert t2.lock_suspects() == []
