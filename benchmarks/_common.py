"""What the live benchmarks share: the integration harness (the only thing that provides a real
PostgreSQL), traffic clients that count statuses, and progress lines on stderr.

The benchmarks are scripts, run as `python benchmarks/<name>.py`, so this directory is on
sys.path and `import _common` finds this module; it puts tests/integration there too.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

INTEGRATION = Path(__file__).resolve().parent.parent / "tests" / "integration"
if str(INTEGRATION) not in sys.path:
    sys.path.insert(0, str(INTEGRATION))

from harness import AgentProcess, App, Metrics, running_app  # noqa: E402
from pgserver import PgServer, running_postgres  # noqa: E402

from agent.demo.run import get  # noqa: E402

__all__ = [
    "SIG",
    "AgentProcess",
    "App",
    "Clients",
    "Metrics",
    "PgServer",
    "Progress",
    "running_app",
    "running_postgres",
    "statuses_text",
    "value",
]

SIG = "libpq_ssl_with_https"


def value(m: Metrics, name: str, **labels: str) -> float:
    """A sample's value, 0 when the series is absent."""
    return m.value(name, **labels) or 0.0


class Progress:
    """Progress lines on stderr, stamped with seconds since the start."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        """One progress line."""
        elapsed = time.monotonic() - self.started
        print(f"[{self.name} {elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


class Clients:
    """Client threads against one app, counting statuses (0: failed or timed out).

    Each group of clients has its own stop event, so traffic shapes can be swapped while
    requests of the previous shape finish in flight."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def count(self, status: int) -> None:
        """Record one response."""
        with self._lock:
            self.statuses[status] += 1

    def _start(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def loop(self, path: str, stop: threading.Event, *, timeout: float = 60) -> None:
        """One client sending `path` back to back (a new connection each) until `stop`."""
        url = self.app.gunicorn.url + path

        def client() -> None:
            while not stop.is_set():
                self.count(get(url, timeout=timeout))

        self._start(client)

    def once(self, path: str, *, timeout: float = 120) -> threading.Thread:
        """One request in its own thread (a burst is several of these)."""
        url = self.app.gunicorn.url + path
        thread = threading.Thread(target=lambda: self.count(get(url, timeout=timeout)),
                                  daemon=True)  # fmt: skip
        thread.start()
        return thread

    def keepalive(self, paths: Sequence[str], stop: threading.Event, *, pause: float) -> None:
        """One client sending fast requests over a persistent HTTP/1.1 connection."""
        port = self.app.gunicorn.port

        def client() -> None:
            conn: http.client.HTTPConnection | None = None
            i = 0
            while not stop.is_set():
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    conn.request("GET", paths[i % len(paths)])
                    response = conn.getresponse()
                    response.read()
                    self.count(response.status)
                    if response.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException):
                    self.count(0)
                    if conn is not None:
                        conn.close()
                    conn = None
                i += 1
                stop.wait(pause)
            if conn is not None:
                conn.close()

        self._start(client)

    def join(self, timeout: float) -> None:
        """Wait (up to `timeout` in all) for every client to finish its request in flight."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.threads = [t for t in self.threads if t.is_alive()]


def statuses_text(statuses: Counter[int]) -> str:
    """`200: 1234, 503: 2` (0 stands for failed or timed out)."""
    return ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items())) or "none"
