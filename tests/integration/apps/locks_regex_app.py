"""A WSGI app whose /regex?n=N runs a catastrophic-backtracking regular expression on N a's and
a b (research entry 13, gil_spin_in_c): about 2**N steps inside _sre, which never releases the
GIL. n=40 runs for hours; n=12 returns at once (the healthy twin). / answers at once."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

NESTED = re.compile(r"(a+)+$")


def validate(text: str) -> bool:
    """The classic ReDoS pattern, through re.match (so Python frames show it too)."""
    return re.match(NESTED, text) is not None


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """/regex?n=N validates N a's and a b; anything else answers at once."""
    if environ["PATH_INFO"] == "/regex":
        n = int(parse_qs(environ.get("QUERY_STRING", "")).get("n", ["12"])[0])
        validate("a" * n + "b")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]
