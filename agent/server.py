"""The HTTP server: /metrics, /healthz, /incidents and a landing page, on a background thread;
with `--web.config.file`, every route behind its basic auth and the listener behind its TLS."""

from __future__ import annotations

import contextlib
import html
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from agent.errors import ConfigError
from agent.incidents import IncidentStore
from agent.types import CycleReport
from agent.webconfig import REALM, BasicAuth, WebConfig, WebConfigFile

log = logging.getLogger(__name__)

DEFAULT_PORT = 19808
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
IDLE_POLL = 3600.0  # seconds serve_forever may sleep in select() with no request
HANDSHAKE_TIMEOUT = 10.0  # seconds a client gets to finish its TLS handshake
REQUEST_TIMEOUT = 30.0  # seconds a client may leave a socket operation hanging (slow clients)

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


def parse_listen_address(value: str) -> tuple[str, int]:
    """"HOST:PORT", ":PORT" or "[v6]:PORT" -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} out of range")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":PORT" means all interfaces, as in Prometheus
    return host, port


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s", format % args)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class AgentApp:
    """The WSGI application: routes to the Prometheus exposition or the agent's own pages."""

    def __init__(
        self,
        registry: CollectorRegistry,
        report: Callable[[], CycleReport | None],
        *,
        stale_after: float,
        clock: Callable[[], float] = time.time,
        store: IncidentStore | None = None,
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._store = store
        self._report = report
        self.stale_after = stale_after
        self._clock = clock

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            return self._healthz(start_response)
        if path == "/":
            return self._landing(start_response)
        if path in ("/incidents", "/incidents/") or path.startswith("/incidents/"):
            return self._incidents(environ, path, start_response)
        return _text(start_response, "404 Not Found", "not found; try /metrics\n")

    def _incidents(
        self, environ: Environ, path: str, start_response: StartResponse
    ) -> Iterable[bytes]:
        if self._store is None:
            return _text(start_response, "404 Not Found", "incident store disabled\n")
        incident_id = path[len("/incidents/"):].strip("/") if path.startswith("/incidents/") else ""
        want_text = "format=text" in environ.get("QUERY_STRING", "") or (
            "text/plain" in environ.get("HTTP_ACCEPT", "")
            and "application/json" not in environ.get("HTTP_ACCEPT", "")
        )
        if incident_id.endswith(".txt"):
            incident_id, want_text = incident_id[:-4], True
        if not incident_id:
            listing = [
                {**s.summary, "id": s.id, "url": f"/incidents/{s.id}"}
                for s in self._store.list()
            ]
            if want_text:
                lines = [
                    f"{s['id']}  {s.get('verdict')}  worker {s.get('worker_pid')}  "
                    f"{'resolved' if s.get('resolved_at') else 'OPEN'}"
                    for s in listing
                ]
                return _text(start_response, "200 OK", "\n".join(lines) + "\n")
            return _json(start_response, "200 OK", listing)
        if want_text:
            text = self._store.get_text(incident_id)
            if text is None:
                return _text(start_response, "404 Not Found", "no such incident\n")
            return _text(start_response, "200 OK", text)
        record = self._store.get(incident_id)
        if record is None:
            return _json(start_response, "404 Not Found", {"error": "no such incident"})
        return _json(start_response, "200 OK", record)

    def _healthz(self, start_response: StartResponse) -> Iterable[bytes]:
        report = self._report()
        if report is None:
            return _text(start_response, "503 Service Unavailable", "no sampling cycle yet\n")
        age = self._clock() - report.finished_at
        if age > self.stale_after:
            return _text(
                start_response,
                "503 Service Unavailable",
                f"stale: last cycle {age:.1f}s ago (limit {self.stale_after:g}s)\n",
            )
        return _text(start_response, "200 OK", f"ok: last cycle {age:.1f}s ago\n")

    def _landing(self, start_response: StartResponse) -> Iterable[bytes]:
        report = self._report()
        if report is None:
            summary = "no cycle yet"
        else:
            states = ", ".join(
                f"pid {w.worker.pid}: {w.state.value}" for w in report.workers
            ) or "no gunicorn workers found"
            summary = f"masters {list(report.masters)}; {states}"
            if report.open_incidents:
                summary += "; OPEN INCIDENTS: " + ", ".join(
                    f"{i.id} ({i.verdict.value})" for i in report.open_incidents
                )
        body = (
            "<!doctype html><title>deadlock-agent</title><h1>deadlock-agent</h1>"
            f"<p>{html.escape(summary)}</p>"
            '<ul><li><a href="metrics">/metrics</a></li>'
            '<li><a href="healthz">/healthz</a></li>'
            '<li><a href="incidents">/incidents</a></li></ul>'
        )
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [body.encode()]


def _json(start_response: StartResponse, status: str, body: object) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(body, indent=1, sort_keys=True).encode()]


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode()]


