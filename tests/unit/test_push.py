"""agent/push.py: the grouping key, URL validation, the l2met line (parsed back), and pushes to a
real loopback HTTP server that answers 200, 500 or never: outcomes counted, the timeout honoured,
one log line per cause, the group deleted on close, and no credentials in any log line."""

from __future__ import annotations

import base64
import contextlib
import http.server
import logging
import re
import socket
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from test_metrics import busy_report, registry_for

from agent import cli
from agent.config import WATCH_SETTINGS, AgentConfig, agent_config, resolve
from agent.errors import ConfigError
from agent.push import (
    JOB,
    L2MET_MAX,
    RESULTS,
    Pusher,
    classify,
    gateway_url,
    grouping_key,
    l2met_line,
    l2met_values,
    redact,
)

README = Path(__file__).resolve().parents[2] / "README.md"
TIMEOUT = 0.3  # every push here; the suite is near its time budget


# --- a gateway on loopback ---------------------------------------------------------------------


class Gateway:
    """A threaded loopback HTTP server that records (method, path, headers) and answers with
    `status` (or, with `hang` set, not at all until closed)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.hang = False
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._release = threading.Event()
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                gateway.requests.append((self.command, self.path, dict(self.headers.items())))
                if gateway.hang:
                    gateway._release.wait(10)
                    return
                self.send_response(gateway.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_DELETE = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Gateway:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def methods(self) -> list[str]:
        return [method for method, _, _ in self.requests]


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """A socket that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def pusher(gateway: str | None, *, interval: float = 15.0, first_push_after: float = 2.0) -> Pusher:
    """A pusher of a busy cycle's registry, as dyno web.1, with the short test timeout."""
    return Pusher(
        registry_for(busy_report()), instance="web.1", gateway=gateway, timeout=TIMEOUT,
        interval=interval, first_push_after=first_push_after,
    )  # fmt: skip


def results(p: Pusher) -> dict[str, int]:
    return {r: n for r, n in p.stats.snapshot()[0].items() if n}


# --- the grouping key --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "environ", "expected"),
    [
        (None, {"DYNO": "web.1"}, "web.1"),
        ("api-3", {"DYNO": "web.1"}, "api-3"),
        (None, {}, socket.gethostname()),
    ],
    ids=["dyno", "host-name-flag-wins", "hostname"],
)
def test_instance_is_host_name_flag_else_dyno_else_hostname(
    configured: str | None, environ: dict[str, str], expected: str
) -> None:
    instance = cli.host_name(configured, environ)
    assert instance == expected
    assert grouping_key(instance) == {"instance": expected}


def test_push_goes_to_the_job_and_instance_group_and_replaces_it() -> None:
    with Gateway() as gw:
        p = pusher(gw.url)
        p.push_once()
        assert p.group == "/metrics/job/deadlock-agent/instance/web.1"
        ((method, path, headers),) = gw.requests
        assert (method, path) == ("PUT", f"/metrics/job/{JOB}/instance/web.1")  # PUT replaces
        assert "Authorization" not in headers
    assert results(p) == {"ok": 1}
    assert p.stats.snapshot()[1] is not None


# --- the URL -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://pushgateway:9091", "https://user:pw@push.example.com/prefix/", "http://[::1]:9091"],
    ids=["http-port", "https-userinfo-path", "ipv6"],
)
def test_good_gateway_urls(url: str) -> None:
    assert gateway_url(f"  {url} ") == url


@pytest.mark.parametrize(
    "url",
    ["pushgateway:9091", "ftp://pushgateway", "http://", "http://:9091", "http://h:99999",
     "http://h:9091/?x=1", "https://u:pw@/path"],
    ids=["no-scheme", "ftp", "no-host", "port-only", "bad-port", "query", "userinfo-no-host"],
)  # fmt: skip
def test_bad_gateway_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"http:// or https://|\?query"):
        gateway_url(url)


def test_bad_gateway_is_one_line_exit_2_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["watch"], environ={"DEADLOCK_AGENT_PUSH_GATEWAY": "ftp://alice:s3cret@gw"})
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "--push-gateway / DEADLOCK_AGENT_PUSH_GATEWAY" in err
    assert "http:// or https://" in err
    assert "s3cret" not in err and "alice" not in err


def test_push_settings_parse_and_cross_check() -> None:
    args = cli.build_parser().parse_args(
        ["watch", "--push-gateway", "http://gw:9091", "--push-interval", "5", "--l2met"]
    )
    config = agent_config(resolve(WATCH_SETTINGS, args, {"DEADLOCK_AGENT_PUSH_TIMEOUT": "2"}))
    assert (config.push_gateway, config.push_interval, config.push_timeout, config.l2met) == (
        "http://gw:9091", 5.0, 2.0, True,
    )  # fmt: skip
    assert "pw" not in repr(AgentConfig(push_gateway="https://u:pw@gw"))
    with pytest.raises(ConfigError, match="--push-timeout must be at most --push-interval"):
        agent_config({"push_interval": 2.0, "push_timeout": 3.0})
    with pytest.raises(ConfigError, match="at most 10 seconds"):
        agent_config({"push_interval": 60.0, "push_timeout": 11.0})


