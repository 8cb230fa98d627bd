"""agent/server.py: listen-address parsing, the WSGI app called directly (routes, /healthz
freshness with an injected clock), and one real HttpServer on loopback."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from prometheus_client import CollectorRegistry

from agent.errors import ConfigError
from agent.metrics import AgentCollector
from agent.server import DEFAULT_LISTEN, AgentApp, HttpServer, parse_listen_address
from agent.types import CycleReport, WorkerRef, WorkerReport, WorkerState

FINISHED_AT = 1700000000.0
STALE_AFTER = 13.0


def cycle(*, finished_at: float = FINISHED_AT, workers: tuple[WorkerReport, ...] = (),
          masters: tuple[int, ...] = (100,)) -> CycleReport:  # fmt: skip
    return CycleReport(finished_at=finished_at, duration=0.01, masters=masters, workers=workers,
                       complete=True, signatures=("libpq_ssl_with_https",))  # fmt: skip


def worker(pid: int, state: WorkerState) -> WorkerReport:
    return WorkerReport(worker=WorkerRef(pid, 1.0, 100), state=state, threads=())


def app_for(report: CycleReport | None, *, now: float = FINISHED_AT + 1.0) -> AgentApp:
    """An AgentApp over a fresh registry (with the real collector) and a fixed clock."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: report, version="1.0", py_spy_version="0.4.3"))
    return AgentApp(registry, lambda: report, stale_after=STALE_AFTER, clock=lambda: now)


@dataclass
class Response:
    status: str
    headers: dict[str, str]
    body: str

    @property
    def code(self) -> int:
        return int(self.status.split()[0])


def call(app: Callable[..., Any], path: str) -> Response:
    """One GET through the WSGI interface, no sockets."""
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return Response(seen["status"], seen["headers"], body.decode())


# --- parse_listen_address ----------------------------------------------------------------------

GOOD_ADDRESSES = {
    "127.0.0.1:19808": ("127.0.0.1", 19808),
    "0.0.0.0:19808": ("0.0.0.0", 19808),
    ":19808": ("0.0.0.0", 19808),
    "localhost:0": ("localhost", 0),
    "[::1]:19808": ("::1", 19808),
    "[::]:65535": ("::", 65535),
    DEFAULT_LISTEN: ("127.0.0.1", 19808),
}
BAD_ADDRESSES = ["19808", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:65536",
                 "127.0.0.1:-1", "127.0.0.1: 80", "", "[::1]"]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), GOOD_ADDRESSES.items(), ids=GOOD_ADDRESSES.keys())
def test_parse_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", BAD_ADDRESSES, ids=[repr(t) for t in BAD_ADDRESSES])
def test_parse_listen_address_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_listen_address(text)
    assert "port" in str(caught.value) or repr(text) in str(caught.value)


# --- AgentApp as WSGI --------------------------------------------------------------------------


def test_healthz_503_before_the_first_cycle() -> None:
    response = call(app_for(None), "/healthz")
    assert response.code == 503
    assert "no sampling cycle yet" in response.body


@pytest.mark.parametrize(
    ("age", "code"),
    [(0.0, 200), (1.0, 200), (STALE_AFTER, 200), (STALE_AFTER + 0.5, 503), (3600.0, 503)],
    ids=["just-now", "fresh", "at-the-limit", "just-stale", "an-hour"],
)
def test_healthz_freshness(age: float, code: int) -> None:
    response = call(app_for(cycle(), now=FINISHED_AT + age), "/healthz")
    assert response.code == code
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.body.startswith("ok" if code == 200 else "stale")


def test_healthz_reads_the_clock_at_each_request() -> None:
    now = [FINISHED_AT + 1]
    app = AgentApp(CollectorRegistry(), cycle, stale_after=STALE_AFTER, clock=lambda: now[0])
    assert call(app, "/healthz").code == 200
    now[0] = FINISHED_AT + 60
    assert call(app, "/healthz").code == 503


def test_landing_page_without_a_cycle() -> None:
    response = call(app_for(None), "/")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "no cycle yet" in response.body
    assert 'href="metrics"' in response.body
    assert 'href="healthz"' in response.body


def test_landing_page_summarises_workers() -> None:
    report = cycle(workers=(worker(101, WorkerState.OK), worker(102, WorkerState.DEADLOCKED)))
    body = call(app_for(report), "/").body
    assert "pid 101: ok" in body
    assert "pid 102: deadlocked" in body
    assert "masters [100]" in body


def test_landing_page_with_no_workers() -> None:
    assert "no gunicorn workers found" in call(app_for(cycle(masters=())), "/").body


def test_metrics_route_serves_the_registry() -> None:
    response = call(app_for(cycle()), "/metrics")
    assert response.code == 200
    assert "deadlock_agent_up 1.0" in response.body
    assert 'deadlock_agent_deadlocked_workers{signature="libpq_ssl_with_https"} 0.0' in (
        response.body
    )


@pytest.mark.parametrize("path", ["/nope", "/metrics/", "/healthz/x", "/index.html"],
                         ids=["unknown", "metrics-slash", "healthz-sub", "index"])  # fmt: skip
def test_unknown_path_is_404(path: str) -> None:
    response = call(app_for(cycle()), path)
    assert response.code == 404
    assert "/metrics" in response.body


# --- the real server ---------------------------------------------------------------------------


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_http_server_on_loopback() -> None:
    server = HttpServer(app_for(cycle()), "127.0.0.1:0").start()
    try:
        assert server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert get(server.url + "/healthz")[0] == 200
        status, body = get(server.url + "/metrics")
        assert status == 200
        assert "deadlock_agent_up 1.0" in body
        assert get(server.url + "/")[0] == 200
        assert get(server.url + "/missing")[0] == 404
    finally:
        started = time.monotonic()
        server.close()
    # It sleeps in select() for up to IDLE_POLL between requests; close() wakes it at once.
    assert time.monotonic() - started < 2
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), 1):
        pass  # the port is released


@pytest.mark.parametrize("address", ["0.0.0.0:0", "127.0.0.1:0"])
def test_an_idle_server_closes_at_once(address: str) -> None:
    server = HttpServer(app_for(cycle()), address).start()
    time.sleep(0.2)  # in select(), with no request to wake it
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 2


def test_http_server_ipv6_loopback_url() -> None:
    try:
        server = HttpServer(app_for(cycle()), "[::1]:0").start()
    except ConfigError as err:
        pytest.skip(f"no IPv6 loopback on this machine: {err}")
    try:
        assert server.url == f"http://[::1]:{server.port}"
        assert get(server.url + "/healthz")[0] == 200
    finally:
        server.close()


def test_busy_port_is_a_config_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            HttpServer(app_for(None), f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "in use" in str(caught.value)


def test_close_without_start_returns() -> None:
    """close() must release the port even if start() never ran (e.g. startup failed midway)."""
    server = HttpServer(app_for(None), "127.0.0.1:0")
    closer = threading.Thread(target=server.close, daemon=True)
    closer.start()
    closer.join(1.0)
    assert not closer.is_alive(), "HttpServer.close() blocks forever when start() was not called"
