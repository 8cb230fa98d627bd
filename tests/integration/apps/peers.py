"""Peers that misbehave on purpose, for the network and database hang tests: a TCP listener that
accepts and never answers (an upstream, Redis, MySQL or TLS server gone silent), and an HTTP
server that streams a chunked reply forever (a response a client can leave open)."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Self


class _Listener:
    """A listener on 127.0.0.1 (any free port) that hands each connection to `_serve`."""

    name = "peer"

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._conns: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name=self.name)

    def start(self) -> Self:
        """Start accepting in a daemon thread."""
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop accepting and drop every connection (blocked clients then see EOF)."""
        self._closed.set()
        for sock in (self._listener, *self._conns):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(5)


class SilentServer(_Listener):
    """Accepts connections and never sends a byte (nor closes) until close()."""

    name = "silent-server"

    def _serve(self, conn: socket.socket) -> None:
        pass  # held open, never read nor written


class EndlessChunkedServer(_Listener):
    """Answers every HTTP request with a chunked 200 that never ends (a chunk every 0.2 s)."""

    name = "chunked-server"

    def _serve(self, conn: socket.socket) -> None:
        threading.Thread(target=self._stream, args=(conn,), daemon=True).start()

    def _stream(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while not self._closed.wait(0.2):
                conn.sendall(b"5\r\nhello\r\n")
