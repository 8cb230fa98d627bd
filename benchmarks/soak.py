"""The agent's own memory under worker churn and periodic hangs: does its RSS level off?

    python benchmarks/soak.py [--minutes 30] [--max-requests 3] [--first-hang 60]
                              [--hang-every 180] [--hang-for 60] [--smoke]

A real gunicorn gthread app (the demo app, 2 workers x 4 threads, `--max-requests N`: each
worker exits after N requests and the master forks a new one) under steady fast traffic, talking
to a real PostgreSQL 15 with ssl=on and a real HTTPS collector, watched by `deadlock-agent watch
--web.worker-labels` as a real process. --first-hang seconds in, then every --hang-every
seconds, the seed hang is injected (database and collector stalled, 16 clients on /db) and
healed --hang-for seconds later. One line
per minute (per 5 s with --smoke) on stdout: the agent's RSS, worker respawns a second, its CPU,
sample_errors_total by reason, incidents opened, stale worker_state series. Then a verdict: RSS
growth in the last third against the first third. Progress goes to stderr. Exit 0 whatever the
verdict (this is a measurement); non-zero only when the run itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _common import (
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
FAST_CLIENTS = 4  # keep-churning traffic on / (no database)
HANG_CLIENTS = 16  # the seed hang's traffic on /db


@dataclass
class Row:
    """One report line."""

    at: float
    rss: int
    cpu: float  # CPU seconds so far: the agent's user + system, and its py-spy runs'
    respawns: int
    errors: dict[str, float]
    incidents: float
    stale: int
    workers: float


@dataclass
class Churn:
    """Watches the master's children from outside: every worker ever seen, and which died.

    Workers are (pid, start time): over a long soak pids wrap (pid_max is 32768 on many
    machines, and every request to /db forks a PostgreSQL backend), and a new worker on an old
    pid is neither the same respawn nor a dead worker's series."""

    master: int
    seen: set[tuple[int, float]] = field(default_factory=set)
    dead: dict[int, float] = field(default_factory=dict)  # pid -> when first seen gone
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Churn:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        alive: set[int] = set()
        while not self._stop.wait(0.1):
            try:
                kids = psutil.Process(self.master).children()
            except psutil.NoSuchProcess:
                return
            at = time.time()  # wall clock, to compare with the agent's cycle timestamps
            now = set()
            for kid in kids:
                with contextlib.suppress(psutil.Error):
                    self.seen.add((kid.pid, kid.create_time()))
                    now.add(kid.pid)
            for pid in alive - now:
                self.dead.setdefault(pid, at)
            for pid in now:
                self.dead.pop(pid, None)  # alive again: a new worker on a reused pid
            alive = now

    def stop(self) -> None:
        self._stop.set()

    def stale(self, m: Metrics, grace: float = 3.0) -> int:
        """worker_state series of pids that were gone more than `grace` seconds before the cycle
        that reported them began (a worker that dies during a cycle, or while the last cycle's
        report is being scraped, is reported by that cycle: that is lag, not stale state)."""
        finished = m.value("deadlock_agent_last_sample_timestamp_seconds")
        duration = m.value("deadlock_agent_cycle_duration_seconds") or 0.0
        began = (finished if finished is not None else time.time()) - duration
        cutoff = began - grace
        pids = {int(dict(labels)["pid"]) for labels in m.series("deadlock_agent_worker_state")}
        return sum(1 for pid in pids if self.dead.get(pid, cutoff + 1) < cutoff)


def errors_of(m: Metrics) -> dict[str, float]:
    """sample_errors_total by reason."""
    return {dict(labels)["reason"]: v
            for labels, v in m.series("deadlock_agent_sample_errors_total").items()}  # fmt: skip


