"""Issue 8 end to end: real gunicorn apps (tests/integration/apps/locks_*.py) watched by the
real agent (`python -m agent watch`), which must name the hang, with its remedy, in /incidents:
a lock inherited across fork under --preload, a regex spin, a native mutex cycle between two
request threads and a mutex orphaned by the fork. Each has a healthy twin that must give no
incident, and threads waiting on a C condition variable or a Python lock must give no proof."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import AgentProcess
from test_native_locks import build_library

from agent.demo.run import Gunicorn, fire, get
from agent.signatures import load_catalog

pytestmark = pytest.mark.integration

APPS = Path(__file__).resolve().parent / "apps"
REMEDY = {s.name: s.remedy for s in load_catalog().signatures}
# Shared CPU (2 cores): generous waits, the agent at its quickest.
VERDICT_WAIT = 40.0
AGENT_ARGS = ("--stuck-after", "3", "--stuck-incident-after", "3", "--interval", "1")
# A healthy twin is watched this long: over three times what a hang takes to become an incident.
QUIET_FOR = 10.0


@contextlib.contextmanager
def served(
    tmp_path: Path,
    app: str,
    *extra: str,
    env: dict[str, str] | None = None,
    worker_class: str = "gthread",
    threads: int = 2,
) -> Iterator[tuple[Gunicorn, AgentProcess]]:
    """gunicorn (one worker) serving apps/`app`, and the agent watching its master."""
    gunicorn = Gunicorn(
        tmp_path, env or {}, worker_class=worker_class, workers=1, threads=threads,
        extra_args=("--pythonpath", str(APPS), "--timeout", "120", *extra), app=app,
    )  # fmt: skip
    agent = None
    try:
        gunicorn.wait_ready(workers=1)
        agent = AgentProcess(tmp_path, ["--master-pid", str(gunicorn.pid), *AGENT_ARGS])
        agent.wait_for("the worker watched and ok",
                       lambda m: m.value("deadlock_agent_workers", state="ok") == 1,
                       timeout=VERDICT_WAIT)  # fmt: skip
        yield gunicorn, agent
    finally:
        if agent is not None:
            agent.stop()
        gunicorn.stop()


def incident(agent: AgentProcess, signature: str, timeout: float = VERDICT_WAIT) -> Any:
    """The full record of the first incident named `signature`, waiting for it."""
    deadline = time.monotonic() + timeout
    listing: Any = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            listing = agent.get_json("/incidents")
            for item in listing:
                if item.get("signature") == signature:
                    return agent.get_json(item["url"])
        time.sleep(0.5)
    raise AssertionError(
        f"no {signature} incident after {timeout:g}s; /incidents: {listing}\n"
        f"agent log:\n{agent.log()[-3000:]}"
    )


def quiet_for(agent: AgentProcess, gunicorn: Gunicorn, paths: list[str], seconds: float) -> None:
    """Requests keep succeeding for `seconds`, and the agent records no incident."""
    until = time.monotonic() + seconds
    statuses = []
    while time.monotonic() < until:
        statuses.extend(get(gunicorn.url + p, timeout=10) for p in paths)
        m = agent.scrape()
        assert m.value("deadlock_agent_workers", state="ok") == 1, agent.log()[-3000:]
        time.sleep(0.5)
    assert set(statuses) == {200}, statuses
    assert agent.get_json("/incidents") == [], agent.log()[-3000:]


def check(record: Any, signature: str, verdict: str, pid: int) -> None:
    print(f"\n{signature}: {record['verdict']} worker {record['worker_pid']}")
    for thread in record["threads"]:
        print(f"  {thread['role']}: {thread['tid']} {thread['name']} {thread['top_frames'][:3]}")
    assert record["signature"] == signature
    assert record["verdict"] == verdict
    assert record["worker_pid"] == pid
    assert record["remedy"] == REMEDY[signature]
    assert record["references"]


# ---------------------------------------------------------------------------------------------
# fork_inherited_lock
# ---------------------------------------------------------------------------------------------


def test_a_lock_held_by_a_master_thread_at_fork_deadlocks_the_worker(tmp_path: Path) -> None:
    with served(tmp_path, "locks_preload_app:app", "--preload",
                env={"LOCKS_HOLD_IN_MASTER": "1"}) as (gunicorn, agent):  # fmt: skip
        (pid,) = gunicorn.worker_pids()
        fire(gunicorn.url + "/log", count=1, timeout=120)
        record = incident(agent, "fork_inherited_lock")
        check(record, "fork_inherited_lock", "deadlocked", pid)
        (waiter,) = record["threads"]
        assert waiter["role"] == "waiter"
        assert any("Condition.__enter__" in f for f in waiter["top_frames"])
        # The worker still answers what does not log: only the inherited lock is dead.
        assert get(gunicorn.url + "/", timeout=10) == 200


def test_the_same_preload_app_without_the_master_thread_is_healthy(tmp_path: Path) -> None:
    with served(tmp_path, "locks_preload_app:app", "--preload") as (gunicorn, agent):
        quiet_for(agent, gunicorn, ["/log", "/"], QUIET_FOR)


# ---------------------------------------------------------------------------------------------
# gil_spin_in_c
# ---------------------------------------------------------------------------------------------


def test_a_catastrophic_regex_in_a_request_is_a_spin(tmp_path: Path) -> None:
    with served(tmp_path, "locks_regex_app:app") as (gunicorn, agent):
        (pid,) = gunicorn.worker_pids()
        fire(gunicorn.url + "/regex?n=40", count=1, timeout=120)
        record = incident(agent, "gil_spin_in_c")
        check(record, "gil_spin_in_c", "spinning", pid)
        (spinner,) = record["threads"]
        assert spinner["state"] == "spinning"
        m = agent.scrape()
        assert m.value("deadlock_agent_workers", state="spinning") == 1


def test_short_regexes_are_no_spin(tmp_path: Path) -> None:
    with served(tmp_path, "locks_regex_app:app") as (gunicorn, agent):
        quiet_for(agent, gunicorn, ["/regex?n=12", "/regex?n=16", "/"], QUIET_FOR)


# ---------------------------------------------------------------------------------------------
# native_mutex_cycle, orphaned_mutex, and the controls
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_native_locks.py's C library, built here with the system compiler."""
    return build_library(tmp_path_factory.mktemp("locks-native"))


