"""Named stalls on real processes: a real gunicorn gthread worker (tests/integration/apps/netapp.py)
whose request hangs in a real client call, watched by a real `deadlock-agent watch`. The agent
must open an incident with the entry's name and remedy (GET /incidents); the same app with a
timeout set, the lock released at once or the pool not exhausted must give none."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import AgentProcess
from pgserver import PgServer

from agent.demo.run import Gunicorn, fire, get
from agent.signatures import load_catalog

pytestmark = pytest.mark.integration

APPS = Path(__file__).resolve().parent / "apps"
sys.path.append(str(APPS))
from peers import SilentServer  # noqa: E402  (the helper apps' directory, added just above)

BY_NAME = {s.name: s for s in load_catalog().signatures}
VERDICT_WITHIN = 40.0  # CPU is shared with other test runs: be generous
HEALTHY_FOR = 10.0  # over three times what a hang takes to become an incident (3 + 3 s)


@contextlib.contextmanager
def netapp(workdir: Path, dsn: str = "") -> Iterator[tuple[Gunicorn, AgentProcess]]:
    """gunicorn (gthread, 1 worker x 4 threads) serving netapp.py, and the agent watching it."""
    gunicorn = Gunicorn(
        workdir, {"NETAPP_DSN": dsn}, worker_class="gthread", workers=1, threads=4,
        extra_args=("--pythonpath", str(APPS), "--timeout", "120"), app="netapp:app",
    )  # fmt: skip
    agent = None
    try:
        gunicorn.wait_ready(workers=1)
        agent = AgentProcess(workdir, ["--master-pid", str(gunicorn.pid), "--stuck-after", "3",
                                       "--stuck-incident-after", "3",
                                       "--interval", "1"])  # fmt: skip
        agent.wait_for(
            "the worker seen ok", lambda m: m.value("deadlock_agent_workers", state="ok") == 1,
            timeout=VERDICT_WITHIN,
        )  # fmt: skip
        yield gunicorn, agent
    finally:
        if agent is not None:
            agent.stop()
        gunicorn.stop()


def wait_incident(agent: AgentProcess, signature: str) -> dict[str, Any]:
    """The first incident of that signature, in full (GET /incidents/<id>)."""
    deadline = time.monotonic() + VERDICT_WITHIN
    listing: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            listing = agent.get_json("/incidents")
            for item in listing:
                if item.get("signature") == signature:
                    return agent.get_json(item["url"])  # type: ignore[no-any-return]
        time.sleep(0.5)
    raise AssertionError(
        f"no {signature} incident within {VERDICT_WITHIN:g}s; incidents: {listing}\n"
        f"agent log:\n{agent.log()[-4000:]}"
    )


def assert_named(agent: AgentProcess, signature: str) -> None:
    incident = wait_incident(agent, signature)
    sig = BY_NAME[signature]
    assert incident["class"] == sig.hang_class.value
    assert incident["verdict"] == "stuck"
    assert incident["remedy"] == sig.remedy
    assert incident["references"] == list(sig.references)
    assert any(t["role"] for t in incident["threads"]), incident
    m = agent.scrape()
    assert m.value("deadlock_agent_workers", state="stuck") == 1
    assert m.value("deadlock_agent_hang_workers", signature=signature,
                   **{"class": sig.hang_class.value}) == 1  # fmt: skip


def assert_healthy(gunicorn: Gunicorn, agent: AgentProcess, url: str) -> None:
    """Keep the healthy twin busy for HEALTHY_FOR seconds: no incident, the worker ok."""
    until = time.monotonic() + HEALTHY_FOR
    statuses = []
    while time.monotonic() < until:
        statuses.append(get(gunicorn.url + url, timeout=30))
    assert agent.get_json("/incidents") == [], agent.log()[-4000:]
    m = agent.scrape()
    assert m.value("deadlock_agent_workers", state="ok") == 1, agent.log()[-4000:]
    assert len(statuses) >= 3, statuses


def silent_peer() -> SilentServer:
    return SilentServer().start()


def test_http_read_no_timeout_is_named(tmp_path: Path) -> None:
    peer = silent_peer()
    try:
        with netapp(tmp_path) as (gunicorn, agent):
            fire(f"{gunicorn.url}/http?port={peer.port}", count=1, timeout=120)
            assert_named(agent, "http_read_no_timeout")
    finally:
        peer.close()


def test_http_with_a_timeout_is_healthy(tmp_path: Path) -> None:
    peer = silent_peer()
    try:
        with netapp(tmp_path) as (gunicorn, agent):
            # Each call times out after 1 s (a 502), then the next starts.
            assert_healthy(gunicorn, agent, f"/http?port={peer.port}&timeout=1")
    finally:
        peer.close()


def test_pg_lock_wait_is_named(tmp_path: Path, postgres: PgServer) -> None:
    with netapp(tmp_path, postgres.dsn()) as (gunicorn, agent):
        fire(f"{gunicorn.url}/pg_update?hold=90", count=1, timeout=120)
        assert_named(agent, "pg_lock_wait")


def test_a_lock_released_quickly_is_healthy(tmp_path: Path, postgres: PgServer) -> None:
    with netapp(tmp_path, postgres.dsn()) as (gunicorn, agent):
        assert_healthy(gunicorn, agent, "/pg_update?hold=0.5")


def test_db_pool_exhausted_is_named(tmp_path: Path, postgres: PgServer) -> None:
    with netapp(tmp_path, postgres.dsn()) as (gunicorn, agent):
        fire(f"{gunicorn.url}/sqla?hold=90", count=1, timeout=120)
        assert_named(agent, "db_pool_exhausted")


def test_a_pool_with_a_free_connection_is_healthy(tmp_path: Path, postgres: PgServer) -> None:
    with netapp(tmp_path, postgres.dsn()) as (gunicorn, agent):
        assert_healthy(gunicorn, agent, "/sqla?hold=0")