def test_redact_drops_userinfo_only() -> None:
    assert redact("https://alice:s3cret@gw.example:8443/p") == "https://gw.example:8443/p"
    assert redact("http://gw") == "http://gw"


# --- l2met -------------------------------------------------------------------------------------

L2MET_TOKEN = re.compile(r"(sample|count)#(deadlock_agent\.\w+)=(-?[0-9.]+)([a-z]*)")


def parse_l2met(line: str) -> tuple[dict[str, tuple[str, float, str]], str]:
    """{name: (kind, value, unit)} and the source, asserting every token is well formed."""
    tokens = line.split(" ")
    *measures, source = tokens
    assert source.startswith("source="), line
    parsed = {}
    for token in measures:
        match = L2MET_TOKEN.fullmatch(token)
        assert match, f"not l2met: {token!r}"
        kind, name, value, unit = match.groups()
        parsed[name] = (kind, float(value), unit)
    return parsed, source.removeprefix("source=")


def test_l2met_line_of_a_busy_cycle_parses_back() -> None:
    values = l2met_values(registry_for(busy_report()))
    line = l2met_line(values, {}, source="web.1")
    parsed, source = parse_l2met(line)
    assert source == "web.1"
    assert "\n" not in line
    assert parsed == {
        "deadlock_agent.up": ("sample", 1, ""),
        "deadlock_agent.masters": ("sample", 2, ""),
        "deadlock_agent.workers_ok": ("sample", 1, ""),
        "deadlock_agent.workers_stuck": ("sample", 1, ""),
        "deadlock_agent.workers_deadlocked": ("sample", 1, ""),
        "deadlock_agent.workers_spinning": ("sample", 0, ""),
        "deadlock_agent.threads_stuck": ("sample", 3, ""),
        "deadlock_agent.request_capacity_ratio": ("sample", 0.5, ""),
        "deadlock_agent.oldest_stuck_thread": ("sample", 45.5, "s"),
        "deadlock_agent.incidents": ("count", 0, ""),  # busy_report has no named hangs total
        # timeout: 2 counted; vanished and native_unwind are normal and left out
        "deadlock_agent.sample_errors": ("count", 2, ""),
    }


def test_l2met_counts_are_increases_since_the_last_line() -> None:
    first = {"up": 1.0, "incidents": 3.0, "sample_errors": 5.0}
    second = {"up": 1.0, "incidents": 4.0, "sample_errors": 5.0}
    parsed, _ = parse_l2met(l2met_line(second, first, source="web.2"))
    assert parsed["deadlock_agent.incidents"] == ("count", 1, "")
    assert parsed["deadlock_agent.sample_errors"] == ("count", 0, "")
    # A counter that went down (the agent restarted) counts from zero.
    parsed, _ = parse_l2met(l2met_line({"incidents": 2.0}, second, source="web.2"))
    assert parsed["deadlock_agent.incidents"] == ("count", 2, "")


def test_l2met_line_stays_one_short_line_whatever_the_source() -> None:
    line = l2met_line({"up": 0.0}, {}, source="web 1\n" + "x" * 20000)
    assert len(line.encode()) < L2MET_MAX
    _, source = parse_l2met(line)
    assert source.startswith("web_1_x") and " " not in source


def test_readme_l2met_example_has_the_keys_the_agent_logs() -> None:
    example = next(line for line in README.read_text().splitlines()
                   if line.startswith("sample#deadlock_agent.up="))  # fmt: skip
    logged = l2met_line(l2met_values(registry_for(busy_report())), {}, source="web.1")
    assert parse_l2met(example)[0].keys() == parse_l2met(logged)[0].keys()
    assert [t.split("=")[0] for t in example.split()] == [t.split("=")[0] for t in logged.split()]


def test_l2met_only_logs_without_a_gateway() -> None:
    lines: list[str] = []
    p = Pusher(registry_for(busy_report()), instance="web.1", l2met=True, emit=lines.append)
    p.push_once()
    p.push_once()
    assert len(lines) == 2
    assert parse_l2met(lines[1])[0]["deadlock_agent.sample_errors"] == ("count", 0, "")
    assert results(p) == {}


# --- failures ----------------------------------------------------------------------------------


