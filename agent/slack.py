"""The Slack wrapper: Block Kit messages per incident, sent from a thread of their own.

The sampling loop only enqueues (never blocks, never waits on the network). The sender keeps
order (a resolution never overtakes its incident), sends at most one message per second,
honours 429 Retry-After, retries 5xx and connection errors with backoff, and gives up at once
on other 4xx. The webhook URL is a secret: it never appears in logs, metrics or errors.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import requests

from agent.render import remediation_line, top_frames
from agent.types import Incident, RemediationEvent, ThreadReport

log = logging.getLogger(__name__)
# urllib3 logs each request line ("POST /services/T…/B…/secret HTTP/1.1") at DEBUG: the
# webhook's path is its secret, so that logger never speaks below WARNING.
logging.getLogger("urllib3.connectionpool").setLevel(logging.WARNING)

RESULTS = ("sent", "retried", "failed", "dropped")
# Block Kit limits (api.slack.com/reference/block-kit/blocks): header text 150 chars, section
# text 3000 chars, 50 blocks per message.
HEADER_MAX = 150
SECTION_MAX = 3000
FRAMES_IN_MESSAGE = 8


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _where(host: str, incident: Incident) -> str:
    return f"{host}, gunicorn worker {incident.worker.pid} (master {incident.worker.master_pid})"


def _thread_block(role: str, thread: ThreadReport) -> dict[str, Any]:
    stuck = f", no progress for {thread.stuck_for:.0f}s" if thread.stuck_for else ""
    head = f"*[{role}]* `{thread.name or '?'}` (tid {thread.tid}{stuck})"
    frames = "\n".join(top_frames(thread.stack, FRAMES_IN_MESSAGE)) or "(no stack)"
    # Keep the code fence closed whatever we cut.
    room = SECTION_MAX - len(head) - 10
    return {
        "type": "section",
        "text": {"type": "mrkdwn", "text": f"{head}\n```{_clip(frames, room)}```"},
    }


def slack_payload(
    incident: Incident, *, host: str, public_url: str | None = None
) -> dict[str, Any]:
    """The webhook JSON for an incident (opened) or its resolution. Pure."""
    name = incident.signature_name
    where = _where(host, incident)
    link = f"{public_url.rstrip('/')}/incidents/{incident.id}" if public_url else None
    if incident.resolved_at is not None:
        took = incident.resolved_at - incident.first_seen
        text = f":white_check_mark: Resolved: {name} on {where}, after {took:.0f}s"
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": _clip(text, SECTION_MAX)}}
        ]
    else:
        verdict = incident.verdict.value
        text = f":rotating_light: Gunicorn worker {verdict}: {name} on {where}"
        blocks = [
            {
                "type": "header",
                "text": {
                    "type": "plain_text",
                    "text": _clip(f"Gunicorn worker {verdict}: {name}", HEADER_MAX),
                },
            },
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": _clip(f"*{where}*\n{incident.summary}", SECTION_MAX),
                },
            },
            *(_thread_block(role, t) for role, t in incident.threads[:10]),
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _clip(f"*Remedy:* {incident.remedy}",
                                                         SECTION_MAX)},
            },
            *(
                [{"type": "section", "text": {"type": "mrkdwn", "text": _clip(
                    "*References:* " + " · ".join(f"<{url}>" for url in incident.references),
                    SECTION_MAX)}}]
                if incident.references else []
            ),
        ]  # fmt: skip
    context = f"incident `{incident.id}`" + (f" · <{link}|details>" if link else "")
    if incident.resolved_at is None and incident.blind_spot is not None:
        context += f" · {incident.blind_spot}"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context}]})
    return {"text": text, "blocks": blocks[:50]}


def remediation_payload(
    incident: Incident, event: RemediationEvent, *, host: str, public_url: str | None = None
) -> dict[str, Any]:
    """The follow-up message when remediation acts on an incident's worker (or would, or may
    not). Pure."""
    icon = {"done": ":hammer:", "dry_run": ":memo:", "gone": ":white_check_mark:"}.get(
        event.result, ":warning:"
    )
    text = (f"{icon} Remediation of {incident.signature_name} on {_where(host, incident)}: "
            f"{remediation_line(event)}")  # fmt: skip
    link = f"{public_url.rstrip('/')}/incidents/{incident.id}" if public_url else None
    context = f"incident `{incident.id}`" + (f" · <{link}|details>" if link else "")
    return {
        "text": _clip(text, SECTION_MAX),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": _clip(text, SECTION_MAX)}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
    }


class Notifications:
    """Outcome counts by (channel, result), read by the metrics collector at scrape time."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._counts: Counter[str] = Counter(dict.fromkeys(RESULTS, 0))
        self._lock = threading.Lock()

    def count(self, result: str) -> None:
        """Add one outcome."""
        with self._lock:
            self._counts[result] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        """{(channel, result): count}, every result present."""
        with self._lock:
            return {(self.channel, r): n for r, n in self._counts.items()}


