"""How long the agent takes to report the seed's hang injected into busy traffic, over many hangs.

    python benchmarks/detection_latency.py [--hangs 20] [--stuck-after 5] [--smoke]

One real gunicorn gthread app (the demo app, 2 workers x 4 threads) talking to a real
PostgreSQL 15 with ssl=on and a real HTTPS collector, under busy traffic all along (2 s queries
on 3 clients and fast keep-alive requests to / and /db), watched by `deadlock-agent watch` as a
real process. For each hang: wait until every worker is ok again, let the traffic run healthy
for 5-8 s, inject the seed's hang (new TLS handshakes to PostgreSQL and to the collector stall,
then a burst of 16 /db requests piles into them), and time until /metrics (scraped every
0.1 s) shows deadlock_agent_deadlocked_workers{signature="libpq_ssl_with_https"} >= 1; then heal.
One app and agent serve every hang: healing hangs up on the stalled connections, the stuck
threads fail and go on, and the workers are ok again within seconds, so 20 hangs take about
five minutes instead of paying a fresh app and agent each time.

Progress goes to stderr, the table to stdout. Exit 0 whatever the latencies (this is a
measurement); non-zero only when the run itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    SIG,
    AgentProcess,
    App,
    Clients,
    Progress,
    running_app,
    running_postgres,
    statuses_text,
    value,
)

WORKERS, THREADS = 2, 4
BURST = 16
DETECT_EVERY = 0.1
HEALTHY_EVERY = 0.5
RECOVER_TIMEOUT = 60.0


@dataclass
class Hang:
    """One injected hang and what was measured."""

    number: int
    healthy: float  # seconds of healthy traffic before the fault
    healthy_scrapes: int = 0
    healthy_stuck_scrapes: int = 0  # scrapes in the healthy window with a stuck thread
    latency: float | None = None  # None: not detected within the timeout
    recovered: float | None = None  # seconds from heal until every worker was ok again
    incidents: float | None = None  # deadlocks_detected_total gained: one per worker caught


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p95 of 20 is the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def workers_ok(agent: AgentProcess) -> bool:
    """One scrape: every worker ok, no deadlocked worker, no stuck thread."""
    m = agent.scrape()
    return (
        value(m, "deadlock_agent_workers", state="ok") == WORKERS
        and value(m, "deadlock_agent_deadlocked_workers", signature=SIG) == 0
        and value(m, "deadlock_agent_threads", state="stuck") == 0
    )


def detected_total(agent: AgentProcess) -> float:
    """deadlocks_detected_total of the seed's signature, now."""
    return value(agent.scrape(), "deadlock_agent_deadlocks_detected_total", signature=SIG)


def wait_ok(agent: AgentProcess, timeout: float) -> float:
    """Seconds until workers_ok(), scraping every DETECT_EVERY; raise on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        check_alive(agent)
        with contextlib.suppress(OSError):
            if workers_ok(agent):
                return time.monotonic() - started
        time.sleep(DETECT_EVERY)
    raise RuntimeError(f"workers not ok again {timeout:g}s after healing:\n{agent.log()[-3000:]}")


def check_alive(agent: AgentProcess) -> None:
    """Raise when the agent process has exited."""
    if agent.proc.poll() is not None:
        raise RuntimeError(f"agent exited {agent.proc.returncode}:\n{agent.log()[-3000:]}")


def healthy_window(agent: AgentProcess, hang: Hang) -> None:
    """Let the busy traffic run for hang.healthy seconds, noting any stuck thread seen."""
    until = time.monotonic() + hang.healthy
    while time.monotonic() < until:
        check_alive(agent)
        with contextlib.suppress(OSError):
            m = agent.scrape()
            hang.healthy_scrapes += 1
            hang.healthy_stuck_scrapes += value(m, "deadlock_agent_threads", state="stuck") > 0
        time.sleep(min(HEALTHY_EVERY, max(0.0, until - time.monotonic())))


def inject_and_time(app: App, clients: Clients, agent: AgentProcess, timeout: float) -> tuple[
    float | None, list[threading.Thread]
]:  # fmt: skip
    """The seed's hang; seconds until the agent reports it (None: not within timeout)."""
    injected = time.monotonic()
    app.database.stall()
    app.harvest.stall()
    burst = [clients.once("/db", timeout=120) for _ in range(BURST)]
    while (now := time.monotonic()) - injected < timeout:
        check_alive(agent)
        with contextlib.suppress(OSError):
            m = agent.scrape()
            if value(m, "deadlock_agent_deadlocked_workers", signature=SIG) >= 1:
                return time.monotonic() - injected, burst
        time.sleep(max(0.0, DETECT_EVERY - (time.monotonic() - now)))
    return None, burst


