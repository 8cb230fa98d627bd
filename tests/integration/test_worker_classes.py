"""sync, gthread and gevent workers: watched without harm; a hung sync worker is seen too."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import AgentProcess, running_app
from pgserver import PgServer

from agent.demo.run import get

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_every_worker_class_is_watched_without_harm(
    tmp_path: Path, postgres: PgServer, worker_class: str
) -> None:
    with running_app(tmp_path, postgres, worker_class=worker_class, threads=1) as app:
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