def test_two_request_threads_in_a_native_mutex_cycle_are_proven_deadlocked(
    tmp_path: Path, native_lib: Path
) -> None:
    with served(tmp_path, "locks_native_app:app",
                env={"LOCKS_NATIVE_LIB": str(native_lib)}) as (gunicorn, agent):  # fmt: skip
        (pid,) = gunicorn.worker_pids()
        fire(gunicorn.url + "/ab", count=1, timeout=120)
        fire(gunicorn.url + "/ba", count=1, timeout=120)
        record = incident(agent, "native_mutex_cycle")
        check(record, "native_mutex_cycle", "deadlocked", pid)
        threads = record["threads"]
        assert len(threads) == 2
        tids = {t["tid"] for t in threads}
        # Each waits for the other: the roles name the owner, which is the other thread.
        for thread in threads:
            (other,) = tids - {thread["tid"]}
            assert thread["role"].startswith(f"waits for {other} "), thread["role"]
            assert thread["name"].startswith("ThreadPoolExecutor"), thread["name"]
        m = agent.scrape()
        assert m.value("deadlock_agent_workers", state="deadlocked") == 1


def test_a_mutex_held_by_the_preloading_master_is_an_orphan_in_the_worker(
    tmp_path: Path, native_lib: Path
) -> None:
    env = {"LOCKS_NATIVE_LIB": str(native_lib), "LOCKS_NATIVE_HOLD_IN_MASTER": "1"}
    with served(tmp_path, "locks_native_app:app", "--preload", env=env) as (gunicorn, agent):
        (pid,) = gunicorn.worker_pids()
        fire(gunicorn.url + "/inherited", count=1, timeout=120)
        record = incident(agent, "orphaned_mutex")
        check(record, "orphaned_mutex", "deadlocked", pid)
        (waiter,) = record["threads"]
        owner = int(waiter["role"].split()[2].rstrip(","))
        assert Path(f"/proc/{gunicorn.pid}/task/{owner}").exists()  # a thread of the master
        assert not Path(f"/proc/{pid}/task/{owner}").exists()
        assert "gone" in waiter["role"]


def test_the_native_app_without_faults_is_healthy(tmp_path: Path, native_lib: Path) -> None:
    with served(tmp_path, "locks_native_app:app",
                env={"LOCKS_NATIVE_LIB": str(native_lib)}) as (gunicorn, agent):  # fmt: skip
        quiet_for(agent, gunicorn, ["/"], QUIET_FOR)


def test_waits_on_a_c_condition_variable_and_a_python_lock_prove_nothing(
    tmp_path: Path, native_lib: Path
) -> None:
    with served(tmp_path, "locks_native_app:app", threads=3,
                env={"LOCKS_NATIVE_LIB": str(native_lib)}) as (gunicorn, agent):  # fmt: skip
        fire(gunicorn.url + "/condwait", count=1, timeout=120)
        fire(gunicorn.url + "/pylock", count=1, timeout=120)
        # Two request threads stuck for good: the worker is stuck, never deadlocked.
        agent.wait_for("the worker stuck",
                       lambda m: m.value("deadlock_agent_workers", state="stuck") == 1,
                       timeout=VERDICT_WAIT)  # fmt: skip
        until = time.monotonic() + 10
        while time.monotonic() < until:
            m = agent.scrape()
            assert not m.value("deadlock_agent_workers", state="deadlocked"), agent.log()
            time.sleep(0.5)
        listing = agent.get_json("/incidents")
        print(f"\n/incidents: {listing}")
        assert all(i["verdict"] != "deadlocked" for i in listing), listing
        assert not {i.get("signature") for i in listing} & {"native_mutex_cycle",
                                                            "orphaned_mutex"}  # fmt: skip
