"""The incident evidence store and /incidents, on real fixture dumps in a temp directory."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
from builders import deadlock_incident, fixture
from prometheus_client import CollectorRegistry

from agent.incidents import IncidentStore
from agent.server import AgentApp
from agent.types import CycleReport


def call(app: AgentApp, path: str, *, accept: str = "", query: str = "") -> tuple[str, bytes]:
    environ: dict[str, object] = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, QUERY_STRING=query, HTTP_ACCEPT=accept,
                   REQUEST_METHOD="GET", **{"wsgi.input": io.BytesIO()})  # fmt: skip
    status: list[str] = []
    body = b"".join(app(environ, lambda s, h: status.append(s)))
    return status[0], body


def test_save_keeps_json_and_text_with_the_full_dump(tmp_path: Path) -> None:
    store = IncidentStore(str(tmp_path))
    incident = deadlock_incident()
    snap = fixture("libpq_ssl_with_https.native", at=10)
    store.save(incident, snap)
    record = store.get(incident.id)
    assert record is not None
    assert record["signature"] == "libpq_ssl_with_https"
    assert record["verdict"] == "deadlocked"
    assert record["worker_pid"] == incident.worker.pid
    assert record["master_pid"] == incident.worker.master_pid
    assert record["resolved_at"] is None
    assert "death spiral" in record["remedy"]
    assert {t["role"] for t in record["threads"]} == {"libpq", "https"}
    assert len(record["dump"]["threads"]) == len(snap.threads)  # every thread, not only roles
    assert record["dump"]["native"] is True
    text = store.get_text(incident.id)
    assert text is not None
    assert "DEADLOCK libpq_ssl_with_https" in text and "PQconnectdb" in text
    assert "Full dump (native + Python frames)" in text and "MainThread" in text


def test_resolution_rewrites_the_record_and_keeps_the_dump(tmp_path: Path) -> None:
    store = IncidentStore(str(tmp_path))
    incident = deadlock_incident()
    store.save(incident, fixture("libpq_ssl_with_https.native"))
    store.save(replace(incident, resolved_at=42.0), None)
    record = store.get(incident.id)
    assert record is not None and record["resolved_at"] == 42.0
    assert record["dump"] is not None and record["dump"]["threads"]
    text = store.get_text(incident.id)
    assert text is not None and "Resolved after" in text and "Full dump (native" in text


def test_caps_hold_after_a_thousand_incidents(tmp_path: Path) -> None:
    store = IncidentStore(str(tmp_path), max_count=50, max_bytes=2 * 1024 * 1024)
    base = deadlock_incident()
    snap = fixture("libpq_ssl_with_https.native")
    for n in range(1000):
        store.save(replace(base, id=f"incident-{n:04d}", first_seen=float(n)), snap)
        count, used = store.usage()
        assert count <= 50 and used <= 2 * 1024 * 1024, (n, count, used)
    ids = [s.id for s in store.list()]
    assert ids[0] == "incident-0999"  # the newest are kept, the oldest dropped
    assert "incident-0000" not in ids
    assert len(ids) == store.usage()[0]
    # A fresh store on the same directory (an agent restart) applies the caps too.
    assert IncidentStore(str(tmp_path), max_count=10).usage()[0] == 10


def test_incidents_endpoints(tmp_path: Path) -> None:
    store = IncidentStore(str(tmp_path))
    incident = deadlock_incident()
    store.save(incident, fixture("libpq_ssl_with_https.native"))
    app = AgentApp(CollectorRegistry(), lambda: None, stale_after=5, store=store)

    status, body = call(app, "/incidents")
    assert status.startswith("200")
    (listed,) = json.loads(body)
    assert listed["id"] == incident.id and listed["url"] == f"/incidents/{incident.id}"
    assert listed["signature"] == "libpq_ssl_with_https"

    status, body = call(app, f"/incidents/{incident.id}")
    assert status.startswith("200") and json.loads(body)["dump"]["threads"]
    for kwargs in ({"accept": "text/plain"}, {"query": "format=text"}):
        status, body = call(app, f"/incidents/{incident.id}", **kwargs)  # type: ignore[arg-type]
        assert status.startswith("200") and b"Full dump" in body
    status, body = call(app, f"/incidents/{incident.id}.txt")
    assert b"DEADLOCK libpq_ssl_with_https" in body
    status, body = call(app, "/incidents", accept="text/plain")
    assert incident.id.encode() in body and b"OPEN" in body


@pytest.mark.parametrize(
    "path",
    ["/incidents/nope", "/incidents/../../etc/passwd", "/incidents/%2e%2e", "/incidents/a/b"],
    ids=["unknown", "traversal", "encoded-dots", "nested"],
)
def test_unknown_or_hostile_ids_are_404(tmp_path: Path, path: str) -> None:
    app = AgentApp(CollectorRegistry(), lambda: None, stale_after=5, store=IncidentStore(
        str(tmp_path)))  # fmt: skip
    status, _ = call(app, path)
    assert status.startswith("404")


def test_landing_page_names_open_incidents(tmp_path: Path) -> None:
    incident = deadlock_incident()
    report = CycleReport(finished_at=10, duration=0.01, masters=(1,), workers=(), complete=True,
                         signatures=(), open_incidents=(incident,))  # fmt: skip
    app = AgentApp(CollectorRegistry(), lambda: report, stale_after=5,
                   store=IncidentStore(str(tmp_path)))  # fmt: skip
    status, body = call(app, "/")
    assert status.startswith("200")
    assert f"OPEN INCIDENTS: {incident.id} (deadlocked)".encode() in body