def test_500s_are_counted_and_logged_once_then_recovery_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.push")
    with Gateway(status=500) as gw:
        p = pusher(gw.url)
        for _ in range(3):
            p.push_once()
        gw.status = 400
        p.push_once()
        gw.status = 200
        p.push_once()
        p.push_once()
    assert results(p) == {"server_error": 3, "rejected": 1, "ok": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "failed" in m and "HTTP 500" in m] != []
    assert len([m for m in messages if "push to" in m and "failed (" in m]) == 2  # 500, then 400
    assert len([m for m in messages if "works again after 4 failed" in m]) == 1


@pytest.mark.timeout(20)
def test_a_gateway_that_never_answers_times_out_within_the_timeout() -> None:
    with silent_listener() as url:
        p = pusher(url)
        started = time.monotonic()
        p.push_once()
        took = time.monotonic() - started
    assert results(p) == {"timeout": 1}
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 1.0, took


def test_nothing_listening_is_a_connection_failure() -> None:
    p = pusher(f"http://127.0.0.1:{closed_port()}")
    p.push_once()
    assert results(p) == {"connection": 1}
    counts, last_ok = p.stats.snapshot()
    assert set(counts) == set(RESULTS)
    assert last_ok is None


def test_credentials_go_in_a_header_and_never_in_a_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with Gateway(status=503) as gw:
        url = gw.url.replace("http://", "http://alice:s3cr%40t@")
        p = pusher(url, interval=0.05, first_push_after=0.0)
        p.start()
        deadline = time.monotonic() + 5
        while len(gw.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        p.close()
    (_, _, headers), *_ = gw.requests
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"alice:s3cr@t").decode()
    assert gw.methods()[-1] == "DELETE"
    text = caplog.text
    assert "push to http://127.0.0.1:" in text and "HTTP 503" in text
    assert "s3cr" not in text and "alice" not in text


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (urllib.error.HTTPError("http://u:pw@gw/x", 500, "boom", {}, None),  # type: ignore[arg-type]
         ("server_error", "HTTP 500")),
        (urllib.error.HTTPError("http://u:pw@gw/x", 401, "no", {}, None),  # type: ignore[arg-type]
         ("rejected", "HTTP 401")),
        (urllib.error.URLError(ConnectionRefusedError(111, "refused")),
         ("connection", "ConnectionRefusedError")),
        (urllib.error.URLError(TimeoutError("timed out")), ("timeout", "timed out")),
        (TimeoutError("timed out"), ("timeout", "timed out")),
        (urllib.error.URLError("unknown url type: http://u:pw@gw"), ("error", "URLError")),
        (ValueError("http://u:pw@gw"), ("error", "ValueError")),
    ],
    ids=["500", "401", "refused", "connect-timeout", "read-timeout", "urlerror-text", "other"],
)  # fmt: skip
def test_classify_names_the_cause_never_the_url(
    err: BaseException, expected: tuple[str, str]
) -> None:
    assert classify(err) == expected
    assert "pw" not in classify(err)[1]


# --- the thread and close() --------------------------------------------------------------------


def test_pushes_on_the_interval_then_deletes_the_group_on_close() -> None:
    with Gateway() as gw:
        p = pusher(gw.url, interval=0.1, first_push_after=0.0)
        p.start()
        deadline = time.monotonic() + 5
        while len(gw.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        p.close()
        methods = gw.methods()
    assert methods[:3] == ["PUT", "PUT", "PUT"]
    assert methods[-1] == "DELETE" and methods.count("DELETE") == 1
    assert gw.requests[-1][1] == f"/metrics/job/{JOB}/instance/web.1"


@pytest.mark.timeout(20)
def test_close_is_bounded_when_the_gateway_hangs() -> None:
    with Gateway() as gw:
        p = pusher(gw.url, interval=0.05, first_push_after=0.0)
        p.start()
        deadline = time.monotonic() + 5
        while not gw.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        gw.hang = True  # the next push, and the delete, get no answer
        time.sleep(0.1)
        started = time.monotonic()
        p.close()
        took = time.monotonic() - started
    assert took < 2 * TIMEOUT + 1.5, took
    assert results(p).get("timeout", 0) >= 1


def test_collector_exports_push_outcomes() -> None:
    registry = CollectorRegistry()
    from agent.metrics import AgentCollector

    p = pusher(f"http://127.0.0.1:{closed_port()}")
    registry.register(AgentCollector(lambda: None, version="1", py_spy_version="0.4.3",
                                     pushes=p.stats.snapshot))  # fmt: skip
    p.push_once()
    get = registry.get_sample_value
    assert get("deadlock_agent_pushes_total", {"result": "connection"}) == 1
    assert get("deadlock_agent_pushes_total", {"result": "ok"}) == 0
    assert get("deadlock_agent_last_push_timestamp_seconds") == 0