class Guard:
    """Every route behind the web configuration: basic auth (401 with no detail), its response
    headers; 500 for every request while a changed file does not load (as exporter-toolkit)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], web: WebConfigFile) -> None:
        self._app = app
        self._web = web
        self._auth: tuple[WebConfig, BasicAuth] | None = None  # rebuilt when the file is

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        config = self._web.current()
        if config is None:
            return _text(start_response, "500 Internal Server Error", "Internal Server Error\n")
        extra = list(config.headers)
        if config.users and not self._auth_of(config).allows(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("WWW-Authenticate", f'Basic realm="{REALM}"'),
                *extra,
            ])  # fmt: skip
            return [b"Unauthorized\n"]
        if not extra:
            return self._app(environ, start_response)

        def with_headers(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            return start_response(status, [*headers, *extra], *exc_info)

        return self._app(environ, with_headers)

    def _auth_of(self, config: WebConfig) -> BasicAuth:
        auth = self._auth
        if auth is None or auth[0] is not config:
            auth = (config, BasicAuth(config.users))
            self._auth = auth
        return auth[1]


class HttpServer:
    """Serves an AgentApp from a daemon thread; close() stops it. With `web`, requests pass
    its Guard and, when it configures TLS, connections its TLS (the handshake in the request's
    own thread, so a client that never finishes it holds up nobody else)."""

    def __init__(
        self, app: Callable[..., Iterable[bytes]], address: str, *,
        web: WebConfigFile | None = None,
    ) -> None:  # fmt: skip
        host, port = parse_listen_address(address)
        tls = web is not None and web.tls
        if web is not None:
            app = Guard(app, web)

        class Server(ThreadingWSGIServer):
            address_family = _family(host)

            def get_request(self) -> tuple[socket.socket, Any]:
                connection, client = super().get_request()
                if not tls:
                    return connection, client
                config = web.current() if web is not None else None
                if config is None or config.ssl_context is None:
                    connection.close()
                    raise OSError("web config broken")  # serve_forever drops this connection
                wrapped = config.ssl_context.wrap_socket(
                    connection, server_side=True, do_handshake_on_connect=False
                )
                return wrapped, client

            def finish_request(self, request: Any, client_address: Any) -> None:
                if tls:
                    request.settimeout(HANDSHAKE_TIMEOUT)
                    request.do_handshake()
                super().finish_request(request, client_address)

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A failed handshake, a reset, a timeout: the client's doing. socketserver
                # would print a stack trace to stderr; one debug line says enough.
                err = sys.exc_info()[1]
                log.debug("http: connection from %s ended: %s", client_address[0], err)

        try:
            self._server: WSGIServer = make_server(
                host, port, app, server_class=Server, handler_class=_QuietHandler
            )
        except OSError as err:
            raise ConfigError(f"cannot listen on {address}: {err.strerror or err}") from err
        self.port = self._server.server_port
        self.host = host
        self.scheme = "https" if tls else "http"
        # A long poll: serve_forever wakes only for requests (each wake-up of an idle thread
        # costs tens of microseconds of CPU); close() wakes it with a connection instead.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": IDLE_POLL},
            name="deadlock-agent-http", daemon=True,
        )  # fmt: skip

    @property
    def url(self) -> str:
        """Base URL of the server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> HttpServer:
        """Begin serving in the background."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread.is_alive():  # shutdown() waits for serve_forever: only if it runs
            stopper = threading.Thread(target=self._server.shutdown, daemon=True)
            stopper.start()
            deadline = time.monotonic() + 5
            while stopper.is_alive() and time.monotonic() < deadline:
                self._wake()  # select() returns, serve_forever sees the shutdown request
                stopper.join(0.1)
        self._server.server_close()

    def _wake(self) -> None:
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - not a bind
        host = wildcard.get(self.host, self.host)
        with contextlib.suppress(OSError), socket.create_connection((host, self.port), 1):
            pass
