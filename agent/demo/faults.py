"""Fault injection on loopback: a TCP proxy that can stall new connections, and an HTTPS server.

The stall reproduces the seed's hang with real libraries: for PostgreSQL the proxy answers libpq's
SSLRequest with "S" (go ahead with TLS) and then says nothing, so libpq sits in its TLS handshake
(`PQconnectdb -> PQsocketPoll -> poll`); for HTTPS it accepts and says nothing, so the client
sits in `SSLSocket.do_handshake -> SSL_do_handshake -> BIO_read -> read`.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

# PostgreSQL protocol: an SSLRequest is length 8 + this code (docs: protocol-message-formats).
SSL_REQUEST_CODE = 80877103
SSL_REQUEST = struct.pack("!ii", 8, SSL_REQUEST_CODE)


class FaultProxy:
    """Forwards loopback TCP to `upstream`; after stall(), new connections hang instead."""

    def __init__(
        self,
        upstream: tuple[str, int] | None,
        *,
        protocol: Literal["postgres", "tcp"] = "tcp",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = upstream
        self.protocol = protocol
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self._stalled = threading.Event()
        self._lock = threading.Lock()
        self._held: list[socket.socket] = []  # stalled client sockets, kept open on purpose
        self._open: set[socket.socket] = set()  # every socket we own, closed on close()
        self.stalled_connections = 0
        self.forwarded_connections = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        """Begin accepting."""
        self._thread.start()
        return self

    def stall(self) -> None:
        """From now on new connections hang (established ones keep flowing)."""
        self._stalled.set()

    def heal(self) -> None:
        """Forward new connections again and hang up on the stalled ones, so their threads fail."""
        self._stalled.clear()
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            self._close(sock)

    @property
    def stalled(self) -> bool:
        """Whether new connections are being stalled."""
        return self._stalled.is_set()

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._open)
            self._held.clear()
        for sock in socks:
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            if self._stalled.is_set():
                self._hold(client)
            elif self.upstream is None:
                self._refuse(client)
            else:
                self._forward(client, self.upstream)
        except OSError as err:
            log.debug("fault proxy connection ended: %s", err)
            self._close(client)

    def _hold(self, client: socket.socket) -> None:
        if self.protocol == "postgres":
            first = _recv_exactly(client, 8)
            if first == SSL_REQUEST:
                client.sendall(b"S")  # "go ahead with TLS" ... and then silence
        with self._lock:
            self._held.append(client)
            self.stalled_connections += 1

    def _refuse(self, client: socket.socket) -> None:
        # No upstream (the demo has no PostgreSQL): decline TLS so libpq fails fast.
        if self.protocol == "postgres" and _recv_exactly(client, 8) == SSL_REQUEST:
            client.sendall(b"N")
        self._close(client)

    def _forward(self, client: socket.socket, upstream: tuple[str, int]) -> None:
        server = socket.create_connection(upstream, timeout=10)
        server.settimeout(None)
        with self._lock:
            self._open.add(server)
            self.forwarded_connections += 1
        threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
        self._pump(client, server)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close(source)
            self._close(sink)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


class _OkHandler(http.server.BaseHTTPRequestHandler):
    """Answers any GET/POST with 200 and a tiny JSON body, like a telemetry collector."""

    protocol_version = "HTTP/1.1"

    def _ok(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        delay = getattr(self.server, "reply_delay", 0.0)
        if delay:  # a slow collector: the client waits for the reply inside SSL_read
            time.sleep(delay)
        body = b'{"ok": true}\n'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _ok
    do_POST = _ok

    def log_message(self, format: str, *args: object) -> None:
        log.debug("https server: %s", format % args)


class HttpsServer:
    """A real HTTPS server on loopback with a certificate from a throwaway CA (trustme)."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        import trustme  # demo/test dependency: `pip install deadlock-agent[demo]`

        self.ca = trustme.CA()
        self.ca_file = workdir / "demo-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert(host, "localhost").configure_cert(context)
        self._server = http.server.ThreadingHTTPServer((host, 0), _OkHandler)
        self._server.daemon_threads = True
        self._server.reply_delay = 0.0  # type: ignore[attr-defined]
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.host, self.port = host, self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="https-server", daemon=True
        )

    def start(self) -> HttpsServer:
        """Begin serving."""
        self._thread.start()
        return self

    def slow_replies(self, seconds: float) -> None:
        """Answer every request `seconds` late (0: at once again): a slow, not a dead, peer."""
        self._server.reply_delay = seconds  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
