"""Turn incidents into words for people: a structured log record and readable text. Pure."""

from __future__ import annotations

import time
from typing import Any

from agent.types import Incident, RemediationEvent, ThreadReport, ThreadStack, WorkerState

TOP_FRAMES = 6


def top_frames(stack: ThreadStack | None, limit: int = TOP_FRAMES) -> list[str]:
    """The innermost frames, skipping anonymous native addresses that tell a reader nothing."""
    if stack is None:
        return []
    named = [f for f in stack.frames if not (f.native and f.function.startswith("0x"))]
    return [str(f) for f in named[:limit]]


def _thread(role: str, thread: ThreadReport) -> dict[str, Any]:
    return {
        "role": role,
        "tid": thread.tid,
        "name": thread.name,
        "state": thread.state.value,
        "stuck_seconds": round(thread.stuck_for, 1),
        "top_frames": top_frames(thread.stack),
    }


def remediation_line(event: RemediationEvent) -> str:
    """One remediation event for people: "SIGABRT sent to pid 42 at 2026-01-02T03:04:05Z"."""
    return f"{event.describe()} at {_iso(event.at)}"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def incident_record(incident: Incident) -> dict[str, Any]:
    """The one structured log line per incident, as a dict (JSON-ready)."""
    kind = {
        WorkerState.DEADLOCKED: "deadlock", WorkerState.SPINNING: "spinning_worker",
    }.get(incident.verdict, "stuck_worker")  # fmt: skip
    return {
        "event": f"{kind}_resolved" if incident.resolved_at is not None else f"{kind}_detected",
        "incident": incident.id,
        "signature": incident.signature_name,
        "class": incident.hang_class,
        "verdict": incident.verdict.value,
        "worker_pid": incident.worker.pid,
        "master_pid": incident.worker.master_pid,
        "first_seen": round(incident.first_seen, 3),
        "resolved_at": None if incident.resolved_at is None else round(incident.resolved_at, 3),
        "threads": [_thread(role, t) for role, t in incident.threads],
        "remedy": incident.remedy,
        "references": list(incident.references),
        "sampled_by": list(incident.sampled_by),
        "remediation": [
            {"action": e.action, "signal": e.signal, "result": e.result, "pid": e.pid,
             "at": round(e.at, 3), "detail": e.detail, "text": remediation_line(e)}
            for e in incident.remediation
        ],
    }  # fmt: skip


def incident_text(incident: Incident) -> str:
    """A readable account: headline, each involved thread with its top frames, the remedy."""
    if incident.signature is None:
        head = "STUCK (no known signature)"
    elif incident.verdict is WorkerState.DEADLOCKED:
        head = f"DEADLOCK {incident.signature.name}"
    else:
        head = f"{incident.verdict.value.upper()} {incident.signature.name} ({incident.hang_class})"
    lines = [
        f"{head} in gunicorn worker {incident.worker.pid} "
        f"(master {incident.worker.master_pid}), incident {incident.id}",
        f"  {incident.summary}",
    ]
    if incident.resolved_at is not None:
        lines.append(f"  Resolved after {incident.resolved_at - incident.first_seen:.0f}s.")
    for role, thread in incident.threads:
        stuck = f", stuck {thread.stuck_for:.0f}s" if thread.stuck_for else ""
        lines.append(f"  [{role}] thread {thread.name or '?'} (tid {thread.tid}{stuck}):")
        lines.extend(f"      {frame}" for frame in top_frames(thread.stack))
    if incident.blind_spot is not None:
        lines.append(f"  Note: {incident.blind_spot}")
    lines.extend(f"  Remediation: {remediation_line(e)}" for e in incident.remediation)
    lines.append(f"  Remedy: {incident.remedy}")
    lines.extend(f"  See: {url}" for url in incident.references)
    return "\n".join(lines)
