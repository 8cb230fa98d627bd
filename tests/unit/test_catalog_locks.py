"""Issue 8's lock, process, spin and gevent entries (agent/signatures.d/10,40,50,60,90-*.toml):
each matched on a real capture from this machine (tests/fixtures/pyspy/README.md says how), with
the /proc syscall line read for each thread just before the dump; each with near misses that
must not match. The historical entries are matched on hand frames from their reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest
from builders import GTHREAD_IDLE_POOL, GTHREAD_MAIN, GTHREAD_REQUEST, fixture, native, py, stack

from agent.procfs import parse_syscall, syscall_name
from agent.signatures import Candidate, load_catalog
from agent.types import HangClass, StackSnapshot, ThreadActivity, ThreadStack

CATALOG = load_catalog()
BY_NAME = {s.name: s for s in CATALOG.signatures}

# /proc/PID/task/TID/syscall of each captured thread, read just before its dump ("running": on
# a CPU). Copied from the capture runs (README rows).
FUTEX_FOREVER = "202 0x55e5b263d1c0 0x189 0x0 0x0 0x0 0xffffffff 0x7f16027a6750 0x7f16036a3f16"
FUTEX_TIMED = (
    "202 0x7fbd1f94e6f4 0x89 0x0 0x7fbd1e96da40 0x0 0xffffffff 0x7fbd1e96d910 0x7fbd1f2a3f16"
)
SYSCALLS: dict[str, dict[int, str]] = {
    "fork_inherited_lock": {
        13183: "202 0x56020bad7920 0x189 0x0 0x0 0x0 0xffffffff 0x7ffcb7d2ae80 0x7f753dca3f16",
    },
    "import_lock_deadlock": {
        13302: "202 0x7f1144000b70 0x189 0x0 0x0 0x0 0xffffffff 0x7ffce37474a0 0x7f114aea3f16",
        13344: "202 0x562af3a62f50 0x189 0x0 0x0 0x0 0xffffffff 0x7f114a8766c0 0x7f114aea3f16",
    },
    "reentrant_lock_self_deadlock": {
        13451: "202 0x55b1991f3f50 0x189 0x0 0x0 0x0 0xffffffff 0x7fff725f7640 0x7f9d4d4a3e96",
    },
    "exit_join_stuck_thread": {
        13538: "202 0x7f37ac000b70 0x189 0x0 0x0 0x0 0xffffffff 0x7fffb4646640 0x7f37b12a3f16",
        13580: "45 0x4 0x7f37b0c572c0 0x1 0x0 0x0 0x0 0x7f37b0ba2a10 0x7f37b1328974",
    },
    "mp_queue_join_deadlock": {
        13647: "61 0x3578 0x7fff9ee087cc 0x0 0x0 0x0 0x0 0x7fff9ee087b8 0x7f87deaf1bd3",
    },
    "subprocess_pipe_deadlock": {
        14018: "61 0x36ec 0x7ffd4799047c 0x0 0x0 0x0 0x0 0x7ffd47990468 0x7fd0212f1bd3",
    },
    "log_sink_backpressure": {
        14162: "230 0x1 0x1 0x7fffb304e670 0x0 0x0 0x0 0x7fffb304e630 0x7f16036ed545",
        14205: "1 0x1 0x7f15fc001be0 0x7d7 0x0 0x0 0x7f1603d4e6e8 0x7f1602fa76f0 0x7f160371638f",
        14206: "202 0x55e5b263d1c0 0x189 0x0 0x0 0x0 0xffffffff 0x7f16027a6750 0x7f16036a3f16",
        14207: "202 0x55e5b263d1c0 0x189 0x0 0x0 0x0 0xffffffff 0x7f1601fa5750 0x7f16036a3f16",
    },
    "gil_spin_in_c": {
        14360: "running",
        14402: "202 0x7fc4d294e6f0 0x89 0x0 0x7fc4d1bfba40 0x0 0"
        "xffffffff 0x7fc4d1bfb910 0x7fc4d22a3f16",
    },
    "gil_held_blocking_io": {
        14454: "45 0x4 0x7fbd1eed6650 0x10 0x0 0x0 0x0 0x7fffc313f5a0 0x7fbd1f328974",
        14496: "202 0x7fbd1f94e6f4 0x89 0x0 0x7fbd1e96da40 0x0 0"
        "xffffffff 0x7fbd1e96d910 0x7fbd1f2a3f16",
    },
    "gevent_hub_blocked": {
        14788: "45 0xc 0x7f8fb879e0b0 0x10 0x0 0x0 0x0 0x7fff6242ddf0 0x7f8fb9f28974",
        14799: "202 0x55704b1bb620 0x89 0x0 0x7f8fb8488630 0x0 0"
        "xffffffff 0x7f8fb8488580 0x7f8fb9ea3f16",
    },
    "gevent_unpatched_lock": {
        14910: "202 0x559f2f5db930 0x189 0x0 0x0 0x0 0xffffffff 0x7fff7f176930 0x7fcd638a3e96",
    },
}
# The regex thread was on a CPU for the whole run (state R, 100 %): the tracker calls it spinning.
SPINNING = {14360}


def proc_line(tid: int, line: str) -> ThreadActivity:
    """What procfs makes of one thread's syscall line."""
    number, point, timed = parse_syscall(line)
    state = "R" if line == "running" else "S"
    return ThreadActivity(
        tid=tid, start_ticks=1, comm="python", state=state, cpu_ns=0, runs=0, syscall=number,
        wchan=None, blocked_at=point, timed_wait=timed, syscall_name=syscall_name(number),
    )  # fmt: skip


