"""An incident says what its sampler could not see: the probe and py-spy --nonblocking have
no native frames (libpq's, OpenSSL's), and the text, the record and Slack say so."""

from __future__ import annotations

from dataclasses import replace

from builders import deadlock_incident

from agent.render import incident_record, incident_text
from agent.slack import slack_payload
from agent.types import Incident


def sampled(incident: Incident, source: str) -> Incident:
    threads = tuple(
        (role, replace(t, stack=replace(t.stack, source=source) if t.stack else None))
        for role, t in incident.threads
    )
    return replace(incident, threads=threads)


def test_py_spy_incident_has_no_note() -> None:
    incident = deadlock_incident()
    assert incident.sampled_by == ("py-spy",)
    assert incident.blind_spot is None
    assert "Note:" not in incident_text(incident)
    assert incident_record(incident)["sampled_by"] == ["py-spy"]


def test_probe_incident_says_native_frames_are_not_visible() -> None:
    incident = sampled(deadlock_incident(), "probe")
    assert incident.sampled_by == ("probe",)
    text = incident_text(incident)
    assert "Note: Stacks from the in-process probe" in text
    assert "native frames (libpq, OpenSSL) cannot be seen from inside" in text
    assert incident_record(incident)["sampled_by"] == ["probe"]
    context = slack_payload(incident, host="web.1")["blocks"][-1]["elements"][0]["text"]
    assert "in-process probe" in context


def test_nonblocking_and_mixed_sources_are_named() -> None:
    assert "--nonblocking" in (sampled(deadlock_incident(), "py-spy --nonblocking").blind_spot
                               or "")  # fmt: skip
    incident = deadlock_incident()
    role, first = incident.threads[0]
    assert first.stack is not None
    mixed = replace(incident, threads=(
        (role, replace(first, stack=replace(first.stack, source="probe"))),
        *incident.threads[1:],
    ))  # fmt: skip
    assert mixed.sampled_by == ("probe", "py-spy")
    assert "Some stacks" in (mixed.blind_spot or "")
