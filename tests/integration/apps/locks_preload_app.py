"""A WSGI app for `gunicorn --preload` whose master may hold a Python lock while it forks
(research entry 1, fork_inherited_lock).

The app logs through a QueueHandler. With LOCKS_HOLD_IN_MASTER=1 a thread of the importing
process (the master, under --preload) takes the queue's mutex and keeps it: every worker is forked
with the mutex locked and without that thread, so the first request that logs (/log) waits
forever. Without it (the healthy twin), /log answers at once. / never logs (readiness)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

RECORDS: queue.Queue[logging.LogRecord] = queue.Queue()
log = logging.getLogger("locks_preload_app")
log.addHandler(logging.handlers.QueueHandler(RECORDS))
log.setLevel(logging.INFO)
log.propagate = False


def _flusher(holding: threading.Event) -> None:
    # A telemetry flusher caught inside its critical section at the instant of the fork.
    with RECORDS.mutex:
        holding.set()
        while True:
            time.sleep(3600)


if os.environ.get("LOCKS_HOLD_IN_MASTER") == "1":
    _holding = threading.Event()
    threading.Thread(target=_flusher, args=(_holding,), name="telemetry-flusher",
                     daemon=True).start()  # fmt: skip
    _holding.wait(10)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """/log logs one line through the queue; anything else answers at once."""
    if environ["PATH_INFO"] == "/log":
        log.info("handled %s", environ["PATH_INFO"])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]
