"""The mission, end to end: real gunicorn gthread workers doing real queries through psycopg2 over
TLS to a real PostgreSQL 15, a real HTTPS harvest thread, and `deadlock-agent watch` as a real
process, judged only through its /metrics.

Set DEADLOCK_AGENT_CAPTURE=DIR to also save raw `py-spy dump --json` output of the hung workers
(that is how tests/fixtures/pyspy/ was made).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from harness import AgentProcess, App, Metrics, py_spy_dump, running_app
from pgserver import PgServer

pytestmark = pytest.mark.integration

STUCK_AFTER = 5.0
SIG = "libpq_ssl_with_https"


def deadlocked(m: Metrics) -> float:
    return m.value("deadlock_agent_deadlocked_workers", signature=SIG) or 0.0


def incidents(m: Metrics) -> float:
    return m.value("deadlock_agent_deadlocks_detected_total", signature=SIG) or 0.0


def workers(m: Metrics, state: str) -> float:
    return m.value("deadlock_agent_workers", state=state) or 0.0


def worker_states(m: Metrics) -> dict[str, str]:
    """pid -> state, from the opt-in per-worker series."""
    return {
        dict(labels)["pid"]: dict(labels)["state"]
        for labels, value in m.series("deadlock_agent_worker_state").items()
        if value == 1
    }


def capture(name: str, pid: int) -> None:
    target = os.environ.get("DEADLOCK_AGENT_CAPTURE")
    if not target:
        return
    Path(target).mkdir(parents=True, exist_ok=True)
    for native in (False, True):
        suffix = "native" if native else "python"
        Path(target, f"{name}.{suffix}.json").write_text(py_spy_dump(pid, native=native))


def start_agent(tmp_path: Path, app: App) -> AgentProcess:
    agent = AgentProcess(
        tmp_path,
        [
            "--master-pid", str(app.gunicorn.pid),
            "--stuck-after", str(STUCK_AFTER),
            "--web.worker-labels",
        ],
    )  # fmt: skip
    agent.wait_for("first cycle with both workers", lambda m: workers(m, "ok") == 2, timeout=20)
    return agent


def test_healthy_traffic_then_libpq_ssl_with_https_deadlock(
    tmp_path: Path, postgres: PgServer
) -> None:
    with running_app(tmp_path, postgres) as app:
        agent = start_agent(tmp_path, app)
        try:
            # >= 20 s of healthy traffic: fresh TLS connections per request, slow but
            # progressing queries (pg_sleep(2) < stuck-after), and the HTTPS harvest thread.
            app.traffic(["/db", "/slow?seconds=2", "/db", "/"], concurrency=4)
            healthy_until = time.monotonic() + 20
            scrapes = 0
            while time.monotonic() < healthy_until:
                m = agent.scrape()
                scrapes += 1
                assert workers(m, "deadlocked") == 0, m
                assert workers(m, "stuck") == 0, m
                assert m.value("deadlock_agent_threads", state="stuck") == 0, m
                assert deadlocked(m) == 0
                assert m.value("deadlock_agent_up") == 1
                time.sleep(0.5)
            app.stop_traffic()
            assert app.results.get(200, 0) >= 20, app.results
            assert set(app.results) == {200}, f"healthy phase had failures: {app.results}"
            m = agent.scrape()
            assert incidents(m) == 0
            assert m.value("deadlock_agent_samples_total", method="pyspy")
            capacity_before = m.value("deadlock_agent_request_capacity_ratio")
            assert capacity_before == 1.0, m
            assert scrapes >= 30

            # The fault: new PostgreSQL TLS handshakes stall after SSLRequest, and the HTTPS
            # endpoint the harvest thread posts to stalls too.
            app.database.stall()
            app.harvest.stall()
            fault_at = time.monotonic()
            app.traffic(["/db"], concurrency=16)
            m, _ = agent.wait_for(
                "libpq_ssl_with_https", lambda m: deadlocked(m) >= 1, timeout=STUCK_AFTER + 15
            )
            elapsed = time.monotonic() - fault_at
            print(f"libpq_ssl_with_https detected {elapsed:.1f}s after the fault")
            assert elapsed <= STUCK_AFTER + 2, f"detected after {elapsed:.1f}s"
            capacity = m.value("deadlock_agent_request_capacity_ratio")
            assert capacity is not None and capacity < capacity_before, m
            assert (m.value("deadlock_agent_oldest_stuck_thread_seconds") or 0) >= STUCK_AFTER
            for pid in app.gunicorn.worker_pids():
                capture(f"{SIG}.worker{pid}", pid)

            # Hold the hang a while: every deadlocked worker is counted once, however many
            # cycles it stays deadlocked.
            seen: set[str] = set()
            for _ in range(12):
                m = agent.scrape()
                seen |= {pid for pid, s in worker_states(m).items() if s == "deadlocked"}
                assert incidents(m) == len(seen), (seen, m)
                time.sleep(0.5)
            assert seen, "no worker reported deadlocked per worker"
            assert "deadlock_detected" in agent.log() and SIG in agent.log()

            # The evidence: one incident per deadlocked worker, each with a full native dump.
            listing = agent.get_json("/incidents")
            assert sorted(str(i["worker_pid"]) for i in listing) == sorted(seen), listing
            for item in listing:
                record = agent.get_json(item["url"])
                assert record["signature"] == SIG and record["resolved_at"] is None
                dumped = {t["name"]: t for t in record["dump"]["threads"]}
                assert "NR-Harvest-Thread" in dumped and "MainThread" in dumped
                assert record["dump"]["native"] is True
                assert any(f["function"] == "PQconnectdb" for t in record["dump"]["threads"]
                           for f in t["frames"])  # fmt: skip

            # Recovery: unstall; the hung threads fail, the workers are ok again, no new
            # incidents are counted.
            app.database.heal()
            app.harvest.heal()
            app.stop_traffic()
            m, _ = agent.wait_for("recovery", lambda m: workers(m, "ok") == 2, timeout=20)
            assert incidents(m) == len(seen)
            assert deadlocked(m) == 0
            assert "deadlock_resolved" in agent.log()
            resolved = agent.get_json("/incidents")
            assert all(i["resolved_at"] for i in resolved), resolved
        finally:
            app.stop_traffic()
            code = agent.stop()
        assert code == 0, f"agent exit code {code} on SIGTERM:\n{agent.log()[-2000:]}"


def test_libpq_hang_alone_is_stuck_not_deadlocked(tmp_path: Path, postgres: PgServer) -> None:
    with running_app(tmp_path, postgres) as app:
        agent = start_agent(tmp_path, app)
        try:
            # Only PostgreSQL stalls; the harvest thread keeps posting over healthy HTTPS.
            app.database.stall()
            app.traffic(["/db"], concurrency=16)
            agent.wait_for("stuck workers", lambda m: workers(m, "stuck") >= 1,
                           timeout=STUCK_AFTER + 15)  # fmt: skip
            for pid in app.gunicorn.worker_pids():
                capture(f"libpq_alone.worker{pid}", pid)
            for _ in range(10):  # several cycles: it must never turn into "deadlocked"
                m = agent.scrape()
                assert workers(m, "deadlocked") == 0, m
                assert deadlocked(m) == 0
                assert incidents(m) == 0
                assert (m.value("deadlock_agent_threads", state="stuck") or 0) >= 1
                time.sleep(0.5)
        finally:
            app.database.heal()
            app.stop_traffic()
            agent.stop()


def test_worker_respawn_is_followed(tmp_path: Path, postgres: PgServer) -> None:
    with running_app(tmp_path, postgres) as app:
        agent = start_agent(tmp_path, app)
        try:
            before = worker_states(agent.scrape())
            assert sorted(before) == sorted(str(p) for p in app.gunicorn.worker_pids())
            victim = min(int(pid) for pid in before)
            os.kill(victim, signal.SIGKILL)
            # Asking pid_exists first races with gunicorn reaping it: just wait, gone or not.
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(victim).wait(5)
            died_at = time.monotonic()
            m, _ = agent.wait_for(
                "old worker forgotten and the new one watched",
                lambda m: str(victim) not in worker_states(m) and len(worker_states(m)) == 2,
                timeout=15,
                every=0.1,
            )
            # Gone at the next cycle after gunicorn reaped it (interval 1 s, plus respawn).
            assert time.monotonic() - died_at <= 5
            after = worker_states(m)
            assert set(after.values()) == {"ok"}
            assert workers(m, "ok") == 2
            assert sorted(after) == sorted(str(p) for p in app.gunicorn.worker_pids())
        finally:
            agent.stop()
