"""sync, gthread, gevent and uvicorn workers: watched without harm; a hung sync worker and blocked
uvicorn event loops are seen too."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from harness import AgentProcess, running_app
from pgserver import PgServer

from agent.demo.run import fire, get

pytestmark = pytest.mark.integration

# uvicorn's worker class serves the ASGI demo app; --timeout 120: its loop notifies gunicorn
# every timeout/2 s from the loop itself, so a loop we block on purpose must not be killed.
UVICORN = "uvicorn.workers.UvicornWorker"
ASGI: dict[str, Any] = {"app_module": "agent.demo.asgi:app", "extra_args": ("--timeout", "120")}
APPS: dict[str, dict[str, Any]] = {"sync": {}, "gthread": {}, "gevent": {}, UVICORN: ASGI}


@pytest.mark.parametrize(
    "worker_class", ["sync", "gthread", "gevent", UVICORN],
    ids=["sync", "gthread", "gevent", "uvicorn"],
)  # fmt: skip
def test_every_worker_class_is_watched_without_harm(
    tmp_path: Path, postgres: PgServer, worker_class: str
) -> None:
    with running_app(
        tmp_path, postgres, worker_class=worker_class, threads=1, **APPS[worker_class]
    ) as app:
        agent = AgentProcess(tmp_path, ["--master-pid", str(app.gunicorn.pid),
                                        "--stuck-after", "4", "--dump-interval", "2"])  # fmt: skip
        try:
            agent.wait_for(
                "both workers ok", lambda m: m.value("deadlock_agent_workers", state="ok") == 2,
                timeout=20,
            )  # fmt: skip
            # Several dump intervals of traffic: every worker keeps answering.
            statuses = []
            until = time.monotonic() + 6
            while time.monotonic() < until:
                statuses.append(get(app.gunicorn.url + "/db", timeout=10))
            assert set(statuses) == {200}, statuses
            m = agent.scrape()
            assert m.value("deadlock_agent_up") == 1
            assert (m.value("deadlock_agent_samples_total", method="pyspy") or 0) >= 2
            errors = {
                dict(labels)["reason"]: v
                for labels, v in m.series("deadlock_agent_sample_errors_total").items()
                # gevent: py-spy may fail to unwind greenlet stacks natively, once; the agent
                # then watches that worker with Python frames only.
                if v and dict(labels)["reason"] not in ("vanished", "native_unwind")
            }
            assert errors == {}, agent.log()
            states = m.series("deadlock_agent_workers")
            assert m.value("deadlock_agent_workers", state="ok") == 2, (states, agent.log())
            assert "Traceback" not in agent.log()
        finally:
            agent.stop()


def test_a_hung_sync_worker_is_stuck_and_out_of_capacity(
    tmp_path: Path, postgres: PgServer
) -> None:
    with running_app(tmp_path, postgres, worker_class="sync", workers=1, threads=1) as app:
        agent = AgentProcess(tmp_path, ["--master-pid", str(app.gunicorn.pid),
                                        "--stuck-after", "4"])  # fmt: skip
        try:
            agent.wait_for(
                "worker ok", lambda m: m.value("deadlock_agent_workers", state="ok") == 1,
                timeout=20,
            )  # fmt: skip
            app.database.stall()
            app.traffic(["/db"], concurrency=1)
            m, _ = agent.wait_for(
                "sync worker stuck",
                lambda m: m.value("deadlock_agent_workers", state="stuck") == 1, timeout=15,
            )  # fmt: skip
            assert m.value("deadlock_agent_request_capacity_ratio") == 0.0
        finally:
            app.database.heal()
            app.stop_traffic()
            agent.stop()


def test_busy_and_slow_uvicorn_event_loops_are_never_stuck(
    tmp_path: Path, postgres: PgServer
) -> None:
    """Loops busy with many short awaits, and requests awaiting longer than --stuck-after while
    the loop stays free, are healthy: no stuck worker, full capacity, throughout."""
    with running_app(tmp_path, postgres, worker_class=UVICORN, threads=1, **ASGI) as app:
        agent = AgentProcess(tmp_path, ["--master-pid", str(app.gunicorn.pid),
                                        "--stuck-after", "4", "--dump-interval", "2"])  # fmt: skip
        try:
            agent.wait_for(
                "both workers ok at full capacity",
                lambda m: m.value("deadlock_agent_workers", state="ok") == 2
                and m.value("deadlock_agent_request_capacity_ratio") == 1.0,
                timeout=20,
            )  # fmt: skip
            app.traffic(["/awaits?n=1000", "/slow?seconds=6", "/awaits?n=300"], concurrency=8)
            until = time.monotonic() + 12  # three stuck-after periods of traffic
            scrapes = []
            while time.monotonic() < until:
                scrapes.append(agent.scrape())
                time.sleep(0.5)
            app.stop_traffic()
            for m in scrapes:
                assert m.value("deadlock_agent_workers", state="ok") == 2, agent.log()
                assert m.value("deadlock_agent_request_capacity_ratio") == 1.0, agent.log()
            assert set(app.results) == {200}, app.results
            assert app.results[200] >= 16, app.results
        finally:
            app.stop_traffic()
            agent.stop()


def test_blocked_uvicorn_event_loops_are_stuck_and_out_of_capacity(
    tmp_path: Path, postgres: PgServer
) -> None:
    """Issue #6: a synchronous call blocks each worker's event loop; the loop's thread serves
    every request of its worker, so capacity drops to 0 and comes back when the calls end."""
    with running_app(tmp_path, postgres, worker_class=UVICORN, threads=1, **ASGI) as app:
        agent = AgentProcess(tmp_path, ["--master-pid", str(app.gunicorn.pid),
                                        "--stuck-after", "4"])  # fmt: skip
        try:
            agent.wait_for(
                "both workers ok", lambda m: m.value("deadlock_agent_workers", state="ok") == 2,
                timeout=20,
            )  # fmt: skip
            # A blocked loop accepts no connection, so the second /block, sent once the first
            # worker is seen stuck, can only land on the other worker.
            fire(app.gunicorn.url + "/block?seconds=20", count=1, timeout=60)
            m, _ = agent.wait_for(
                "one loop stuck", lambda m: m.value("deadlock_agent_workers", state="stuck") == 1,
                timeout=15,
            )  # fmt: skip
            assert m.value("deadlock_agent_request_capacity_ratio") == 0.5
            fire(app.gunicorn.url + "/block?seconds=12", count=1, timeout=60)
            m, _ = agent.wait_for(
                "both loops stuck",
                lambda m: m.value("deadlock_agent_workers", state="stuck") == 2, timeout=15,
            )  # fmt: skip
            assert m.value("deadlock_agent_request_capacity_ratio") == 0.0
            agent.wait_for(
                "capacity back once the blocking calls return",
                lambda m: m.value("deadlock_agent_workers", state="ok") == 2
                and m.value("deadlock_agent_request_capacity_ratio") == 1.0,
                timeout=30,
            )  # fmt: skip
            assert get(app.gunicorn.url + "/", timeout=5) == 200
        finally:
            agent.stop()
