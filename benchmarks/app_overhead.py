"""What the app feels: its throughput and p99 latency with the agent watching and without
(issue #7, P2), in alternating rounds under a real load generator.

    python benchmarks/app_overhead.py [--rounds 6] [--seconds 20] [--connections 8] [--smoke]

One real gunicorn gthread app (the demo app, 2 workers x 4 threads, with its harvest HTTPS
thread) talking to a real PostgreSQL 15 with ssl=on. wrk (Debian package `wrk`) drives it with
--connections keep-alive connections at full speed, "/" and "/db" alternating (each /db opens a
new TLS connection to PostgreSQL), for --seconds per round. Rounds alternate off, on, off, on, ...:
in an "on" round `python -m agent watch --master-pid M` runs at its defaults, started
AGENT_WARMUP seconds before the load so its start-up is not counted; in an "off" round no agent
runs at all. The table gives each round and the medians of the off and on rounds.

Progress goes to stderr, the table to stdout. Exit 0 whatever the figures (this is a
measurement); non-zero only when the run itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import AgentProcess, App, Progress, running_app, running_postgres, value

WORKERS, THREADS = 2, 4
AGENT_WARMUP = 10.0  # the agent's first cycles dump every worker: keep them out of the window
PAUSE = 2.0  # between rounds, so one round's stragglers do not start the next
GOAL_THROUGHPUT = 0.99
GOAL_P99_PERCENT = 2.0

# wrk runs one Lua state per thread; each alternates the paths over its connections and prints
# one machine-readable line at the end (latencies in microseconds).
MIX_LUA = """
local paths = {"/", "/db"}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d non2xx=%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""
RESULT = re.compile(
    r"RESULT requests=(\d+) duration_us=(\d+) p50_us=(\d+) p99_us=(\d+) errors=(\d+) non2xx=(\d+)"
)


@dataclass
class Round:
    """One wrk run and, in an on round, what the agent used meanwhile."""

    number: int
    agent_on: bool
    requests: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0  # socket errors and timeouts
    non2xx: int = 0
    agent_cpu_ms: float = 0.0
    agent_pyspy_runs: float = 0.0
    load: float = 0.0  # 1-minute load average at the end: others' work shows here

    @property
    def rps(self) -> float:
        """Requests a second."""
        return self.requests / self.seconds


def wrk(app: App, script: Path, connections: int, seconds: float) -> tuple[int, ...]:
    """One wrk run; (requests, duration µs, p50 µs, p99 µs, errors, non-2xx)."""
    argv = ["wrk", "--threads", "2", "--connections", str(connections),
            "--duration", f"{seconds:g}s", "--timeout", "10s", "--script", str(script),
            app.gunicorn.url + "/"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True)
    match = RESULT.search(out.stdout)
    if match is None:
        raise RuntimeError(f"no RESULT line from wrk:\n{out.stdout}\n{out.stderr}")
    return tuple(int(g) for g in match.groups())


def agent_counters(agent: AgentProcess) -> tuple[float, float]:
    """(CPU seconds with py-spy children, py-spy runs) from one scrape."""
    m = agent.scrape()
    cpu = value(m, "deadlock_agent_cpu_seconds_total", part="agent") + value(
        m, "deadlock_agent_cpu_seconds_total", part="pyspy"
    )
    runs = value(m, "deadlock_agent_samples_total", method="pyspy") + value(
        m, "deadlock_agent_samples_total", method="pyspy_native"
    )
    return cpu, runs


def one_round(app: App, workdir: Path, script: Path, r: Round, connections: int,
              seconds: float, progress: Progress) -> None:  # fmt: skip
    """Run wrk once, with the agent watching when r.agent_on."""
    agent = None
    try:
        if r.agent_on:
            agent = AgentProcess(workdir, ["--master-pid", str(app.gunicorn.pid)])
            agent.wait_for("the agent's first cycles",
                           lambda m: value(m, "deadlock_agent_samples_total", method="proc") > 0,
                           timeout=30)  # fmt: skip
            time.sleep(AGENT_WARMUP)
            cpu0, runs0 = agent_counters(agent)
        progress(f"round {r.number}: agent {'on' if r.agent_on else 'off'}, wrk {seconds:g}s")
        requests, duration_us, p50, p99, errors, non2xx = wrk(app, script, connections, seconds)
        r.requests, r.seconds = requests, duration_us / 1e6
        r.p50_ms, r.p99_ms, r.errors, r.non2xx = p50 / 1000, p99 / 1000, errors, non2xx
        r.load = float(Path("/proc/loadavg").read_text().split()[0])
        if agent is not None:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"agent exited {agent.proc.returncode}:\n{agent.log()[-3000:]}")
            cpu1, runs1 = agent_counters(agent)
            r.agent_cpu_ms, r.agent_pyspy_runs = 1000 * (cpu1 - cpu0), runs1 - runs0
        progress(f"round {r.number}: {r.rps:.1f} req/s, p99 {r.p99_ms:.1f} ms")
    finally:
        if agent is not None:
            agent.stop()


