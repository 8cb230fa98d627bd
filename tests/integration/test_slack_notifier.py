"""The Slack notifier against a real local HTTP server that answers 429, 500, 400 and slowly."""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from dataclasses import replace

import pytest
from builders import deadlock_incident
from promstack import FakeSlack, Post, Response

from agent.slack import SlackNotifier
from agent.types import Incident

pytestmark = pytest.mark.integration

SECRET = "/services/T0000/B0000/XXXXsecretXXXX"


def incidents(n: int) -> list[Incident]:
    """n incidents of n workers, each followed later by its resolution."""
    opened = [deadlock_incident(at=10 + i, pid=4000 + i) for i in range(n)]
    return opened + [replace(i, resolved_at=100.0 + n) for i in opened]


def delivered(slack: FakeSlack) -> list[str]:
    return [p.text for p in slack.posts if 200 <= p.answered.status < 300]


def counts(notifier: SlackNotifier) -> dict[str, int]:
    return {result: n for (_, result), n in notifier.stats.snapshot().items()}


def test_no_message_lost_or_duplicated_through_429_and_500_at_most_one_per_second() -> None:
    with FakeSlack() as slack:
        slack.enqueue(Response.retry_after(1), Response(status=500), Response(),
                      Response(status=503), path=SECRET)  # fmt: skip
        notifier = SlackNotifier(slack.url_for(SECRET), host="web.1", backoff=0.2)
        messages = incidents(3)
        for incident in messages:
            notifier(incident)
        slack.wait_for(lambda p: 200 <= p.answered.status < 300, timeout=30, count=6)
        notifier.close()
        expected = [
            (":white_check_mark:" if i.resolved_at else ":rotating_light:", i.worker.pid)
            for i in messages
        ]
        got = delivered(slack)
        assert [(t.split(" ", 1)[0], int(t.split("gunicorn worker ")[1].split(" ")[0]))
                for t in got] == expected  # every message once, in order  # fmt: skip
        assert len(slack.posts) == 6 + 3  # three answered with 429/500/503, then retried
        gaps = [b.received_at - a.received_at for a, b in zip(slack.posts, slack.posts[1:],
                                                                  strict=False)]  # fmt: skip
        assert min(gaps) >= 0.95, gaps  # at most one request per second
        assert counts(notifier) == {"sent": 6, "retried": 3, "failed": 0, "dropped": 0}


def test_429_retry_after_is_honoured() -> None:
    with FakeSlack() as slack:
        slack.enqueue(Response.retry_after(3), path=SECRET)
        notifier = SlackNotifier(slack.url_for(SECRET), host="h")
        notifier(deadlock_incident())
        first, second = slack.wait_for(lambda p: True, timeout=15, count=2)
        notifier.close()
        assert second.received_at - first.received_at >= 2.9
        assert second.answered.status == 200 and first.text == second.text


def test_400_is_not_retried_and_the_next_message_still_goes() -> None:
    with FakeSlack() as slack:
        slack.enqueue(Response(status=400, body=b"invalid_blocks"), path=SECRET)
        notifier = SlackNotifier(slack.url_for(SECRET), host="h")
        bad, good = incidents(1)
        notifier(bad)
        notifier(good)
        slack.wait_for(lambda p: True, timeout=10, count=2)
        notifier.close()
        time.sleep(0.5)
        assert [p.answered.status for p in slack.posts] == [400, 200]
        assert counts(notifier) == {"sent": 1, "retried": 0, "failed": 1, "dropped": 0}


def test_slow_slack_never_slows_the_sampling_loop() -> None:
    with FakeSlack() as slack:
        slack.enqueue(*(Response(delay=2.0) for _ in range(3)), path=SECRET)
        notifier = SlackNotifier(slack.url_for(SECRET), host="h")
        messages = incidents(2)[:3]
        # A stand-in for the sampling loop: 10 Hz for 3 s, notifying on the way.
        ticks: list[float] = []
        calls: list[float] = []
        next_at = time.monotonic()
        for n in range(30):
            started = time.monotonic()
            if n % 10 == 0:
                notifier(messages[n // 10])
            calls.append(time.monotonic() - started)
            ticks.append(started)
            next_at += 0.1
            time.sleep(max(0.0, next_at - time.monotonic()))
        # Each send takes 2 s; enqueueing must take nothing like it (bounds allow a noisy box).
        assert max(calls) < 0.05, max(calls)  # enqueueing never waits on the network
        intervals = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(intervals) < 0.3, max(intervals)  # cadence held while Slack took 2 s/post
        slack.wait_for(lambda p: True, timeout=20, count=3)
        notifier.close()
        assert len(delivered(slack)) == 3  # slow is not failed: each sent once
        assert counts(notifier)["sent"] == 3


def test_a_full_queue_drops_and_counts_without_blocking() -> None:
    with FakeSlack() as slack:
        slack.enqueue(*(Response(delay=3.0) for _ in range(2)), path=SECRET)
        notifier = SlackNotifier(slack.url_for(SECRET), host="h", queue_size=2)
        started = time.monotonic()
        for incident in incidents(3):  # 6 messages into a queue of 2 behind a slow send
            notifier(incident)
        assert time.monotonic() - started < 0.1
        assert counts(notifier)["dropped"] >= 3
        notifier.close(timeout=10)


def test_connection_errors_are_retried_and_the_url_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level(logging.DEBUG)
    notifier = SlackNotifier(f"http://127.0.0.1:{port}{SECRET}", host="h", backoff=0.05,
                             max_attempts=3, min_interval=0.0)  # fmt: skip
    done = threading.Event()
    notifier(deadlock_incident())
    deadline = time.monotonic() + 10
    while counts(notifier)["failed"] == 0 and time.monotonic() < deadline:
        done.wait(0.05)
    notifier.close()
    assert counts(notifier) == {"sent": 0, "retried": 2, "failed": 1, "dropped": 0}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ConnectionError" in logged
    assert "XXXXsecretXXXX" not in logged


def test_the_url_is_not_logged_even_at_debug_on_success(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeSlack() as slack:
        notifier = SlackNotifier(slack.url_for(SECRET), host="h")
        notifier(deadlock_incident())
        slack.wait_for(lambda p: True, timeout=10)
        notifier.close()
    # urllib3 would log "POST <path> HTTP/1.1" here at DEBUG if agent.slack did not quiet it.
    ours = [r for r in caplog.records if r.name.startswith(("agent", "urllib3", "requests"))]
    assert "XXXXsecretXXXX" not in "\n".join(r.getMessage() for r in ours)


def test_posts_are_block_kit_json(tmp_path: object) -> None:
    with FakeSlack() as slack:
        notifier = SlackNotifier(slack.url_for(SECRET), host="web.1")
        notifier(deadlock_incident())
        (post,) = slack.wait_for(lambda p: True, timeout=10)
        notifier.close()
        assert isinstance(post, Post)
        assert post.headers.get("Content-Type") == "application/json"
        assert post.json["blocks"][0]["type"] == "header"
