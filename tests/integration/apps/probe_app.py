"""A WSGI app for the in-process probe's live tests (tests/integration/test_probe_live.py).

/              answers at once
/wait          blocks forever in threading.Event().wait() (wait_forever)
/recv          blocks forever in recv() from PROBE_APP_SILENT_PORT, a server that never answers
/fork          forks; the child reports whether it has a probe socket, then leaves
/regex?n=N     a catastrophic regular expression on N a's and a b: _sre holds the GIL ~2**N
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

NESTED = re.compile(r"(a+)+$")


def wait_forever() -> None:
    """Park this request thread on an event nobody sets."""
    threading.Event().wait()


def recv_forever() -> None:
    """Read from a peer that accepted the connection and never writes."""
    with socket.create_connection(("127.0.0.1", int(os.environ["PROBE_APP_SILENT_PORT"]))) as s:
        s.recv(1)


def fork_child() -> bytes:
    """Fork; the child says whether it got a probe socket of its own."""
    directory = os.environ["DEADLOCK_AGENT_PROBE_DIR"]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        has = (Path(directory) / f"{os.getpid()}.sock").exists()
        os.write(write_end, f"child {os.getpid()} socket={int(has)}".encode())
        os._exit(0)
    os.close(write_end)
    try:
        return os.read(read_end, 200)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def validate(text: str) -> bool:
    """The classic ReDoS pattern, through re.match (so Python frames show it too)."""
    return re.match(NESTED, text) is not None


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Dispatch on the path (see the module docstring)."""
    path = environ["PATH_INFO"]
    body = b"ok\n"
    if path == "/wait":
        wait_forever()
    elif path == "/recv":
        recv_forever()
    elif path == "/fork":
        body = fork_child()
    elif path == "/regex":
        n = int(parse_qs(environ.get("QUERY_STRING", "")).get("n", ["12"])[0])
        validate("a" * n + "b")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
