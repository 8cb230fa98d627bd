"""Native lock proof against real processes: a C library built here with the system compiler,
loaded through ctypes into a plain Python process and into a real gunicorn gthread worker, whose
threads deadlock on pthread mutexes for real. procfs reads the waits from /proc and the target's
memory; locks.prove() must name the cycle and the orphan, and claim nothing for condition
variables and Python locks."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.demo.run import Gunicorn
from agent.locks import LockProof, mutex_futex, prove
from agent.procfs import read_lock_waits
from agent.pyspy import PySpy
from agent.types import WorkerRef

pytestmark = pytest.mark.integration

MACHINE = os.uname().machine

LIBRARY = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

static pthread_mutex_t a = PTHREAD_MUTEX_INITIALIZER, b = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t both_hold_one;
static pthread_mutex_t orphaned = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t relocked = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t held = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t inherited = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t cond_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t never = PTHREAD_COND_INITIALIZER;
static atomic_int holding;

__attribute__((constructor)) static void init(void) {
    pthread_barrier_init(&both_hold_one, NULL, 2);
}

/* Two threads take two mutexes in inverted order; the barrier makes the deadlock certain. */
void lock_ab(void) {
    pthread_mutex_lock(&a);
    pthread_barrier_wait(&both_hold_one);
    pthread_mutex_lock(&b);
}
void lock_ba(void) {
    pthread_mutex_lock(&b);
    pthread_barrier_wait(&both_hold_one);
    pthread_mutex_lock(&a);
}

/* Locked by a thread that then exits: nobody is left to unlock it. */
void take_orphan(void) { pthread_mutex_lock(&orphaned); }
void lock_orphan(void) { pthread_mutex_lock(&orphaned); }

/* A default (non-recursive) mutex locked twice by one thread. */
void relock(void) { pthread_mutex_lock(&relocked); pthread_mutex_lock(&relocked); }

/* Held by a thread that sleeps forever: its waiters are an edge, not a proof. */
static void hold(pthread_mutex_t *mutex, int bit) {
    pthread_mutex_lock(mutex);
    atomic_fetch_or(&holding, bit);
    for (;;) pause();
}
void hold_forever(void) { hold(&held, 1); }
void hold_inherited(void) { hold(&inherited, 2); }
int holding_now(void) { return atomic_load(&holding); }
void lock_held(void) { pthread_mutex_lock(&held); }
void lock_inherited(void) { pthread_mutex_lock(&inherited); }

/* A condition variable nobody signals. */
void cond_forever(void) {
    pthread_mutex_lock(&cond_mutex);
    for (;;) pthread_cond_wait(&never, &cond_mutex);
}
"""

# Imported by the plain process and by the gunicorn app: each scenario starts its threads and
# returns their tids once they exist. NATIVE_LOCKS_HOLD_IN_MASTER: the importing process (the
# gunicorn master, with --preload) holds a mutex in a thread, so every worker inherits it held.
SCENARIOS = r'''
import ctypes, os, threading, time

lib = ctypes.CDLL(os.environ["NATIVE_LOCKS_LIB"])


def start(target, name):
    """Start a daemon thread that calls `target`; its tid once it runs."""
    box = []
    ready = threading.Event()

    def run():
        box.append(threading.get_native_id())
        ready.set()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait(10)
    return box[0], thread


def wait_holding(bit):
    deadline = time.monotonic() + 10
    while not lib.holding_now() & bit and time.monotonic() < deadline:
        time.sleep(0.01)


def deadlocks():
    tids = {"ab": start(lib.lock_ab, "ab")[0], "ba": start(lib.lock_ba, "ba")[0]}
    tids["orphan_owner"], owner = start(lib.take_orphan, "orphan-owner")
    owner.join(10)
    tids["orphan_waiter"] = start(lib.lock_orphan, "orphan-waiter")[0]
    tids["relock"] = start(lib.relock, "relock")[0]
    tids["holder"] = start(lib.hold_forever, "holder")[0]
    wait_holding(1)
    tids["contended"] = start(lib.lock_held, "contended")[0]
    return tids


def controls():
    def lock_twice():
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()

    def condition_wait():
        condition = threading.Condition()
        with condition:
            condition.wait()

    return {
        "c_condvar": start(lib.cond_forever, "c-condvar")[0],
        "python_lock_twice": start(lock_twice, "python-lock-twice")[0],
        "python_condition": start(condition_wait, "python-condition")[0],
    }


def inherited():
    return {"owner": MASTER_HOLDER, "waiter": start(lib.lock_inherited, "inherited")[0]}


MASTER_HOLDER = None
if os.environ.get("NATIVE_LOCKS_HOLD_IN_MASTER"):
    MASTER_HOLDER = start(lib.hold_inherited, "master-holder")[0]
    wait_holding(2)

SCENARIOS = {"deadlocks": deadlocks, "controls": controls, "inherited": inherited}
'''

