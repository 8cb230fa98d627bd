"""The demo ASGI app, no framework: asyncio shapes for `gunicorn -k uvicorn.workers.UvicornWorker`.

  /                     ok
  /block?seconds=N      blocks the event loop with a synchronous call: time.sleep(N), or with
                        &in=db a synchronous psycopg2 `SELECT pg_sleep(N)` (DEMO_DATABASE_URL)
  /awaits?n=N           N short awaits (asyncio.sleep(0.001)): a loop busy, and healthy
  /slow?seconds=N       awaits asyncio.sleep(N): a slow request, the loop free meanwhile
  /db                   SELECT 1 on a fresh connection, off the loop (asyncio.to_thread)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from agent.demo import db

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_SECONDS = 60.0
MAX_AWAITS = 100_000


def _number(query: dict[str, list[str]], key: str, default: float, cap: float) -> float:
    return min(max(float(query.get(key, [str(default)])[0]), 0.0), cap)


async def _respond(send: Send, status: int, body: str) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body.encode()})


async def _route(path: str, query: dict[str, list[str]]) -> tuple[int, str]:
    if path == "/":
        return 200, "ok\n"
    if path == "/block":
        seconds = _number(query, "seconds", 1.0, MAX_SECONDS)
        if query.get("in", [""])[0] == "db":
            db.query("SELECT pg_sleep(%s)", (seconds,))  # on the loop: the bug being shown
            return 200, f"blocked the event loop {seconds:g}s in PostgreSQL\n"
        time.sleep(seconds)  # on the loop: the bug being shown
        return 200, f"blocked the event loop {seconds:g}s\n"
    if path == "/awaits":
        n = int(_number(query, "n", 100, MAX_AWAITS))
        for _ in range(n):
            await asyncio.sleep(0.001)
        return 200, f"awaited {n} times\n"
    if path == "/slow":
        seconds = _number(query, "seconds", 1.0, MAX_SECONDS)
        await asyncio.sleep(seconds)
        return 200, f"awaited {seconds:g}s\n"
    if path == "/db":
        return 200, f"db says {await asyncio.to_thread(db.query, 'SELECT 1')}\n"
    return 404, "not found\n"


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI entry point; see the module docstring for the routes."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    query = parse_qs(scope.get("query_string", b"").decode())
    try:
        status, body = await _route(scope["path"], query)
    except Exception as err:  # the demo reports any failure (bad number, database) as a 503
        status, body = 503, f"error: {type(err).__name__}: {err}\n"
    await _respond(send, status, body)
