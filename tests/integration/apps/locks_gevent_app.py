"""A WSGI app for gunicorn's gevent worker with two ways to freeze the whole worker (issue 8).

/blocking_c   a C call gevent cannot patch (libc recv through ctypes, on a socket whose peer
              never answers): the hub never runs again (gevent_hub_blocked).
/hold, /take  a threading.Lock created at import, before the worker monkey-patches (load it
              with --preload): /hold takes it and yields to the hub; /take then blocks the OS
              thread on it, so the hub can never resume /hold (gevent_unpatched_lock).
/             answers at once (readiness)."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

LOCK = threading.Lock()  # a real OS lock when imported before gevent's monkey-patching
_LISTENER = socket.socket()
_LISTENER.bind(("127.0.0.1", 0))
_LISTENER.listen()


def _blocking_c() -> None:
    peer = socket.create_connection(_LISTENER.getsockname())
    os.set_blocking(peer.fileno(), True)  # gevent's sockets are non-blocking underneath
    buf = ctypes.create_string_buffer(16)
    ctypes.CDLL(None).recv(peer.fileno(), buf, 16, 0)  # gevent cannot make this cooperative


def _hold() -> None:
    with LOCK:
        time.sleep(5)  # patched: yields to the hub while holding the OS lock


def _take() -> None:
    with LOCK:
        pass


ROUTES: dict[str, Callable[[], None]] = {
    "/blocking_c": _blocking_c, "/hold": _hold, "/take": _take,
}  # fmt: skip


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Route to a fault or answer at once."""
    route = ROUTES.get(environ["PATH_INFO"])
    if route is not None:
        route()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]