def soak(
    seconds: float, every: float, max_requests: int, first_hang: float, hang_every: float,
    hang_for: float, stuck_after: float, progress: Progress,
) -> int:  # fmt: skip
    """Run the soak; print the lines and the verdict; return the exit code."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        progress("starting PostgreSQL 15 (ssl=on)")
        with running_postgres(workdir / "postgres") as postgres:
            progress(f"starting gunicorn gthread {WORKERS}x{THREADS} --max-requests {max_requests}")
            (workdir / "app").mkdir()
            extra = ("--max-requests", str(max_requests), "--max-requests-jitter", "0")
            with running_app(workdir / "app", postgres, workers=WORKERS, threads=THREADS,
                             extra_args=extra) as app:  # fmt: skip
                agent = AgentProcess(workdir, [
                    "--master-pid", str(app.gunicorn.pid), "--stuck-after", f"{stuck_after:g}",
                    "--web.worker-labels",
                ])  # fmt: skip
                clients = Clients(app)
                churn = Churn(app.gunicorn.pid).start()
                fast, hang = threading.Event(), threading.Event()
                try:
                    agent.wait_for("first cycle", lambda m: value(m, "deadlock_agent_up") == 1, 30)
                    print_header(seconds, every, max_requests, first_hang, hang_every, hang_for,
                                 stuck_after)  # fmt: skip
                    for _ in range(FAST_CLIENTS):
                        clients.loop("/", fast, timeout=10)
                    progress(f"agent up on {agent.url}; soaking {seconds:g}s")
                    started = time.monotonic()
                    next_row, next_hang, heal_at = started, started + first_hang, None
                    hangs = 0
                    while (now := time.monotonic()) - started < seconds:
                        if agent.proc.poll() is not None:
                            raise RuntimeError(f"agent exited {agent.proc.returncode}:\n"
                                               f"{agent.log()[-3000:]}")  # fmt: skip
                        if heal_at is None and now >= next_hang:
                            hangs += 1
                            progress(f"hang {hangs}: stalling the database and the collector")
                            inject(app, clients, hang)
                            heal_at, next_hang = now + hang_for, next_hang + hang_every
                        elif heal_at is not None and now >= heal_at:
                            progress(f"hang {hangs}: healing")
                            hang = heal(app, hang)
                            heal_at = None
                        if now >= next_row:
                            row = measure(agent, churn, now - started)
                            rows.append(row)
                            print_row(row, rows)
                            next_row += every
                        time.sleep(0.2)
                    row = measure(agent, churn, time.monotonic() - started)
                    rows.append(row)
                    print_row(row, rows)
                    progress("soak done; stopping traffic")
                finally:
                    fast.set()
                    hang = heal(app, hang)
                    clients.join(35)
                    churn.stop()
                    code = agent.stop()
                    progress(f"agent stopped (exit {code}); requests "
                             f"{statuses_text(clients.statuses)}")  # fmt: skip
    if len(rows) < 3:
        print("fewer than 3 measurements: the run failed", file=sys.stderr)
        return 1
    print_verdict(rows, hangs)
    return 0


def inject(app: App, clients: Clients, stop: threading.Event) -> None:
    """The seed hang: libpq stalled in its TLS handshake while the collector's TLS read stalls."""
    app.database.stall()
    app.harvest.stall()
    for _ in range(HANG_CLIENTS):
        clients.loop("/db", stop, timeout=120)


def heal(app: App, hang: threading.Event) -> threading.Event:
    """End the hang: stop its clients, let connections through and drop the stalled ones."""
    hang.set()
    app.database.heal()
    app.harvest.heal()
    return threading.Event()


def measure(agent: AgentProcess, churn: Churn, at: float) -> Row:
    """One line's worth: the agent's RSS and what its /metrics say."""
    proc = psutil.Process(agent.proc.pid)
    rss = proc.memory_info().rss
    times = proc.cpu_times()
    m = agent.scrape()
    incidents = sum(m.series("deadlock_agent_hangs_detected_total").values()) + value(
        m, "deadlock_agent_deadlocks_detected_total", signature="none")  # fmt: skip
    workers = sum(m.series("deadlock_agent_workers").values())
    cpu = times.user + times.system + times.children_user + times.children_system  # + py-spy
    return Row(at, rss, cpu, len(churn.seen), errors_of(m), incidents, churn.stale(m), workers)


def print_header(
    seconds: float, every: float, max_requests: int, first_hang: float, hang_every: float,
    hang_for: float, stuck_after: float,
) -> None:  # fmt: skip
    print(
        f"soak: {seconds / 60:.1f} min ({seconds:g} s), gunicorn gthread {WORKERS}x{THREADS} "
        f"--max-requests {max_requests}, seed hang at {first_hang:g}s then every "
        f"{hang_every:g}s, for {hang_for:g}s each, "
        f"deadlock-agent watch --stuck-after {stuck_after:g} --web.worker-labels; "
        f"a line every {every:g}s"
    )
    print(f"{'t (s)':>7} {'RSS (MB)':>9} {'d RSS (KB)':>10} {'workers seen':>12} "
          f"{'respawn/s':>9} {'CPU %':>6} {'incidents':>9} {'stale':>5}  "
          "sample errors by reason")  # fmt: skip
    sys.stdout.flush()


