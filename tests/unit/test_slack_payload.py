"""The Slack Block Kit payload: content and Slack's size limits. Pure."""

from __future__ import annotations

from dataclasses import replace

from builders import deadlock_incident, native, py, stack

from agent.slack import HEADER_MAX, SECTION_MAX, slack_payload
from agent.types import ThreadReport, ThreadState, WorkerState


def texts(payload: dict) -> list[str]:  # type: ignore[type-arg]
    found = []
    for block in payload["blocks"]:
        if "text" in block:
            found.append(block["text"]["text"])
        for element in block.get("elements", []):
            found.append(element["text"])
    return found


def test_incident_message_has_headline_threads_remedy_and_link() -> None:
    incident = deadlock_incident()
    payload = slack_payload(incident, host="web.1", public_url="https://agent.example/")
    assert payload["text"].startswith(":rotating_light:")
    assert "libpq_ssl_with_https" in payload["text"] and "web.1" in payload["text"]
    assert str(incident.worker.pid) in payload["text"]
    header = payload["blocks"][0]
    assert header["type"] == "header" and "libpq_ssl_with_https" in header["text"]["text"]
    body = "\n".join(texts(payload))
    assert "PQconnectdb" in body and "SSLSocket.do_handshake" in body
    assert "NR-Harvest-Thread" in body
    assert "*Remedy:*" in body and "CONN_MAX_AGE" in body
    assert f"<https://agent.example/incidents/{incident.id}|details>" in body


def test_resolved_message() -> None:
    incident = replace(deadlock_incident(at=10), resolved_at=70.0)
    payload = slack_payload(incident, host="web.1")
    assert payload["text"].startswith(":white_check_mark: Resolved: libpq_ssl_with_https")
    assert "after 60s" in payload["text"]
    assert "details>" not in "\n".join(texts(payload))  # no --web.external-url: no link


def test_limits_hold_for_monstrous_stacks() -> None:
    huge = stack(
        *(native("f" * 500 + str(i), "/lib/libpq.so.5") for i in range(300)),
        py("x" * 4000, "app.py"),
        tid=7,
    )
    thread = ThreadReport(7, "T" * 400, ThreadState.STUCK, True, 99.0, huge)
    incident = replace(
        deadlock_incident(),
        verdict=WorkerState.STUCK,
        signature=None,
        threads=tuple(("stuck", thread) for _ in range(80)),
    )
    payload = slack_payload(incident, host="h" * 300)
    assert len(payload["blocks"]) <= 50
    assert len(payload["blocks"][0]["text"]["text"]) <= HEADER_MAX
    for block in payload["blocks"]:
        if block["type"] == "section":
            text = block["text"]["text"]
            assert len(text) <= SECTION_MAX
            assert text.count("```") % 2 == 0  # code fences stay closed
    assert "stuck: none" in payload["text"]