def candidates(
    snap: StackSnapshot, lines: Mapping[int, str], *, stuck: bool = True
) -> list[Candidate]:
    """Every thread as the tracker would give it after --stuck-after: a non-idle thread is
    stuck (or spinning, when it was on a CPU), with its /proc reading."""
    out = []
    for thread in snap.threads:
        line = lines.get(thread.tid)
        act = proc_line(thread.tid, line) if line is not None else None
        busy = stuck and CATALOG.idle_rule(thread) is None
        spinning = busy and thread.tid in SPINNING
        out.append(Candidate(thread, act, stuck=busy and not spinning, spinning=spinning))
    return out


def matched(cands: list[Candidate]) -> set[str]:
    return {s.name for s in CATALOG.signatures if CATALOG.assign_roles(s, cands) is not None}


def capture(entry: str, kind: str) -> list[Candidate]:
    return candidates(fixture(f"{entry}.{kind}"), SYSCALLS[entry])


# Every capture matches its entry and nothing else (each is the others' near miss too).
CAPTURES = [
    (entry, kind)
    for entry in SYSCALLS
    for kind in ("python", "native")
    if not (entry == "gevent_unpatched_lock" and kind == "native")  # py-spy cannot (fact 5)
]
# gil_held_blocking_io is seen only natively: its roles ask for the C frames.
EXPECTED = {("gil_held_blocking_io", "python"): set[str]()}


@pytest.mark.parametrize(("entry", "kind"), CAPTURES, ids=[f"{e}.{k}" for e, k in CAPTURES])
def test_each_real_capture_matches_its_entry_and_no_other(entry: str, kind: str) -> None:
    assert matched(capture(entry, kind)) == EXPECTED.get((entry, kind), {entry})


IDLE = ["idle_gthread.native", "idle_gthread.python", "idle_sync.python", "idle_gevent.python",
        "libpq_alone.native", "uvicorn_idle.native", "uvicorn_blocked.native"]  # fmt: skip


@pytest.mark.parametrize("name", IDLE, ids=IDLE)
def test_healthy_and_unrelated_captures_match_none_of_these_entries(name: str) -> None:
    # Every thread stuck in an untimed futex wait: the /proc half of most entries, given freely.
    snap = fixture(name)
    cands = candidates(snap, {t.tid: FUTEX_FOREVER for t in snap.threads})
    assert matched(cands) & set(SYSCALLS) == set()


def test_nothing_matches_until_the_threads_are_stuck() -> None:
    # The same shapes for less than --stuck-after: a lock briefly contended, an import in
    # progress, a busy logger, a short regex.
    for entry, lines in SYSCALLS.items():
        snap = fixture(f"{entry}.python")
        assert matched(candidates(snap, lines, stuck=False)) == set(), entry