def print_row(row: Row, rows: list[Row]) -> None:
    previous = rows[-2] if len(rows) > 1 else row
    span = row.at - previous.at
    rate = (row.respawns - previous.respawns) / span if span > 0 else 0.0
    cpu = 100 * (row.cpu - previous.cpu) / span if span > 0 else 0.0
    errors = ", ".join(f"{k}={v:g}" for k, v in sorted(row.errors.items()) if v) or "none"
    print(f"{row.at:>7.0f} {row.rss / 1e6:>9.2f} {(row.rss - previous.rss) / 1e3:>10.0f} "
          f"{row.respawns:>12} {rate:>9.2f} {cpu:>6.2f} {row.incidents:>9g} {row.stale:>5}  "
          f"{errors}",
          flush=True)  # fmt: skip


def growth(rows: list[Row]) -> float:
    """RSS growth over `rows`, in KB a minute (least squares)."""
    if len(rows) < 2:
        return 0.0
    n = len(rows)
    mean_t = sum(r.at for r in rows) / n
    mean_r = sum(r.rss for r in rows) / n
    var = sum((r.at - mean_t) ** 2 for r in rows)
    cov = sum((r.at - mean_t) * (r.rss - mean_r) for r in rows)
    return (cov / var) * 60 / 1e3 if var else 0.0


def cpu_share(rows: list[Row]) -> float:
    """The agent's CPU (py-spy's included) over `rows`, in % of one core."""
    span = rows[-1].at - rows[0].at
    return 100 * (rows[-1].cpu - rows[0].cpu) / span if span > 0 else 0.0


def print_verdict(rows: list[Row], hangs: int) -> None:
    """Growth in the first and last thirds; RSS levels off when the last third grows at most
    half as fast as the first, or under 20 KB a minute."""
    third = max(2, len(rows) // 3)
    first, last = growth(rows[:third]), growth(rows[-third:])
    span = rows[-1].at - rows[0].at
    respawns = rows[-1].respawns - rows[0].respawns
    final = rows[-1]
    print()
    print(f"respawns: {respawns} in {span:.0f}s ({respawns / span if span else 0:.2f}/s); "
          f"hangs injected: {hangs}; incidents: {final.incidents:g}; "
          f"internal errors: {final.errors.get('internal', 0):g}; "
          f"stale worker_state series at the end: {final.stale}")  # fmt: skip
    print(f"RSS: {rows[0].rss / 1e6:.2f} MB -> {final.rss / 1e6:.2f} MB; growth first third "
          f"{first:+.1f} KB/min, last third {last:+.1f} KB/min")  # fmt: skip
    head, tail = rows[:third], rows[-third:]
    print(f"agent CPU (% of one core): first third {cpu_share(head):.2f}, last third "
          f"{cpu_share(tail):.2f}, whole run {cpu_share(rows):.2f}")  # fmt: skip
    flat = last <= 20.0 or last <= first / 2
    print(f"verdict: RSS {'levels off' if flat else 'keeps growing'} -> "
          f"{'OK' if flat else 'LEAK?'}", flush=True)  # fmt: skip


def main() -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length (default 30)")
    parser.add_argument("--max-requests", type=int, default=3,
                        help="gunicorn --max-requests: the churn (default 3)")  # fmt: skip
    parser.add_argument("--first-hang", type=float, default=60.0,
                        help="seconds before the first seed hang (default 60)")  # fmt: skip
    parser.add_argument("--hang-every", type=float, default=180.0,
                        help="seconds between seed hangs (default 180)")  # fmt: skip
    parser.add_argument("--hang-for", type=float, default=60.0,
                        help="seconds each hang lasts, then healed (default 60)")  # fmt: skip
    parser.add_argument("--stuck-after", type=float, default=5.0,
                        help="the agent's --stuck-after (default 5)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run: 20 s, a line every 5 s, one 10 s hang")  # fmt: skip
    args = parser.parse_args()
    seconds, every = args.minutes * 60, 60.0
    first_hang, hang_every = args.first_hang, args.hang_every
    hang_for, stuck_after = args.hang_for, args.stuck_after
    if args.smoke:
        seconds, every, first_hang, hang_every, hang_for, stuck_after = (
            20.0, 5.0, 5.0, 60.0, 10.0, 3.0)  # fmt: skip
    progress = Progress("soak")
    with contextlib.suppress(KeyboardInterrupt):
        return soak(seconds, every, args.max_requests, first_hang, hang_every, hang_for,
                    stuck_after, progress)  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
