"""False positives under a long run of busy but healthy traffic: how often the agent calls a
healthy worker stuck or deadlocked.

    python benchmarks/false_positive_soak.py [--minutes 10] [--phase-seconds 60] [--smoke]

A real gunicorn gthread app (the demo app, 2 workers x 4 threads) talking to a real PostgreSQL 15
with ssl=on and a real HTTPS collector, watched by `deadlock-agent watch --stuck-after 5` as a
real process and judged only through its /metrics (scraped every 0.5 s) and /incidents. The
traffic rotates through shapes, one per phase: back-to-back 2 s queries, fast keep-alive
requests to / and /db, slow streamed responses, and a slow HTTPS collector (3 s replies) beside
queries. Progress goes to stderr, the table to stdout. Exit 0 whatever the verdict counts (this
is a measurement); non-zero only when the run itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    SIG,
    AgentProcess,
    App,
    Clients,
    Metrics,
    Progress,
    running_app,
    running_postgres,
    statuses_text,
    value,
)

WORKERS, THREADS = 2, 4
SCRAPE_EVERY = 0.5


@dataclass
class Phase:
    """One traffic shape, driven for a phase, and what the scrapes saw meanwhile."""

    name: str
    drive: Callable[[App, Clients, threading.Event], None]
    slow_https: float = 0.0  # the collector answers this late during the phase
    runs: int = 0
    scrapes: int = 0
    stuck_threads_max: float = 0.0
    stuck_request_scrapes: int = 0
    stuck_worker_scrapes: int = 0
    deadlocked_worker_scrapes: int = 0
    statuses: Counter[int] = field(default_factory=Counter)


def back_to_back_queries(app: App, clients: Clients, stop: threading.Event) -> None:
    """Half the request threads in 2 s queries back to back, fast requests beside them."""
    for _ in range(WORKERS * THREADS // 2):
        clients.loop("/slow?seconds=2", stop)
    for _ in range(2):
        clients.keepalive(("/", "/db"), stop, pause=0.05)


def fast_keepalive(app: App, clients: Clients, stop: threading.Event) -> None:
    """Many fast requests over persistent connections, and one 2 s query at a time."""
    for _ in range(4):
        clients.keepalive(("/", "/db", "/", "/"), stop, pause=0.04)
    clients.loop("/slow?seconds=2", stop)


def slow_streams(app: App, clients: Clients, stop: threading.Event) -> None:
    """Responses written slowly (1 KiB every 0.5 s for 30 s) beside queries and fast requests."""
    for _ in range(3):
        clients.loop("/stream?seconds=30&every=0.5", stop)
    clients.loop("/slow?seconds=2", stop)
    clients.keepalive(("/", "/db"), stop, pause=0.1)


def slow_collector(app: App, clients: Clients, stop: threading.Event) -> None:
    """The HTTPS collector answers 3 s late while queries and fast requests go on."""
    for _ in range(3):
        clients.loop("/slow?seconds=2", stop)
    for _ in range(2):
        clients.keepalive(("/", "/db"), stop, pause=0.05)


def phases() -> list[Phase]:
    """The rotation, in order."""
    return [
        Phase("back-to-back-2s-queries", back_to_back_queries),
        Phase("fast-keepalive", fast_keepalive),
        Phase("slow-streams", slow_streams),
        Phase("slow-https-collector", slow_collector, slow_https=3.0),
    ]


@dataclass
class Totals:
    """Everything the table reports."""

    scrapes: int = 0
    scrape_errors: int = 0
    stuck_threads_max: float = 0.0
    stuck_request_scrapes: int = 0
    stuck_worker_scrapes: int = 0
    deadlocked_worker_scrapes: int = 0
    detected_total: float = 0.0
    detected_seed: float = 0.0
    incidents: int = 0
    first_bad: list[str] = field(default_factory=list)  # a few bad scrapes, for diagnosis


def judge(m: Metrics, phase: Phase, totals: Totals, at: float) -> None:
    """Fold one scrape into the phase's and the run's counts."""
    stuck_threads = value(m, "deadlock_agent_threads", state="stuck")
    capacity = m.value("deadlock_agent_request_capacity_ratio")
    stuck_request = capacity is not None and capacity < 1.0
    stuck_worker = value(m, "deadlock_agent_workers", state="stuck") > 0
    deadlocked = value(m, "deadlock_agent_workers", state="deadlocked") > 0
    for c in (phase, totals):
        c.scrapes += 1
        c.stuck_threads_max = max(c.stuck_threads_max, stuck_threads)
        c.stuck_request_scrapes += stuck_request
        c.stuck_worker_scrapes += stuck_worker
        c.deadlocked_worker_scrapes += deadlocked
    if (stuck_threads or stuck_request or stuck_worker or deadlocked) and len(totals.first_bad) < 5:
        totals.first_bad.append(
            f"{at:.1f}s in {phase.name}: stuck threads {stuck_threads:g}, capacity {capacity}, "
            f"workers stuck {value(m, 'deadlock_agent_workers', state='stuck'):g}, "
            f"deadlocked {value(m, 'deadlock_agent_workers', state='deadlocked'):g}"
        )


def soak(seconds: float, phase_seconds: float, stuck_after: float, progress: Progress) -> int:
    """Run the soak; print the table; return the exit code."""
    rotation = phases()
    totals = Totals()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
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
                phase = rotation[0]
                try:
                    agent.wait_for(
                        "first cycle",
                        lambda m: value(m, "deadlock_agent_workers", state="ok") == WORKERS,
                        timeout=30,
                    )
                    progress(f"agent up on {agent.url}; soaking {seconds:g}s, "
                             f"phases of {phase_seconds:g}s")  # fmt: skip
                    started = time.monotonic()
                    index = -1
                    before: Counter[int] = Counter()
                    phase_until = started
                    next_report = started + 30
                    while (now := time.monotonic()) - started < seconds:
                        if now >= phase_until:
                            stop.set()  # requests in flight finish on their own
                            app.https.slow_replies(0)
                            phase.statuses += clients.statuses - before
                            before = Counter(clients.statuses)
                            index += 1
                            phase = rotation[index % len(rotation)]
                            phase.runs += 1
                            stop = threading.Event()
                            app.https.slow_replies(phase.slow_https)
                            phase.drive(app, clients, stop)
                            phase_until = now + phase_seconds
                            progress(f"phase {phase.name} (run {phase.runs})")
                        if agent.proc.poll() is not None:
                            raise RuntimeError(f"agent exited {agent.proc.returncode}:\n"
                                               f"{agent.log()[-3000:]}")  # fmt: skip
                        try:
                            judge(agent.scrape(), phase, totals, now - started)
                        except OSError:
                            totals.scrape_errors += 1
                        if now >= next_report:
                            next_report += 30
                            progress(f"{totals.scrapes} scrapes, max stuck threads "
                                     f"{totals.stuck_threads_max:g}, stuck-worker scrapes "
                                     f"{totals.stuck_worker_scrapes}, deadlocked-worker scrapes "
                                     f"{totals.deadlocked_worker_scrapes}, requests "
                                     f"{sum(clients.statuses.values())}")  # fmt: skip
                        time.sleep(max(0.0, SCRAPE_EVERY - (time.monotonic() - now)))
                    phase.statuses += clients.statuses - before
                    final = agent.scrape()
                    totals.detected_total = sum(
                        final.series("deadlock_agent_deadlocks_detected_total").values()
                    )
                    totals.detected_seed = value(
                        final, "deadlock_agent_deadlocks_detected_total", signature=SIG
                    )
                    totals.incidents = len(agent.get_json("/incidents"))
                    progress("soak done; stopping traffic")
                finally:
                    stop.set()
                    app.https.slow_replies(0)
                    clients.join(35)
                    # Let late collector replies go out before the collector's peers go away.
                    time.sleep(phase.slow_https)
                    code = agent.stop()
                    progress(f"agent stopped (exit {code})")
                statuses = clients.statuses
    if totals.scrapes == 0:
        print("no successful scrape: the run failed", file=sys.stderr)
        return 1
    print_table(seconds, phase_seconds, stuck_after, totals, statuses, rotation)
    return 0


def print_table(
    seconds: float, phase_seconds: float, stuck_after: float, totals: Totals,
    statuses: Counter[int], rotation: list[Phase],
) -> None:  # fmt: skip
    """The result on stdout."""
    rows = [
        ("scrapes (every 0.5 s)", f"{totals.scrapes}"),
        ("scrape errors", f"{totals.scrape_errors}"),
        ("requests sent", f"{sum(statuses.values())} ({statuses_text(statuses)})"),
        ('max deadlock_agent_threads{state="stuck"}', f"{totals.stuck_threads_max:g}"),
        ("scrapes with a stuck request thread (capacity < 1.0)",
         f"{totals.stuck_request_scrapes}"),
        ('scrapes with workers{state="stuck"} > 0', f"{totals.stuck_worker_scrapes}"),
        ('scrapes with workers{state="deadlocked"} > 0', f"{totals.deadlocked_worker_scrapes}"),
        ("deadlocks_detected_total at the end",
         f"{totals.detected_total:g} ({SIG}: {totals.detected_seed:g})"),
        ("incidents at /incidents at the end", f"{totals.incidents}"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print(
        f"false-positive soak: {seconds / 60:.1f} min ({seconds:g} s), "
        f"gunicorn gthread {WORKERS}x{THREADS}, "
        f"deadlock-agent watch --stuck-after {stuck_after:g}, phases of {phase_seconds:g}s"
    )
    print(f"{'measure':<{width}}  value")
    for name, text in rows:
        print(f"{name:<{width}}  {text}")
    print()
    print(
        f"{'phase':<26} {'runs':>4} {'scrapes':>7} {'max stuck thr':>13} "
        f"{'stuck req':>9} {'stuck wkr':>9} {'deadl wkr':>9}  requests"
    )
    for p in rotation:
        print(
            f"{p.name:<26} {p.runs:>4} {p.scrapes:>7} {p.stuck_threads_max:>13g} "
            f"{p.stuck_request_scrapes:>9} {p.stuck_worker_scrapes:>9} "
            f"{p.deadlocked_worker_scrapes:>9}  {statuses_text(p.statuses)}"
        )
    print("(requests: answered while the phase ran, by status; 0 = failed or timed out)")
    print()
    verdicts = totals.stuck_worker_scrapes + totals.deadlocked_worker_scrapes
    met = "MET" if verdicts == 0 and totals.stuck_request_scrapes == 0 else "NOT MET"
    print(
        f"goal: stuck and deadlocked verdicts = 0 -> {met} "
        f"(stuck-worker scrapes {totals.stuck_worker_scrapes}, deadlocked-worker scrapes "
        f"{totals.deadlocked_worker_scrapes}, stuck request-thread scrapes "
        f"{totals.stuck_request_scrapes}, incidents {totals.incidents})"
    )
    for line in totals.first_bad:
        print(f"  first bad scrapes: {line}")
    sys.stdout.flush()


def main() -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=60.0,
        help="seconds per traffic shape before rotating (default 60)",
    )
    parser.add_argument(
        "--stuck-after", type=float, default=5.0, help="the agent's --stuck-after (default 5)"
    )
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run: 12 s, phases of 3 s")  # fmt: skip
    args = parser.parse_args()
    seconds, phase_seconds = args.minutes * 60, args.phase_seconds
    if args.smoke:
        seconds, phase_seconds = 12.0, 3.0
    progress = Progress("soak")
    with contextlib.suppress(KeyboardInterrupt):
        return soak(seconds, phase_seconds, args.stuck_after, progress)
    return 1


if __name__ == "__main__":
    sys.exit(main())