def run(hangs: list[Hang], stuck_after: float, progress: Progress) -> tuple[float, str]:
    """Every hang on one app and agent; returns (detected_total at the end, request statuses)."""
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        workdir = Path(tmp)
        progress("starting PostgreSQL 15 (ssl=on)")
        with running_postgres(workdir / "postgres") as postgres:
            progress(f"starting gunicorn gthread {WORKERS}x{THREADS} behind fault proxies")
            (workdir / "app").mkdir()
            with running_app(workdir / "app", postgres, workers=WORKERS, threads=THREADS) as app:
                agent = AgentProcess(workdir, ["--master-pid", str(app.gunicorn.pid),
                                               "--stuck-after", f"{stuck_after:g}"])  # fmt: skip
                clients = Clients(app)
                stop = threading.Event()
                burst: list[threading.Thread] = []
                try:
                    wait_ok(agent, timeout=30)
                    progress(f"agent up on {agent.url}; busy traffic: 3 clients of "
                             "/slow?seconds=2 and keep-alive / and /db")  # fmt: skip
                    for _ in range(3):
                        clients.loop("/slow?seconds=2", stop)
                    clients.keepalive(("/", "/db"), stop, pause=0.05)
                    healed_at: float | None = None
                    counted = 0.0
                    previous: Hang | None = None
                    for hang in hangs:
                        wait_ok(agent, RECOVER_TIMEOUT)
                        if previous is not None and healed_at is not None:
                            previous.recovered = time.monotonic() - healed_at
                            previous.incidents = detected_total(agent) - counted
                        counted = detected_total(agent)
                        healthy_window(agent, hang)
                        hang.latency, burst = inject_and_time(
                            app, clients, agent, timeout=stuck_after + 25
                        )
                        app.database.heal()
                        app.harvest.heal()
                        healed_at = time.monotonic()
                        shown = "NOT detected" if hang.latency is None else (
                            f"detected in {hang.latency:.2f}s")  # fmt: skip
                        progress(f"hang {hang.number}/{len(hangs)}: healthy {hang.healthy:.1f}s "
                                 f"({hang.healthy_stuck_scrapes} stuck scrapes), {shown}; "
                                 "healed")  # fmt: skip
                        for thread in burst:
                            thread.join(30)
                        previous = hang
                    if previous is not None and healed_at is not None:
                        wait_ok(agent, RECOVER_TIMEOUT)
                        previous.recovered = time.monotonic() - healed_at
                        previous.incidents = detected_total(agent) - counted
                    total = detected_total(agent)
                    progress("all hangs done; stopping traffic")
                finally:
                    stop.set()
                    app.database.heal()
                    app.harvest.heal()
                    clients.join(35)
                    code = agent.stop()
                    progress(f"agent stopped (exit {code})")
                return total, statuses_text(clients.statuses)


def print_table(hangs: list[Hang], stuck_after: float, total: float, statuses: str,
                wall: float) -> None:  # fmt: skip
    """The result on stdout."""
    print(f"detection latency: {len(hangs)} seed hangs under busy traffic, gunicorn gthread "
          f"{WORKERS}x{THREADS}, deadlock-agent watch --stuck-after {stuck_after:g}, "
          f"scrape every {DETECT_EVERY:g} s")  # fmt: skip
    print(f"{'hang':>4} {'healthy_s':>9} {'stuck_in_healthy':>16} {'latency_s':>9} "
          f"{'recovered_s':>11} {'incidents':>9}")  # fmt: skip
    for h in hangs:
        shown = "missed" if h.latency is None else f"{h.latency:.2f}"
        back = "-" if h.recovered is None else f"{h.recovered:.2f}"
        incidents = "-" if h.incidents is None else f"{h.incidents:g}"
        print(f"{h.number:>4} {h.healthy:>9.1f} {h.healthy_stuck_scrapes:>16} {shown:>9} "
              f"{back:>11} {incidents:>9}")  # fmt: skip
    found = [h.latency for h in hangs if h.latency is not None]
    # A missed hang counts as infinitely late, so misses show in the percentiles.
    latencies = [math.inf if h.latency is None else h.latency for h in hangs]
    p50, p95, worst = (percentile(latencies, 50), percentile(latencies, 95), max(latencies))
    print()
    print(f"detected                     {len(found)}/{len(hangs)}")
    print(f"latency p50 / p95 / max      {p50:.2f} / {p95:.2f} / {worst:.2f} s")
    if found:
        print(f"latency min                  {min(found):.2f} s")
    recovered = [h.recovered for h in hangs if h.recovered is not None]
    if recovered:
        print(f"recovery p50 / max           {percentile(recovered, 50):.2f} / "
              f"{max(recovered):.2f} s (heal -> every worker ok, no stuck thread)")  # fmt: skip
    print(f"stuck scrapes while healthy  {sum(h.healthy_stuck_scrapes for h in hangs)} of "
          f"{sum(h.healthy_scrapes for h in hangs)}")  # fmt: skip
    # An incident is per worker and signature: a hang that catches both workers counts 2.
    print(f"deadlocks_detected_total     {total:g} ({SIG}; one incident per worker caught: "
          f"{len(found)} to {len(found) * WORKERS} expected)")  # fmt: skip
    print(f"requests sent                {statuses} (0 = failed or timed out)")
    print(f"wall time                    {wall:.0f} s")
    bound = stuck_after + 2
    met = "MET" if p95 <= bound else "NOT MET"
    print()
    print(f"goal: p95 <= stuck-after + 2 s = {stuck_after:g} + 2 = {bound:g} s -> {met} "
          f"(p95 {p95:.2f} s)")  # fmt: skip
    sys.stdout.flush()


def main() -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hangs", type=int, default=20, help="hangs to inject (default 20)")
    parser.add_argument(
        "--stuck-after", type=float, default=5.0, help="the agent's --stuck-after (default 5)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed for the 5-8 s healthy windows (default 1)"
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny run: 1 hang")
    args = parser.parse_args()  # fmt: skip
    count = 1 if args.smoke else args.hangs
    if count < 1:
        parser.error("--hangs must be at least 1")
    rng = random.Random(args.seed)  # noqa: S311 - jitter, not cryptography
    hangs = [Hang(n, healthy=rng.uniform(5.0, 8.0)) for n in range(1, count + 1)]
    progress = Progress("latency")
    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        total, statuses = run(hangs, args.stuck_after, progress)
        print_table(hangs, args.stuck_after, total, statuses,
                    time.monotonic() - started)  # fmt: skip
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
