"""The demo WSGI app: the seed's shape in forty lines.

Each request opens a new PostgreSQL connection (Django's default before CONN_MAX_AGE) over TLS,
and a background thread named like New Relic's harvest thread posts to an HTTPS endpoint.
Configured by environment variables so the same app runs under the demo, the tests and Procfile:

  DEMO_DATABASE_URL   libpq DSN for /db and /slow (sslmode=require recommended)
  DEMO_HARVEST_URL    https:// URL the harvest thread POSTs to (unset: no harvest thread)
  DEMO_CA_FILE        CA bundle to verify DEMO_HARVEST_URL with
  DEMO_HARVEST_INTERVAL  seconds between harvests (default 1)
  DEMO_PTRACER        a pid, or `any`: each worker lets it (and its descendants) ptrace it under
                      Yama, and says so on stderr; the demo sets its own pid (agent.demo.ptrace)

Endpoints (healthy traffic shapes the tests and benchmarks drive, besides the hang):
  /                        ok, no database
  /db                      SELECT 1 on a fresh TLS connection
  /slow?seconds=N          pg_sleep(N) on a fresh TLS connection
  /stream?seconds=N&every=S  a response written slowly: 1 KiB every S seconds for N seconds
  /resume?stuck=N&work=M   a query that blocks N seconds, then M seconds of light work
                           (about 5 ms of CPU a second): a thread that was stuck and resumes
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

from agent.demo import ptrace
from agent.demo.db import query

log = logging.getLogger(__name__)

_harvest_lock = threading.Lock()
_harvest_pid: int | None = None
_ptracer_lock = threading.Lock()
_ptracer_pid: int | None = None


def _harvest_loop(url: str, ca_file: str | None, interval: float) -> None:
    import requests

    stop = threading.Event()
    while not stop.wait(interval):
        try:
            # A new TLS connection per harvest, and no timeout, like many telemetry agents of
            # the time: a peer that stalls the handshake hangs this thread inside OpenSSL.
            requests.post(url, json={"harvest": True}, verify=ca_file or True, timeout=None)
        except requests.RequestException as err:
            log.warning("harvest failed: %s", err)


def ensure_harvest_thread() -> None:
    """Start the harvest thread once per process (after gunicorn forks a worker)."""
    global _harvest_pid
    url = os.environ.get("DEMO_HARVEST_URL")
    if not url:
        return
    with _harvest_lock:
        if _harvest_pid == os.getpid():
            return
        _harvest_pid = os.getpid()
        interval = float(os.environ.get("DEMO_HARVEST_INTERVAL", "1"))
        threading.Thread(
            target=_harvest_loop,
            args=(url, os.environ.get("DEMO_CA_FILE"), interval),
            name="NR-Harvest-Thread",
            daemon=True,
        ).start()


def ensure_tracer_allowed() -> None:
    """Once per process (each gunicorn worker, also under --preload): allow DEMO_PTRACER."""
    global _ptracer_pid
    value = os.environ.get("DEMO_PTRACER")
    if not value or _ptracer_pid == os.getpid():
        return
    with _ptracer_lock:
        if _ptracer_pid == os.getpid():
            return
        _ptracer_pid = os.getpid()
        tracer = ptrace.parse_tracer(value)
        took = ptrace.allow_tracer(tracer)
        # PR_SET_PTRACER is per process and not inherited: a respawned worker says it again.
        named = "PR_SET_PTRACER_ANY" if tracer == ptrace.PR_SET_PTRACER_ANY else str(tracer)
        print(
            f"demo app: worker pid {_ptracer_pid} called prctl(PR_SET_PTRACER, {named}): "
            + ("in effect" if took else "not in effect (no Yama here, so nothing to allow)"),
            file=sys.stderr,
            flush=True,
        )


def _stream(seconds: float, every: float) -> Iterator[bytes]:
    deadline = time.monotonic() + seconds
    chunk = b"x" * 1023 + b"\n"
    while time.monotonic() < deadline:
        yield chunk
        time.sleep(every)


def _light_work(seconds: float) -> int:
    """About 5 ms of CPU a second, in small steps: a thread that is plainly making progress."""
    deadline = time.monotonic() + seconds
    total = 0
    while time.monotonic() < deadline:
        step = time.thread_time() + 0.0005
        while time.thread_time() < step:
            total += 1
        time.sleep(0.1)
    return total


def _number(environ: dict[str, Any], name: str, default: float, cap: float = 600.0) -> float:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    return max(0.0, min(float(query.get(name, [default])[0]), cap))


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The demo's endpoints (see the module docstring)."""
    ensure_tracer_allowed()
    ensure_harvest_thread()
    path = environ.get("PATH_INFO", "/")
    try:
        if path == "/":
            body = "ok\n"
        elif path == "/db":
            body = f"db says {query('SELECT 1')}\n"
        elif path == "/slow":
            seconds = _number(environ, "seconds", 1.0, cap=60.0)
            query("SELECT pg_sleep(%s)", (seconds,))
            body = f"slept {seconds:g}s in PostgreSQL\n"
        elif path == "/stream":
            seconds = _number(environ, "seconds", 30.0)
            every = max(_number(environ, "every", 0.5), 0.01)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return _stream(seconds, every)
        elif path == "/resume":
            stuck = _number(environ, "stuck", 15.0)
            query("SELECT pg_sleep(%s)", (stuck,))
            body = f"stuck {stuck:g}s, then {_light_work(_number(environ, 'work', 30.0))} steps\n"
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
    except Exception as err:  # the demo reports any database failure as a 503
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"database error: {type(err).__name__}: {err}\n".encode()]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]


ensure_tracer_allowed()  # before any request, so before any hang
ensure_harvest_thread()
