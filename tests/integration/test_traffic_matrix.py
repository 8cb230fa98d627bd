"""Verdicts under real traffic: the traffic-shape matrix.

Each shape is a real gunicorn app (the demo app, or the ASGI one for uvicorn) talking to a real
PostgreSQL 15 with ssl=on and a real HTTPS collector, watched by `deadlock-agent watch` as a real
process, for at least RUN_SECONDS, and judged only through that agent's /metrics and /incidents,
scraped every half second. Shapes run side by side in two batches so the whole matrix costs about
two and a half minutes; each is judged on its own agent.

Busy-but-healthy shapes: 0 stuck request threads, capacity 1.0 at every scrape, 0 incidents.
The others: a legitimate long query is *stuck*, never *deadlocked*; the seed's hang injected into
busy traffic is caught within stuck-after + 2 s; a thread stuck for 15 s that resumes light work
leaves *stuck* within suspect_after + 1 s.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import AgentProcess, App, Metrics, running_app
from pgserver import PgServer

from agent.demo.run import get

pytestmark = pytest.mark.integration

STUCK_AFTER = 5.0
SUSPECT_AFTER = min(2.0, STUCK_AFTER / 2)  # the agent's default for this stuck-after
RUN_SECONDS = 60.0
SCRAPE_EVERY = 0.5
SIG = "libpq_ssl_with_https"


@dataclass
class Run:
    """One shape's app, agent and what the scrapes saw."""

    shape: Shape
    app: App
    agent: AgentProcess
    started: float = 0.0
    scrapes: list[tuple[float, Metrics]] = field(default_factory=list)
    scrape_errors: int = 0
    events: dict[str, float] = field(default_factory=dict)  # name -> seconds since start
    statuses: dict[int, int] = field(default_factory=dict)
    incidents: list[dict[str, object]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    clients: list[threading.Thread] = field(default_factory=list)

    def at(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def loop(self, request: Callable[[], int], *, pause: float = 0.0) -> None:
        """A client thread repeating `request` until the run ends."""

        def client() -> None:
            while not self.stop.is_set():
                self.count(request())
                if pause:
                    self.stop.wait(pause)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        self.clients.append(thread)

    def get(self, path: str, timeout: float = 60) -> int:
        return get(self.app.gunicorn.url + path, timeout=timeout)

    def keepalive(self, paths: tuple[str, ...], pause: float) -> None:
        """A client sending fast requests over one persistent HTTP/1.1 connection."""

        def client() -> None:
            conn: http.client.HTTPConnection | None = None
            i = 0
            while not self.stop.is_set():
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(
                            "127.0.0.1", self.app.gunicorn.port, timeout=10
                        )
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
                self.stop.wait(pause)
            if conn is not None:
                conn.close()

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        self.clients.append(thread)

    def later(self, delay: float, action: Callable[[], None], event: str) -> None:
        """Run `action` `delay` seconds into the run and note when it happened."""

        def fire() -> None:
            if not self.stop.wait(delay):
                self.events[event] = self.at()
                action()

        thread = threading.Thread(target=fire, daemon=True)
        thread.start()
        self.clients.append(thread)


@dataclass
class Shape:
    name: str
    drive: Callable[[Run], None]
    worker_class: str = "gthread"
    workers: int = 2
    threads: int = 4
    app_module: str = "agent.demo.app:app"
    stall_https: bool = False  # the HTTPS thread sits in a stalled TLS handshake all along


# --- drivers ------------------------------------------------------------------------------------


def back_to_back_queries(run: Run) -> None:
    """Every request thread of every worker runs 2 s queries back to back."""
    for _ in range(run.shape.workers * run.shape.threads):
        run.loop(lambda: run.get("/slow?seconds=2"))


def fast_keepalive(run: Run) -> None:
    """Many fast requests over persistent connections (~100 req/s in all)."""
    for _ in range(4):
        run.keepalive(("/", "/db", "/", "/"), pause=0.04)


def slow_streams(run: Run) -> None:
    """Responses written slowly: 1 KiB every 0.5 s for 30 s, on half the request threads."""
    for _ in range(max(1, run.shape.workers * run.shape.threads // 2)):
        run.loop(lambda: run.get("/stream?seconds=30&every=0.5", timeout=60))
    run.keepalive(("/",), pause=0.2)


def short_awaits(run: Run) -> None:
    """Event loops busy with many short awaits, and fast requests beside them."""
    for _ in range(4):
        run.loop(lambda: run.get("/awaits?n=2000"))
    run.keepalive(("/", "/slow?seconds=2"), pause=0.05)


def long_query(run: Run) -> None:
    """One legitimate query longer than stuck-after, among fast traffic."""
    run.loop(lambda: run.get("/slow?seconds=20"))
    run.keepalive(("/", "/db"), pause=0.1)


def slow_query_slow_https(run: Run) -> None:
    """A query longer than stuck-after while the HTTPS thread waits on a slow reply."""
    run.app.https.slow_replies(25)
    run.loop(lambda: run.get("/slow?seconds=20"))
    run.keepalive(("/",), pause=0.1)


def seed_under_traffic(run: Run) -> None:
    """Busy traffic, then the seed's hang: new TLS handshakes to PostgreSQL and to the HTTPS
    collector stall, and a burst of requests piles into them."""
    for _ in range(3):
        run.loop(lambda: run.get("/slow?seconds=2"))
    run.keepalive(("/", "/db"), pause=0.05)

    def inject() -> None:
        run.app.database.stall()
        run.app.harvest.stall()
        for _ in range(16):
            run.loop(lambda: run.get("/db", timeout=120))

    run.later(20, inject, "fault")


def stuck_then_resumes(run: Run) -> None:
    """One request blocks in a 15 s query, then does light work for 40 s."""
    run.events["request"] = run.at()
    run.loop(lambda: run.get("/resume?stuck=15&work=40", timeout=90), pause=1000)
    run.keepalive(("/",), pause=0.2)


HEALTHY = [
    Shape("gthread-back-to-back-2s-queries", back_to_back_queries),
    Shape("gthread-back-to-back-2s-queries-https-stalled", back_to_back_queries,
          stall_https=True),
    Shape("gthread-fast-keepalive-https-stalled", fast_keepalive, stall_https=True),
    Shape("gthread-slow-streams-https-stalled", slow_streams, stall_https=True),
    Shape("sync-back-to-back-2s-queries", back_to_back_queries, worker_class="sync", threads=1),
    Shape("sync-slow-streams", slow_streams, worker_class="sync", threads=1),
    Shape("gevent-fast-keepalive", fast_keepalive, worker_class="gevent", threads=1),
    Shape("gevent-back-to-back-2s-queries", back_to_back_queries, worker_class="gevent",
          threads=1),
    Shape("uvicorn-short-awaits", short_awaits, worker_class="uvicorn.workers.UvicornWorker",
          threads=1, app_module="agent.demo.asgi:app"),
]  # fmt: skip
STUCK = Shape("gthread-long-query", long_query)
SLOW_TWIN = Shape("gthread-slow-query-beside-slow-https-reply", slow_query_slow_https)
SEED = Shape("gthread-seed-hang-under-traffic", seed_under_traffic)
RESUME = Shape("gthread-stuck-then-resumes", stuck_then_resumes)
BATCHES = [HEALTHY[:5], [*HEALTHY[5:], STUCK, SLOW_TWIN, SEED, RESUME]]


def value(m: Metrics, name: str, **labels: str) -> float:
    return m.value(name, **labels) or 0.0


@contextlib.contextmanager
def started(shape: Shape, workdir: Path, postgres: PgServer) -> Iterator[Run]:
    workdir.mkdir(parents=True)
    with running_app(
        workdir, postgres, workers=shape.workers, threads=shape.threads,
        worker_class=shape.worker_class, app_module=shape.app_module,
    ) as app:  # fmt: skip
        agent = AgentProcess(
            workdir, ["--master-pid", str(app.gunicorn.pid), "--stuck-after", str(STUCK_AFTER)]
        )
        run = Run(shape, app, agent)
        try:
            agent.wait_for(
                "first cycle",
                lambda m: value(m, "deadlock_agent_workers", state="ok") == shape.workers,
                timeout=30,
            )
            yield run
        finally:
            run.stop.set()
            app.database.heal()
            app.harvest.heal()
            app.https.slow_replies(0)
            for thread in run.clients:
                thread.join(5)
            agent.stop()


def run_batch(shapes: list[Shape], tmp: Path, postgres: PgServer) -> dict[str, Run]:
    """Start every shape's app and agent, drive them together for RUN_SECONDS, scraping."""
    runs: dict[str, Run] = {}
    with contextlib.ExitStack() as stack:
        for shape in shapes:
            runs[shape.name] = stack.enter_context(started(shape, tmp / shape.name, postgres))
        for run in runs.values():
            if run.shape.stall_https:
                run.app.harvest.stall()
            run.started = time.monotonic()
            run.shape.drive(run)
        until = time.monotonic() + RUN_SECONDS
        while time.monotonic() < until:
            for run in runs.values():
                try:
                    run.scrapes.append((run.at(), run.agent.scrape()))
                except OSError:
                    run.scrape_errors += 1
            time.sleep(SCRAPE_EVERY)
        for run in runs.values():
            run.incidents = run.agent.get_json("/incidents")
            run.stop.set()
    return runs


@pytest.fixture(scope="module")
def matrix(
    tmp_path_factory: pytest.TempPathFactory, postgres: PgServer
) -> Iterator[dict[str, Run]]:
    """Every shape, run once for the whole module (two batches side by side)."""
    tmp = tmp_path_factory.mktemp("matrix")
    runs: dict[str, Run] = {}
    for batch in BATCHES:
        runs.update(run_batch(batch, tmp, postgres))
    yield runs


def describe(run: Run, at: float, m: Metrics) -> str:
    interesting = {
        f"{name}{dict(labels)}": v
        for (name, labels), v in m.samples.items()
        if name.startswith(("deadlock_agent_threads", "deadlock_agent_workers",
                            "deadlock_agent_request_capacity", "deadlock_agent_deadlocked"))
    }  # fmt: skip
    return f"{run.shape.name} at {at:.1f}s: {interesting}\nagent log:\n{run.agent.log()[-3000:]}"


def assert_scraped_throughout(run: Run) -> None:
    assert run.scrapes and run.scrapes[-1][0] >= RUN_SECONDS - 2, run.shape.name
    assert len(run.scrapes) >= RUN_SECONDS / SCRAPE_EVERY * 0.6, (len(run.scrapes), run.shape.name)


@pytest.mark.parametrize("shape", HEALTHY, ids=[s.name for s in HEALTHY])
def test_busy_but_healthy_traffic_is_never_stuck(matrix: dict[str, Run], shape: Shape) -> None:
    run = matrix[shape.name]
    assert_scraped_throughout(run)
    # With the HTTPS thread in a dead handshake, that one background thread per worker is
    # honestly stuck; no request thread may be, and the workers still serve.
    background = shape.workers if shape.stall_https else 0
    for at, m in run.scrapes:
        assert value(m, "deadlock_agent_threads", state="stuck") <= background, describe(run, at, m)
        assert value(m, "deadlock_agent_workers", state="stuck") == 0, describe(run, at, m)
        assert value(m, "deadlock_agent_workers", state="deadlocked") == 0, describe(run, at, m)
        # Busy is not spinning, and the named hangs' frames on a healthy app name nothing.
        assert value(m, "deadlock_agent_threads", state="spinning") == 0, describe(run, at, m)
        assert value(m, "deadlock_agent_workers", state="spinning") == 0, describe(run, at, m)
        assert sum(m.series("deadlock_agent_hang_workers").values()) == 0, describe(run, at, m)
        assert m.value("deadlock_agent_request_capacity_ratio") == 1.0, describe(run, at, m)
        assert m.value("deadlock_agent_up") == 1, describe(run, at, m)
    assert run.incidents == [], run.incidents
    # The traffic was real and healthy: every request answered 200.
    assert set(run.statuses) == {200}, run.statuses
    assert sum(run.statuses.values()) >= 20, run.statuses


def test_a_legitimate_long_query_is_stuck_never_deadlocked(matrix: dict[str, Run]) -> None:
    run = matrix[STUCK.name]
    assert_scraped_throughout(run)
    stuck_seen = [at for at, m in run.scrapes if value(m, "deadlock_agent_threads", state="stuck")]
    assert stuck_seen, "a 20 s query with stuck-after 5 was never called stuck"
    for at, m in run.scrapes:
        assert value(m, "deadlock_agent_workers", state="deadlocked") == 0, describe(run, at, m)
        assert value(m, "deadlock_agent_deadlocks_detected_total", signature=SIG) == 0
        # One query at a time holds one request thread: never more is stuck.
        assert value(m, "deadlock_agent_threads", state="stuck") <= 1, describe(run, at, m)
        assert value(m, "deadlock_agent_workers", state="stuck") <= 1, describe(run, at, m)
    assert not [i for i in run.incidents if i.get("signature") != "none"], run.incidents


def test_a_slow_query_beside_a_slow_https_reply_is_at_most_stuck(matrix: dict[str, Run]) -> None:
    run = matrix[SLOW_TWIN.name]
    assert_scraped_throughout(run)
    assert any(value(m, "deadlock_agent_threads", state="stuck") for _, m in run.scrapes)
    for at, m in run.scrapes:
        assert value(m, "deadlock_agent_workers", state="deadlocked") == 0, describe(run, at, m)
        assert value(m, "deadlock_agent_deadlocked_workers", signature=SIG) == 0
    assert not [i for i in run.incidents if i.get("signature") == SIG], run.incidents


def test_the_seed_hang_under_busy_traffic_is_caught_in_time(matrix: dict[str, Run]) -> None:
    run = matrix[SEED.name]
    assert_scraped_throughout(run)
    fault = run.events["fault"]
    before = [(at, m) for at, m in run.scrapes if at < fault]
    assert len(before) >= 20
    for at, m in before:  # busy traffic before the fault: nothing stuck
        assert value(m, "deadlock_agent_threads", state="stuck") == 0, describe(run, at, m)
        assert m.value("deadlock_agent_request_capacity_ratio") == 1.0, describe(run, at, m)
    detected = [
        at for at, m in run.scrapes
        if at > fault and value(m, "deadlock_agent_deadlocked_workers", signature=SIG) >= 1
    ]  # fmt: skip
    assert detected, "the seed's hang was never detected"
    latency = detected[0] - fault
    print(f"seed hang under traffic detected {latency:.1f}s after the fault")
    assert latency <= STUCK_AFTER + 2, f"detected after {latency:.1f}s"
    assert any(i.get("signature") == SIG for i in run.incidents), run.incidents


def test_a_thread_that_resumes_light_work_leaves_stuck(matrix: dict[str, Run]) -> None:
    run = matrix[RESUME.name]
    assert_scraped_throughout(run)
    resumed = run.events["request"] + 15  # the query ends; 40 s of light work follow
    stuck = [at for at, m in run.scrapes if value(m, "deadlock_agent_threads", state="stuck")]
    assert stuck and stuck[0] < resumed, f"never stuck during the 15 s query: {stuck}"
    # Allow the connect before the query, and one scrape interval.
    bound = resumed + SUSPECT_AFTER + 1 + 0.5 + SCRAPE_EVERY
    late = [at for at in stuck if at > bound]
    assert not late, f"still stuck at {late} (resumed at ~{resumed:.1f}s, bound {bound:.1f}s)"
    print(f"left stuck {max(stuck) - resumed:.1f}s after resuming (bound {bound - resumed:.1f}s)")
    assert run.scrapes[-1][0] > resumed + 30  # and stayed out while it kept working