class LogNotifier:
    """Without a webhook, the Slack message's text goes to the log (the demo shows it)."""

    def __init__(self, *, host: str, public_url: str | None = None) -> None:
        self.host = host
        self.public_url = public_url
        self.stats = Notifications("log")

    def __call__(self, incident: Incident) -> None:
        """Log the message an incident would send."""
        payload = slack_payload(incident, host=self.host, public_url=self.public_url)
        log.warning("notification (no SLACK_WEBHOOK_URL set): %s", payload["text"])
        self.stats.count("sent")

    def remediated(self, incident: Incident, event: RemediationEvent) -> None:
        """Log the follow-up a remediation event would send."""
        payload = remediation_payload(incident, event, host=self.host, public_url=self.public_url)
        log.warning("notification (no SLACK_WEBHOOK_URL set): %s", payload["text"])
        self.stats.count("sent")

    def close(self, timeout: float = 0.0) -> None:
        """Nothing to flush."""


class SlackNotifier:
    """Posts incident messages to a Slack incoming webhook from a background thread."""

    def __init__(
        self,
        webhook_url: str,
        *,
        host: str,
        public_url: str | None = None,
        queue_size: int = 100,
        min_interval: float = 1.0,
        max_attempts: int = 6,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        timeout: float = 10.0,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = webhook_url  # never logged: see _describe
        self.host = host
        self.public_url = public_url
        self.min_interval = min_interval
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.stats = Notifications("slack")
        self._session = session or requests.Session()
        self._clock = clock
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._last_sent = -float("inf")
        self._thread = threading.Thread(target=self._run, name="slack-notifier", daemon=True)
        self._thread.start()

    def __call__(self, incident: Incident) -> None:
        """Queue the incident's message; never blocks. A full queue drops it, counted."""
        self._enqueue(slack_payload(incident, host=self.host, public_url=self.public_url))

    def remediated(self, incident: Incident, event: RemediationEvent) -> None:
        """Queue the follow-up for a remediation event, after the incident's own message."""
        self._enqueue(
            remediation_payload(incident, event, host=self.host, public_url=self.public_url)
        )

    def _enqueue(self, payload: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.stats.count("dropped")
            log.error("slack queue full (%d); dropped: %s", self._queue.maxsize, payload["text"])

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout` seconds), then stop."""
        deadline = self._clock() + timeout
        while not self._queue.empty() and self._clock() < deadline:
            time.sleep(0.05)
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(max(0.0, deadline - self._clock()) + 0.5)

    def _run(self) -> None:
        while not self._stop.is_set():
            payload = self._queue.get()
            if payload is None:
                return
            try:
                self._deliver(payload)
            except Exception:  # the sender thread must outlive any surprise
                self.stats.count("failed")
                log.exception("slack notifier failed on a message; continuing")
            finally:
                self._queue.task_done()

    def _wait(self, seconds: float) -> bool:
        """Sleep unless stopping; True when we should go on."""
        return not self._stop.wait(max(0.0, seconds))

    def _deliver(self, payload: dict[str, Any]) -> None:
        delay = self.backoff
        for attempt in range(1, self.max_attempts + 1):
            # At most one message per second per webhook (Slack's documented rate).
            if not self._wait(self._last_sent + self.min_interval - self._clock()):
                return
            retry_after: float | None = None
            try:
                response = self._session.post(self._url, json=payload, timeout=self.timeout)
            except requests.RequestException as err:
                outcome = f"{type(err).__name__}"  # not str(err): it contains the URL
            else:
                self._last_sent = self._clock()
                status = response.status_code
                if 200 <= status < 300:
                    self.stats.count("sent")
                    return
                outcome = f"HTTP {status}"
                if status == 429:
                    retry_after = _retry_after(response.headers.get("Retry-After"))
                elif status < 500:
                    self.stats.count("failed")
                    log.error("slack rejected a message (%s), not retrying: %s",
                              outcome, payload["text"])  # fmt: skip
                    return
            if attempt == self.max_attempts:
                break
            wait = retry_after if retry_after is not None else min(delay, self.backoff_max)
            delay *= 2
            self.stats.count("retried")
            log.warning("slack send failed (%s); retry %d in %.1fs", outcome, attempt, wait)
            if not self._wait(wait):
                return
        self.stats.count("failed")
        log.error("slack send gave up after %d attempts: %s", self.max_attempts, payload["text"])


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 1.0
    except ValueError:
        return 1.0