def print_table(rounds: list[Round], connections: int, seconds: float) -> None:
    """The result on stdout."""
    model = next(
        (line.split(":", 1)[1].strip()
         for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "unknown CPU",
    )  # fmt: skip
    print(f"app overhead: wrk {connections} keep-alive connections, / and /db alternating, "
          f"{seconds:g} s a round; gunicorn gthread {WORKERS}x{THREADS} (demo app + harvest "
          f"HTTPS thread, real PostgreSQL over TLS); agent `python -m agent watch` at its "
          f"defaults in on rounds; {os.cpu_count()} CPUs, {model}")  # fmt: skip
    print(f"{'round':>5} {'agent':>5} {'req/s':>8} {'p50_ms':>7} {'p99_ms':>7} {'errors':>6} "
          f"{'non2xx':>6} {'agent_cpu_ms':>12} {'agent_pyspy_runs':>16} {'load1':>5}")  # fmt: skip
    for r in rounds:
        cpu = f"{r.agent_cpu_ms:.1f}" if r.agent_on else "-"
        runs = f"{r.agent_pyspy_runs:g}" if r.agent_on else "-"
        print(f"{r.number:>5} {'on' if r.agent_on else 'off':>5} {r.rps:>8.1f} {r.p50_ms:>7.2f} "
              f"{r.p99_ms:>7.2f} {r.errors:>6} {r.non2xx:>6} {cpu:>12} {runs:>16} "
              f"{r.load:>5.2f}")  # fmt: skip
    off = [r for r in rounds if not r.agent_on]
    on = [r for r in rounds if r.agent_on]
    rps_off, rps_on = (statistics.median(r.rps for r in side) for side in (off, on))
    p99_off, p99_on = (statistics.median(r.p99_ms for r in side) for side in (off, on))
    ratio = rps_on / rps_off
    p99_diff = 100 * (p99_on - p99_off) / p99_off
    print()
    print(f"median off ({len(off)} rounds)   {rps_off:8.1f} req/s   p99 {p99_off:.2f} ms")
    print(f"median on  ({len(on)} rounds)   {rps_on:8.1f} req/s   p99 {p99_on:.2f} ms")
    spread = [100 * (max(r.rps for r in side) - min(r.rps for r in side)) / statistics.median(
        r.rps for r in side) for side in (off, on)]  # fmt: skip
    print(f"round-to-round spread of req/s (max-min)/median: off {spread[0]:.1f} %, "
          f"on {spread[1]:.1f} %")  # fmt: skip
    # Each on round against the off round just before it: drift over the run cancels out.
    pairs = [
        (b.rps / a.rps, 100 * (b.p99_ms - a.p99_ms) / a.p99_ms)
        for a, b in itertools.pairwise(rounds)
        if not a.agent_on and b.agent_on
    ]
    print(
        "pairs (off round, then on round): on/off req/s "
        + ", ".join(f"{q:.3f}" for q, _ in pairs)
        + f"; median {statistics.median(q for q, _ in pairs):.4f}; p99 "
        + ", ".join(f"{d:+.1f} %" for _, d in pairs)
    )
    print(f"throughput on/off            {ratio:.4f}")
    print(f"p99 on vs off                {p99_diff:+.2f} %")
    print()
    met = "MET" if ratio >= GOAL_THROUGHPUT else "MISSED"
    print(f"goal: throughput on/off >= {GOAL_THROUGHPUT:g} -> {met} ({ratio:.4f})")
    met = "MET" if p99_diff <= GOAL_P99_PERCENT else "MISSED"
    print(f"goal: p99 within {GOAL_P99_PERCENT:g} % -> {met} ({p99_diff:+.2f} %)")
    sys.stdout.flush()


def run(rounds: list[Round], connections: int, seconds: float, progress: Progress) -> None:
    """Every round on one app; fills in `rounds`."""
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        workdir = Path(tmp)
        script = workdir / "mix.lua"
        script.write_text(MIX_LUA)
        progress("starting PostgreSQL 15 (ssl=on)")
        with running_postgres(workdir / "postgres") as postgres:
            progress(f"starting gunicorn gthread {WORKERS}x{THREADS} behind fault proxies")
            (workdir / "app").mkdir()
            with running_app(workdir / "app", postgres, workers=WORKERS, threads=THREADS) as app:
                progress("warming the app up (wrk 5 s, not counted)")
                wrk(app, script, connections, 5)
                for r in rounds:
                    time.sleep(PAUSE)
                    one_round(app, workdir, script, r, connections, seconds, progress)


def main() -> int:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6,
                        help="rounds, alternating off and on (default 6)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="wrk duration per round (default 20)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=8,
                        help="wrk connections (default 8)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny run: 2 rounds of 3 s")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (Debian: apt-get install wrk)")
    count, seconds = (2, 3.0) if args.smoke else (args.rounds, args.seconds)
    if count < 2:
        parser.error("--rounds must be at least 2 (one off, one on)")
    rounds = [Round(n, agent_on=n % 2 == 0) for n in range(1, count + 1)]
    progress = Progress("overhead")
    with contextlib.suppress(KeyboardInterrupt):
        run(rounds, args.connections, seconds, progress)
        print_table(rounds, args.connections, seconds)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
