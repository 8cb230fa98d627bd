"""Real processes for integration tests: the demo app under gunicorn behind fault proxies, and
the agent as a real `deadlock-agent watch` subprocess scraped over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgserver import PgServer
from prometheus_client.parser import text_string_to_metric_families

from agent.demo.faults import FaultProxy, HttpsServer
from agent.demo.run import Gunicorn, free_port, get

Sample = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Metrics:
    """One scrape, indexed by (sample name, labels)."""

    samples: dict[Sample, float]

    def value(self, name: str, **labels: str) -> float | None:
        """The sample's value, or None when the series is absent."""
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every series of a sample name."""
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def parse_metrics(text: str) -> Metrics:
    """Parse the Prometheus text format with prometheus_client's own parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Metrics(samples)


class Scraper:
    """An agent's /metrics at a URL, polled until a condition holds (for agents the test did
    not start itself, such as the one inside `deadlock-agent run`)."""

    def __init__(self, url: str, log: Callable[[], str] = lambda: "") -> None:
        self.url = url
        self.log = log

    def scrape(self) -> Metrics:
        """GET /metrics and parse it."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            return parse_metrics(response.read().decode())

    def wait_for(
        self, what: str, check: Callable[[Metrics], bool], timeout: float, every: float = 0.25
    ) -> tuple[Metrics, float]:
        """Scrape until check() holds; return the scrape and how long it took."""
        started = time.monotonic()
        last: Metrics | None = None
        while time.monotonic() - started < timeout:
            exited = self.exited()
            if exited is not None:
                raise AssertionError(f"{exited}:\n{self.log()[-3000:]}")
            with contextlib.suppress(OSError):
                last = self.scrape()
                if check(last):
                    return last, time.monotonic() - started
            time.sleep(every)
        raise AssertionError(
            f"timed out after {timeout:g}s waiting for {what}; last scrape:\n"
            f"{_interesting(last)}\nlog:\n{self.log()[-3000:]}"
        )

    def exited(self) -> str | None:
        """Why waiting is pointless (the agent's process is gone), or None."""
        return None


class AgentProcess(Scraper):
    """`python -m agent watch ...` as a real subprocess, with its log kept for failures."""

    def __init__(
        self,
        workdir: Path,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """Start the agent; `env` adds to (or overrides) the inherited environment, `prefix`
        runs it (setpriv with other credentials)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"agent-{self.port}.log"
        self.incidents_dir = workdir / f"incidents-{self.port}"  # never the shared default
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "agent", "watch", "--web.listen-address",
             f"127.0.0.1:{self.port}", "--incidents.dir", str(self.incidents_dir), *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
        )  # fmt: skip

    def log(self) -> str:
        """Everything the agent logged so far."""
        return self.log_path.read_text(errors="replace")

    def get_json(self, path: str) -> Any:
        """GET a JSON endpoint of the agent."""
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return json.loads(response.read())

    def exited(self) -> str | None:
        """The agent's exit, if it has exited."""
        code = self.proc.poll()
        return None if code is None else f"agent exited {code}"

    def stop(self) -> int | None:
        """SIGTERM; returns the exit code (None if it had to be killed)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    return self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
                    return None
            return self.proc.returncode
        finally:
            self._log.close()


def _interesting(metrics: Metrics | None) -> str:
    if metrics is None:
        return "(none)"
    lines = [
        f"{name}{dict(labels)} {value}"
        for (name, labels), value in sorted(metrics.samples.items(), key=lambda kv: kv[0][0])
        if name.startswith("deadlock_agent_") and "build_info" not in name
    ]
    return "\n".join(lines)


@dataclass
class App:
    """The demo app under real gunicorn, talking to a real PostgreSQL and a real HTTPS server,
    each behind a FaultProxy that can stall new connections."""

    gunicorn: Gunicorn
    database: FaultProxy
    harvest: FaultProxy
    https: HttpsServer  # behind `harvest`: slow_replies() makes it a slow, not a dead, peer
    _traffic: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    results: dict[int, int] = field(default_factory=dict)

    def traffic(self, paths: Sequence[str], concurrency: int) -> None:
        """Keep `concurrency` clients requesting `paths` round-robin until stop_traffic()."""

        def client(offset: int) -> None:
            i = offset
            while not self._stop.is_set():
                status = get(self.gunicorn.url + paths[i % len(paths)], timeout=30)
                self.results[status] = self.results.get(status, 0) + 1
                i += 1

        for n in range(concurrency):
            thread = threading.Thread(target=client, args=(n,), daemon=True)
            thread.start()
            self._traffic.append(thread)

    def stop_traffic(self) -> None:
        """Stop the clients (each finishes its request in flight)."""
        self._stop.set()
        for thread in self._traffic:
            thread.join(35)
        self._traffic.clear()
        self._stop = threading.Event()


@contextlib.contextmanager
def running_app(
    workdir: Path,
    postgres: PgServer,
    *,
    workers: int = 2,
    threads: int = 4,
    worker_class: str = "gthread",
    app_module: str = "agent.demo.app:app",
    extra_args: Sequence[str] = (),
    launcher: Sequence[str] = (),
    env: dict[str, str] | None = None,
    python: Sequence[str] = (),
) -> Iterator[App]:
    """Start proxies, the HTTPS server and gunicorn; tear all down (unstalling first).

    `launcher` starts gunicorn (`deadlock-agent run ... --`) and `python` runs it (see
    Gunicorn); `env` adds to the app's environment.

    `app_module` is what gunicorn serves (agent.demo.asgi:app for ASGI worker classes);
    `extra_args` go to gunicorn after the defaults, so they override them."""
    https = HttpsServer(workdir).start()
    harvest = FaultProxy((https.host, https.port), protocol="tcp").start()
    database = FaultProxy((postgres.host, postgres.port), protocol="postgres").start()
    env = {
        "DEMO_DATABASE_URL": postgres.dsn(port=database.port),
        "DEMO_HARVEST_URL": f"https://127.0.0.1:{harvest.port}/harvest",
        "DEMO_CA_FILE": str(https.ca_file),
        "DEMO_HARVEST_INTERVAL": "1",
        **(env or {}),
    }
    gunicorn = None
    app = None
    try:
        gunicorn = Gunicorn(
            workdir, env, worker_class=worker_class, workers=workers, threads=threads,
            extra_args=extra_args, app=app_module, launcher=launcher, python=python,
        )  # fmt: skip
        gunicorn.wait_ready(workers=workers)
        app = App(gunicorn, database, harvest, https)
        yield app
    finally:
        if app is not None:
            app._stop.set()
        database.heal()
        harvest.heal()
        if gunicorn is not None:
            gunicorn.stop()
        database.close()
        harvest.close()
        https.close()


def py_spy_dump(pid: int, *, native: bool) -> str:
    """A raw `py-spy dump --json` (for fixture capture)."""
    argv = ["py-spy", "dump", "--json", "--pid", str(pid)] + (["--native"] if native else [])
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30, check=True,
        env={**os.environ, "RUST_BACKTRACE": "0"},
    ).stdout  # fmt: skip
