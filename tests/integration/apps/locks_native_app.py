"""A WSGI app that takes C mutexes in its request threads, through ctypes, from the library
tests/integration/test_native_locks.py builds (LOCKS_NATIVE_LIB).

/ab, /ba     lock a then b / b then a, meeting at a barrier: two request threads deadlock
/inherited   lock a mutex that a thread of the --preload master held when it forked
             (LOCKS_NATIVE_HOLD_IN_MASTER=1): an orphan in every worker
/condwait    wait on a C condition variable nobody signals (no owner: no proof)
/pylock      take a Python lock twice (a semaphore: no owner, no proof)
/            answers at once"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

lib = ctypes.CDLL(os.environ["LOCKS_NATIVE_LIB"])


def _python_lock_twice() -> None:
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()


ROUTES: dict[str, Callable[[], object]] = {
    "/ab": lib.lock_ab, "/ba": lib.lock_ba, "/inherited": lib.lock_inherited,
    "/condwait": lib.cond_forever, "/pylock": _python_lock_twice,
}  # fmt: skip

if os.environ.get("LOCKS_NATIVE_HOLD_IN_MASTER") == "1":
    threading.Thread(target=lib.hold_inherited, name="master-holder", daemon=True).start()
    deadline = time.monotonic() + 10
    while not lib.holding_now() & 2 and time.monotonic() < deadline:
        time.sleep(0.01)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Route to a lock scenario or answer at once."""
    route = ROUTES.get(environ["PATH_INFO"])
    if route is not None:
        route()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]