APP = r"""
import json, os
from nativelocks import SCENARIOS


def app(environ, start_response):
    path = environ["PATH_INFO"]
    body = {"pid": os.getpid()}
    if path.startswith("/scenario/"):
        body["tids"] = SCENARIOS[path.rsplit("/", 1)[1]]()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
"""

PLAIN = r"""
import json, sys, threading
from nativelocks import SCENARIOS

print(json.dumps(SCENARIOS[sys.argv[1]]()), flush=True)
threading.Event().wait()  # the main thread: a Python lock wait too
"""


def build_library(where: Path) -> Path:
    """Build LIBRARY into `where` with the system compiler; returns the .so.

    Skips (saying why) only off CI: under CI (scripts/test installs gcc) a missing compiler or
    an unknown mutex layout is a failure, since these tests prove the native lock proof."""
    problem = None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if MACHINE not in ("x86_64", "aarch64"):
        problem = f"the glibc mutex layout is only known for x86_64 and aarch64, not {MACHINE}"
    elif compiler is None:
        problem = "no C compiler (cc or gcc) on PATH to build the mutex test library"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{problem} (CI must run the native lock tests)")
        pytest.skip(problem)
    assert compiler is not None
    (where / "nativelocks.c").write_text(LIBRARY)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-pthread", "-o",
         str(where / "libnativelocks.so"), str(where / "nativelocks.c")],
        check=True, timeout=60, capture_output=True,
    )  # fmt: skip
    return where / "libnativelocks.so"


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the built library and the Python modules that use it."""
    where = tmp_path_factory.mktemp("native-locks")
    build_library(where)
    (where / "nativelocks.py").write_text(SCENARIOS)
    (where / "nativeapp.py").write_text(APP)
    (where / "plain.py").write_text(PLAIN)
    return where


def env_for(scripts: Path, **extra: str) -> dict[str, str]:
    return {"NATIVE_LOCKS_LIB": str(scripts / "libnativelocks.so"), **extra}


@pytest.fixture
def plain(scripts: Path) -> Iterator[Callable[[str], tuple[int, dict[str, int]]]]:
    """Start `python plain.py SCENARIO`; (pid, tids) once it printed its threads."""
    started: list[subprocess.Popen[str]] = []

    def run(scenario: str) -> tuple[int, dict[str, int]]:
        proc = subprocess.Popen(
            [sys.executable, str(scripts / "plain.py"), scenario], cwd=scripts,
            env={**os.environ, **env_for(scripts), "PYTHONPATH": str(scripts)},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        assert line, f"no readiness line; exit {proc.poll()}"
        return proc.pid, json.loads(line)

    try:
        yield run
    finally:
        for proc in started:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def proof_of(pid: int, done: Callable[[LockProof], bool], timeout: float = 10.0) -> LockProof:
    """Read and prove until `done` holds (the threads reach their waits) or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        waits, tids, elsewhere = read_lock_waits(pid)
        proof = prove(waits, tids, alive_elsewhere=elsewhere)
        if done(proof) or time.monotonic() > deadline:
            return proof
        time.sleep(0.05)


def expected_deadlocks(tids: dict[str, int]) -> tuple[Any, ...]:
    """(cycles, orphans, waiter -> owner) of the `deadlocks` scenario."""
    pair = (min(tids["ab"], tids["ba"]), max(tids["ab"], tids["ba"]))
    cycles = tuple(sorted([pair, (tids["relock"],)]))
    orphans = ((tids["orphan_waiter"], tids["orphan_owner"]),)
    owners = {
        tids["ab"]: tids["ba"], tids["ba"]: tids["ab"], tids["relock"]: tids["relock"],
        tids["orphan_waiter"]: tids["orphan_owner"], tids["contended"]: tids["holder"],
    }  # fmt: skip
    return cycles, orphans, owners


def check_deadlocks(pid: int, tids: dict[str, int]) -> LockProof:
    cycles, orphans, owners = expected_deadlocks(tids)
    proof = proof_of(pid, lambda p: (p.cycles, p.orphans) == (cycles, orphans))
    print(f"\npid {pid} threads {tids}\nproof {proof}")
    assert not Path(f"/proc/{tids['orphan_owner']}").exists(), "the owner's tid was reused"
    assert proof.cycles == cycles
    assert proof.orphans == orphans
    # Every edge, and only those: the holder sleeping in pause() is no waiter.
    assert {waiter: owner for waiter, _, owner in proof.edges} == owners
    return proof