def with_syscall(cands: list[Candidate], tid: int, line: str) -> list[Candidate]:
    return [replace(c, activity=proc_line(tid, line)) if c.stack.tid == tid else c for c in cands]


@pytest.mark.parametrize(
    ("entry", "tid"),
    [
        ("fork_inherited_lock", 13183),
        ("import_lock_deadlock", 13302),
        ("reentrant_lock_self_deadlock", 13451),
        ("exit_join_stuck_thread", 13538),
        ("gevent_unpatched_lock", 14910),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_lock_wait_with_a_timeout_is_not_these_forever_waits(entry: str, tid: int) -> None:
    # acquire(timeout=...), join(timeout): futex op 0x89 with a timeout pointer.
    cands = with_syscall(capture(entry, "python"), tid, FUTEX_TIMED)
    assert entry not in matched(cands)


def test_fork_inherited_lock_is_vetoed_by_a_thread_inside_the_logging_code() -> None:
    # The log-sink capture: the waiters' lock has a holder in this worker (blocked in write).
    # Without that holder (its thread gone), the same waiters are an inherited lock.
    cands = capture("log_sink_backpressure", "python")
    assert "fork_inherited_lock" not in matched(cands)
    without_holder = [c for c in cands if c.stack.tid != 14205]
    assert "fork_inherited_lock" in matched(without_holder)


def test_fork_inherited_lock_ignores_a_queue_listener_waiting_for_records() -> None:
    listener = stack(
        py("Condition.wait", "threading.py", 320), py("Queue.get", "queue.py", 171),
        py("QueueListener.dequeue", "logging/handlers.py", 1525),
        py("QueueListener._monitor", "logging/handlers.py", 1571),
        py("Thread.run", "threading.py", 975), tid=7, name="Thread-1 (_monitor)",
    )  # fmt: skip
    cands = capture("fork_inherited_lock", "python")
    sig = BY_NAME["fork_inherited_lock"]
    assert CATALOG.assign_roles(sig, cands, [Candidate(listener)]) == (0,)


def test_log_sink_needs_the_writer_blocked_in_write() -> None:
    # Momentary contention: the holder is on a CPU, formatting; or sleeping between records.
    cands = capture("log_sink_backpressure", "python")
    assert "log_sink_backpressure" not in matched(with_syscall(cands, 14205, "running"))
    assert "log_sink_backpressure" not in matched(
        with_syscall(cands, 14205, "7 0x7ffd5e0 0x1 0x64 0x0 0x0 0x0 0x7ffd5a8 0x7f3c1e2d")
    )


def test_the_import_cycle_needs_the_importer_waiting_too() -> None:
    # First import of a heavy module: the importer is running, another thread briefly waits.
    cands = capture("import_lock_deadlock", "python")
    running = [replace(c, stuck=False) if c.stack.tid == 13302 else c for c in cands]
    assert matched(running) == set()
    waiter_alone = [c for c in cands if c.stack.tid == 13344]
    assert matched(waiter_alone) == set()


def test_the_regex_is_a_spin_only_while_spinning() -> None:
    cands = capture("gil_spin_in_c", "native")
    assert matched([replace(c, spinning=False) for c in cands]) == set()


def test_gil_held_io_needs_a_thread_starved_of_the_gil() -> None:
    # A plain blocking recv (the GIL released: sock_recv) beside a stuck thread: not this.
    assert "gil_held_blocking_io" not in matched(capture("exit_join_stuck_thread", "native"))
    # The ctypes recv with nobody waiting for the GIL (the sleeper not stuck): not this either.
    cands = capture("gil_held_blocking_io", "native")
    calm = [replace(c, stuck=False) if c.stack.tid == 14496 else c for c in cands]
    assert matched(calm) == set()


def test_a_process_wait_is_named_by_the_api_that_waits() -> None:
    assert matched(capture("mp_queue_join_deadlock", "native")) == {"mp_queue_join_deadlock"}
    assert matched(capture("subprocess_pipe_deadlock", "native")) == {"subprocess_pipe_deadlock"}
    communicate = stack(
        py("Popen._try_wait", "subprocess.py", 2004), py("Popen._wait", "subprocess.py", 2046),
        py("Popen.wait", "subprocess.py", 1264), py("Popen.communicate", "subprocess.py", 1209),
        py("render_pdf", "app.py", 9), tid=9,
    )  # fmt: skip
    line = SYSCALLS["subprocess_pipe_deadlock"][14018]
    assert matched([Candidate(communicate, proc_line(9, line), stuck=True)]) == set()


def test_gevent_entries_tell_io_from_a_lock() -> None:
    hub = capture("gevent_hub_blocked", "python")
    assert matched(hub) == {"gevent_hub_blocked"}
    as_lock = with_syscall(hub, 14788, FUTEX_FOREVER)
    assert matched(as_lock) == {"gevent_unpatched_lock"}
    # A gevent threadpool thread in its own lock wait is no hub.
    assert matched(with_syscall(hub, 14799, FUTEX_FOREVER)) == {"gevent_hub_blocked"}


# ---------------------------------------------------------------------------------------------
# Frames only: gthread_loop_spin (not reproducible with gunicorn 27) and the historical entries.
# ---------------------------------------------------------------------------------------------

LIBPYTHON = "/usr/lib/libpython3.11.so.1.0"
LIBGOMP = "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
CYGRPC = "/venv/lib/python3.11/site-packages/grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so"
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.1.0.0"
LIBCRYPTO = "/usr/lib/x86_64-linux-gnu/libcrypto.so.1.0.0"


def hand(*threads: tuple[ThreadStack, bool, bool]) -> list[Candidate]:
    return [Candidate(s, None, stuck=stuck, spinning=spin) for s, stuck, spin in threads]


LOOP_SPIN = stack(py("ThreadWorker.murder_keepalived", "gunicorn/workers/gthread.py", 205),
                  py("ThreadWorker.run", "gunicorn/workers/gthread.py", 430), tid=100)  # fmt: skip
HEAD_LOCK_A = stack(
    native("pthread_cond_timedwait", "libc.so.6"), native("take_gil", LIBPYTHON),
    native("PyEval_RestoreThread", LIBPYTHON), native("_PyThread_CurrentFrames", LIBPYTHON),
    native("sys__current_frames", LIBPYTHON), py("TraceCache.save_trace",
    "newrelic/core/trace_cache.py", 120), tid=201, is_native=True,
)  # fmt: skip
HEAD_LOCK_B = stack(
    native("PyThread_acquire_lock_timed", LIBPYTHON), native("tstate_delete_common", LIBPYTHON),
    native("_PyThreadState_DeleteCurrent", LIBPYTHON), native("pythread_wrapper", LIBPYTHON),
    tid=202, is_native=True,
)  # fmt: skip
GRPC_CHILD = stack(
    native("syscall", "libc.so.6"), native("AbslInternalSpinLockDelay", CYGRPC),
    native("absl::lts_20240116::base_internal::SpinLock::SlowLock", CYGRPC),
    py("Channel.__call__", "grpc/_channel.py", 1160), tid=301, is_native=True,
)  # fmt: skip
GRPC_POLLER = stack(native("epoll_wait", "libc.so.6"), native("0x7f0000", CYGRPC), tid=302,
                    is_native=True)  # fmt: skip
GOMP_WAITER = stack(
    native("0x7f1", LIBGOMP), native("gomp_team_start", LIBGOMP),
    native("GOMP_parallel", LIBGOMP), native("0x7f2", "/venv/torch/lib/libtorch_cpu.so"),
    py("predict", "app.py", 30), *GTHREAD_REQUEST, tid=401, is_native=True,
)  # fmt: skip
GOMP_TEAM = stack(native("0x7f3", LIBGOMP), native("0x7f4", LIBGOMP),
                  native("start_thread", "libc.so.6"), tid=402, is_native=True)  # fmt: skip
SSL_A = stack(
    native("__lll_lock_wait", "libc.so.6"), native("take_gil", LIBPYTHON),
    native("PyGILState_Ensure", LIBPYTHON), native("Cryptography_osrandom_bytes", "_openssl.so"),
    native("RAND_bytes", LIBCRYPTO), native("RSA_sign", LIBCRYPTO),
    native("SSL_do_handshake", LIBSSL), py("SSLSocket.do_handshake", "ssl.py", 1342),
    tid=501, is_native=True,
)  # fmt: skip
SSL_B = stack(
    native("__lll_lock_wait", "libc.so.6"), native("pthread_mutex_lock", "libc.so.6"),
    native("_ssl_thread_locking_function", "_ssl.so"), native("CRYPTO_lock", LIBCRYPTO),
    native("SSL_free", LIBSSL), native("PySSL_dealloc", "_ssl.so"),
    py("HTTPConnection.close", "http/client.py", 960), tid=502, is_native=True,
)  # fmt: skip


@pytest.mark.parametrize(
    ("threads", "expected"),
    [
        ([(LOOP_SPIN, False, True), (stack(*GTHREAD_IDLE_POOL, tid=101), False, False)],
         {"gthread_loop_spin"}),
        # near miss: the loop busy for a moment (not spinning), or idle in its select (a
        # spinning loop is caught in its select too: that is the bug, and it matches).
        ([(LOOP_SPIN, False, False)], set()),
        ([(stack(*GTHREAD_MAIN, tid=100), False, False)], set()),
        # near miss: a request spinning in app code on a pool thread.
        ([(stack(py("render", "app.py", 3), *GTHREAD_REQUEST, tid=102), False, True)], set()),
        ([(HEAD_LOCK_A, True, False), (HEAD_LOCK_B, True, False)],
         {"interpreter_head_lock_deadlock"}),
        # near miss: a thread briefly in teardown; a profiler whose call returns.
        ([(HEAD_LOCK_A, False, False), (HEAD_LOCK_B, True, False)], set()),
        ([(HEAD_LOCK_B, True, False)], set()),
        ([(GRPC_CHILD, True, False), (GRPC_POLLER, False, False)], {"grpc_after_fork"}),
        # near miss: gRPC's own poller idling in epoll_wait.
        ([(GRPC_POLLER, True, False)], set()),
        ([(GOMP_WAITER, True, False)], {"openmp_after_fork"}),
        # near miss: the same wait in a process that has its team (the master, a fresh child).
        ([(GOMP_WAITER, True, False), (GOMP_TEAM, False, False)], set()),
        ([(SSL_A, True, False), (SSL_B, True, False)], {"openssl_1_0_gil_lock_inversion"}),
        # near miss: one side only (a handshake waiting for the GIL for a moment, a busy free).
        ([(SSL_B, True, False)], set()),
        ([(SSL_A, True, False)], set()),
    ],
    ids=["loop_spin", "loop_busy_not_spinning", "loop_idle_in_select", "request_spin",
         "head_lock", "head_lock_walker_returns", "head_lock_teardown_alone",
         "grpc_after_fork", "grpc_poller_idle", "openmp_after_fork", "openmp_team_present",
         "openssl_inversion", "openssl_free_alone", "openssl_handshake_alone"],
)  # fmt: skip
def test_frames_only_entries(
    threads: list[tuple[ThreadStack, bool, bool]], expected: set[str]
) -> None:
    assert matched(hand(*threads)) == expected


NEW = [*SYSCALLS, "gthread_loop_spin", "interpreter_head_lock_deadlock", "grpc_after_fork",
       "openmp_after_fork", "openssl_1_0_gil_lock_inversion"]  # fmt: skip


@pytest.mark.parametrize("name", NEW, ids=NEW)
def test_every_entry_has_a_class_remedy_and_an_issue_link(name: str) -> None:
    sig = BY_NAME[name]
    assert sig.hang_class in HangClass
    assert len(sig.remedy) > 200 and "Now:" in sig.remedy
    assert any(r.startswith("https://github.com/") for r in sig.references)
    spin = sig.hang_class is HangClass.SPIN
    assert any(r.spinning for r in sig.roles) == spin