def syscall_line(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/syscall").read_text()


def check_controls(pid: int, tids: dict[str, int]) -> None:
    """Every control thread sits in a futex wait that is not a mutex wait, and nothing is
    claimed for any thread of the process: no cycle, no orphan, not even an edge."""
    waiting = list(tids.values())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = {tid: syscall_line(pid, tid) for tid in waiting}
        if all(line.startswith(("202 ", "98 ")) for line in lines.values()):
            break
        time.sleep(0.05)
    print(f"\npid {pid} threads {tids}")
    for tid, line in lines.items():
        print(f"  {tid}: {line.strip()}")
    assert all(line.startswith(("202 ", "98 ")) for line in lines.values()), lines
    assert all(mutex_futex(line, MACHINE) is None for line in lines.values())
    waits, live, elsewhere = read_lock_waits(pid)
    assert set(waiting) <= live
    assert waits == ()
    assert prove(waits, live, alive_elsewhere=elsewhere) == LockProof((), (), ())


def test_a_plain_process_deadlock_cycle_relock_and_orphan_are_proven(plain: Any) -> None:
    pid, tids = plain("deadlocks")
    check_deadlocks(pid, tids)


def test_a_plain_process_waiting_on_condvars_and_python_locks_proves_nothing(
    plain: Any,
) -> None:
    pid, tids = plain("controls")
    check_controls(pid, {**tids, "main_thread_event_wait": pid})


def start_gunicorn(tmp_path: Path, scripts: Path, *extra: str, **env: str) -> Gunicorn:
    gunicorn = Gunicorn(
        tmp_path, env_for(scripts, **env), worker_class="gthread", workers=1, threads=2,
        extra_args=("--pythonpath", str(scripts), *extra), app="nativeapp:app",
    )  # fmt: skip
    try:
        gunicorn.wait_ready(workers=1)
    except BaseException:
        gunicorn.stop()
        raise
    return gunicorn


def scenario(gunicorn: Gunicorn, name: str) -> tuple[int, dict[str, int]]:
    with urllib.request.urlopen(f"{gunicorn.url}/scenario/{name}", timeout=20) as response:
        body = json.loads(response.read())
    assert body["pid"] in gunicorn.worker_pids()
    return int(body["pid"]), body["tids"]


LOCK_FRAME = re.compile(r"pthread_mutex_(lock|timedlock|clocklock)|__lll_lock_wait")


def test_a_gunicorn_worker_deadlocked_in_native_mutexes_is_proven(
    tmp_path: Path, scripts: Path
) -> None:
    gunicorn = start_gunicorn(tmp_path, scripts)
    try:
        pid, tids = scenario(gunicorn, "deadlocks")
        proof = check_deadlocks(pid, tids)
        # What py-spy shows for those threads (one dump; the ptrace stop must not end a wait).
        worker = WorkerRef(pid, psutil.Process(pid).create_time(), gunicorn.pid)
        snapshot = PySpy("py-spy", timeout=30).dump(worker, native=True)
        stacks = {thread.tid: thread for thread in snapshot.threads}
        for name in ("ab", "ba", "relock", "orphan_waiter", "contended"):
            frames = stacks[tids[name]].frames
            native = [frame for frame in frames if frame.native][:3]
            print(f"  {name} ({tids[name]}): " + " <- ".join(str(frame) for frame in native))
            assert any(LOCK_FRAME.search(frame.function) for frame in native), native
        assert proof_of(pid, lambda p: p == proof, timeout=2) == proof
        assert gunicorn.proc.poll() is None
    finally:
        gunicorn.stop()


def test_a_gunicorn_worker_waiting_on_condvars_and_python_locks_proves_nothing(
    tmp_path: Path, scripts: Path
) -> None:
    gunicorn = start_gunicorn(tmp_path, scripts)
    try:
        pid, tids = scenario(gunicorn, "controls")
        check_controls(pid, tids)
    finally:
        gunicorn.stop()


def test_a_mutex_held_in_the_preloading_master_is_an_orphan_in_its_worker(
    tmp_path: Path, scripts: Path
) -> None:
    """--preload: a master thread holds a mutex while gunicorn forks; the worker's copy is owned
    by a thread that lives on in the master (its parent), never in the worker: an orphan."""
    gunicorn = start_gunicorn(tmp_path, scripts, "--preload", NATIVE_LOCKS_HOLD_IN_MASTER="1")
    try:
        pid, tids = scenario(gunicorn, "inherited")
        owner = tids["owner"]
        assert Path(f"/proc/{gunicorn.pid}/task/{owner}").exists()  # alive, in the master
        proof = proof_of(pid, lambda p: bool(p.orphans))
        print(f"\nworker {pid}, master {gunicorn.pid}, threads {tids}\nproof {proof}")
        assert proof.orphans == ((tids["waiter"], owner),)
        assert proof.cycles == ()
    finally:
        gunicorn.stop()
