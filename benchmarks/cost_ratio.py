"""What watching costs against naive py-spy polling, side by side in one run (issue #7, P1).

    python benchmarks/cost_ratio.py [--seconds 60] [--warmup 15] [--rate 25] [--smoke]

One real gunicorn gthread app (the demo app, 2 workers x 4 threads, with its harvest HTTPS thread)
talking to a real PostgreSQL 15 with ssl=on, watched by `python -m agent watch --master-pid M` as
a real process at its defaults. Beside it runs the naive way: a loop process (this script with
--naive-loop) that runs `py-spy dump --pid W` for every worker every second.

Per traffic mode (idle; ~25 req/s over keep-alive connections; ~25 req/s on a new connection
each, "/" and "/db" alternating), both run for --warmup seconds, then the CPU each used over the
next --seconds is counted with its py-spy children:

* the agent from its own deadlock_agent_cpu_seconds_total{part="agent"|"pyspy"} (getrusage SELF
  and CHILDREN, microseconds), cross-checked with /proc/PID/stat utime+stime+cutime+cstime;
* the naive loop from the getrusage SELF + CHILDREN it prints after every round, cross-checked
  with its /proc/PID/stat the same way.

(/proc/PID/stat counts clock ticks, 10 ms: fine for the naive loop's seconds of CPU, coarse for
the agent's tens of milliseconds, hence the metric.) At the end, with the naive loop stopped, the
seed's hang is injected once and the agent's detection latency is timed (--stuck-after default).

Progress goes to stderr, the table to stdout. Exit 0 whatever the ratios (this is a
measurement); non-zero only when the run itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import resource
import signal
import subprocess
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

import agent
from agent.demo.run import get

WORKERS, THREADS = 2, 4
GOAL_RATIO = 50.0
STUCK_AFTER = 10.0  # the agent's default, which this run does not change
BURST = 16
PATHS = ("/", "/db")
CLIENTS = 4  # paced clients per traffic mode, sharing --rate
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of a process (fields 14-17 of /proc/PID/stat), seconds."""
    with open(f"/proc/{pid}/stat") as f:  # noqa: PTH123 - a /proc read, as agent/procfs.py does
        # The command name (field 2) may hold spaces or parentheses: split after the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state), so field N is fields[N - 3].
    return sum(int(v) for v in fields[11:15]) / TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """On-CPU seconds of each thread of a process (schedstat, ns), keyed "main" or its tid."""
    threads: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            ns = int((task / "schedstat").read_text().split()[0])
            threads["main" if task.name == str(pid) else task.name] = ns / 1e9
    return threads


def children_of(master: int) -> list[int]:
    """The master's children, from /proc/M/task/*/children (what the agent reads too)."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{master}/task").iterdir():
            with contextlib.suppress(OSError):
                pids.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(pids)


def naive_loop(master: int) -> int:
    """The naive watcher: `py-spy dump --pid W` for every worker, every second, until SIGTERM.

    After each round it prints `<dumps> <self CPU s> <children CPU s>` (getrusage), flushed."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dumps = 0
    next_at = time.monotonic()
    while not stop.is_set():
        for pid in children_of(master):
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(["py-spy", "dump", "--pid", str(pid)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=10, check=False)  # fmt: skip
            dumps += 1
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"{dumps} {me.ru_utime + me.ru_stime:.6f} {kids.ru_utime + kids.ru_stime:.6f}",
              flush=True)  # fmt: skip
        next_at += 1.0
        stop.wait(max(0.0, next_at - time.monotonic()))
    return 0


@dataclass
class CpuReading:
    """One side's CPU counters at one moment."""

    own: float  # seconds, the process itself (getrusage SELF, or the agent's metric)
    pyspy: float  # seconds, its reaped py-spy children
    proc: float  # seconds, /proc/PID/stat utime+stime+cutime+cstime (10 ms ticks)
    dumps: float  # py-spy runs so far


class NaiveProcess:
    """The naive loop as a subprocess; a thread keeps its last printed line."""

    def __init__(self, master: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--naive-loop", str(master)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.last = (0.0, 0.0, 0.0)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            dumps, own, kids = (float(v) for v in line.split())
            self.last = (dumps, own, kids)

    def reading(self) -> CpuReading:
        """Its counters as of its last finished round (<= 1 s old) and /proc now."""
        dumps, own, kids = self.last
        return CpuReading(own=own, pyspy=kids, proc=proc_cpu(self.proc.pid), dumps=dumps)

    def stop(self) -> None:
        """SIGTERM: it finishes the dump in flight and exits."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


def agent_reading(agent: AgentProcess) -> tuple[CpuReading, Metrics]:
    """The agent's counters from one scrape (as of its last finished cycle) and /proc now."""
    m = agent.scrape()
    return CpuReading(
        own=value(m, "deadlock_agent_cpu_seconds_total", part="agent"),
        pyspy=value(m, "deadlock_agent_cpu_seconds_total", part="pyspy"),
        proc=proc_cpu(agent.proc.pid),
        dumps=value(m, "deadlock_agent_samples_total", method="pyspy")
        + value(m, "deadlock_agent_samples_total", method="pyspy_native"),
    ), m


class PacedTraffic:
    """CLIENTS client threads sending PATHS alternately at `rate` requests a second in all."""

    def __init__(self, app: App, rate: float, *, keepalive: bool) -> None:
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        period = CLIENTS / rate
        for n in range(CLIENTS):
            target = self._keepalive if keepalive else self._new_connections
            thread = threading.Thread(target=target, args=(app, period, n * period / CLIENTS),
                                      daemon=True)  # fmt: skip
            thread.start()
            self._threads.append(thread)

    def _count(self, status: int) -> None:
        with self._lock:
            self.statuses[status] += 1

    def total(self) -> int:
        """Responses so far (any status)."""
        with self._lock:
            return sum(self.statuses.values())

    def _paced(self, period: float, offset: float, send: Callable[[str], int]) -> None:
        next_at = time.monotonic() + offset
        i = 0
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self._count(send(PATHS[i % len(PATHS)]))
            i += 1
            next_at = max(next_at + period, time.monotonic() - period)  # no catch-up bursts

    def _new_connections(self, app: App, period: float, offset: float) -> None:
        self._paced(period, offset, lambda path: get(app.gunicorn.url + path, timeout=30))

    def _keepalive(self, app: App, period: float, offset: float) -> None:
        conn: list[http.client.HTTPConnection] = []

        def send(path: str) -> int:
            try:
                if not conn:
                    conn.append(http.client.HTTPConnection("127.0.0.1", app.gunicorn.port,
                                                           timeout=30))  # fmt: skip
                conn[0].request("GET", path)
                response = conn[0].getresponse()
                response.read()
                if response.getheader("Connection", "").lower() == "close":
                    conn.pop().close()
                return response.status
            except (OSError, http.client.HTTPException):
                if conn:
                    conn.pop().close()
                return 0

        self._paced(period, offset, send)
        if conn:
            conn.pop().close()

    def stop(self) -> None:
        """Stop every client after its request in flight."""
        self._stop.set()
        for thread in self._threads:
            thread.join(35)


@dataclass
class Mode:
    """One traffic mode and what was measured over its window."""

    name: str
    rate: float  # 0: idle
    keepalive: bool = False
    seconds: float = 0.0
    requests: int = 0
    agent: CpuReading | None = None  # deltas over the window
    naive: CpuReading | None = None
    cycle_cpu: float = 0.0  # deadlock_agent_cycle_cpu_seconds at the end of the window
    threads: dict[str, float] = field(default_factory=dict)  # agent's per-thread CPU, seconds
    load: float = 0.0  # 1-minute load average at the end: others' work shows here
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def ratio(self) -> float:
        """naive ÷ agent, CPU with py-spy children."""
        assert self.agent is not None and self.naive is not None
        agent_cpu = self.agent.own + self.agent.pyspy
        return (self.naive.own + self.naive.pyspy) / agent_cpu if agent_cpu > 0 else float("inf")


def delta(after: CpuReading, before: CpuReading) -> CpuReading:
    """Counter growth between two readings."""
    return CpuReading(own=after.own - before.own, pyspy=after.pyspy - before.pyspy,
                      proc=after.proc - before.proc, dumps=after.dumps - before.dumps)  # fmt: skip


def measure(app: App, agent: AgentProcess, mode: Mode, warmup: float, seconds: float,
            progress: Progress) -> None:  # fmt: skip
    """Start the naive loop and the mode's traffic, warm up, then count CPU over `seconds`."""
    naive = NaiveProcess(app.gunicorn.pid)
    traffic = None if mode.rate == 0 else PacedTraffic(app, mode.rate, keepalive=mode.keepalive)
    try:
        progress(f"{mode.name}: naive loop pid {naive.proc.pid} started; {warmup:g}s warm-up")
        time.sleep(warmup)
        check_alive(agent)
        a0, _ = agent_reading(agent)
        th0 = thread_cpu(agent.proc.pid)
        n0, r0, t0 = naive.reading(), traffic.total() if traffic else 0, time.monotonic()
        progress(f"{mode.name}: measuring {seconds:g}s")
        time.sleep(seconds)
        check_alive(agent)
        a1, m = agent_reading(agent)
        th1 = thread_cpu(agent.proc.pid)
        mode.threads = {t: th1[t] - th0.get(t, 0.0) for t in th1}
        n1, r1, t1 = naive.reading(), traffic.total() if traffic else 0, time.monotonic()
        mode.seconds, mode.requests = t1 - t0, r1 - r0
        mode.agent, mode.naive = delta(a1, a0), delta(n1, n0)
        mode.cycle_cpu = value(m, "deadlock_agent_cycle_cpu_seconds")
        mode.load = float(Path("/proc/loadavg").read_text().split()[0])
        progress(f"{mode.name}: agent {1000 * (mode.agent.own + mode.agent.pyspy):.0f} ms, "
                 f"naive {1000 * (mode.naive.own + mode.naive.pyspy):.0f} ms, "
                 f"ratio {mode.ratio:.1f}")  # fmt: skip
    finally:
        if traffic is not None:
            traffic.stop()
            mode.statuses = traffic.statuses
        naive.stop()


def check_alive(agent: AgentProcess) -> None:
    """Raise when the agent process has exited."""
    if agent.proc.poll() is not None:
        raise RuntimeError(f"agent exited {agent.proc.returncode}:\n{agent.log()[-3000:]}")


def wait_ok(agent: AgentProcess, timeout: float) -> None:
    """Scrape until every worker is ok with no stuck thread; raise on timeout."""
    agent.wait_for(
        "every worker ok",
        lambda m: (
            value(m, "deadlock_agent_workers", state="ok") == WORKERS
            and value(m, "deadlock_agent_threads", state="stuck") == 0
        ),
        timeout=timeout,
    )


def detect(app: App, agent: AgentProcess, progress: Progress) -> float | None:
    """Inject the seed's hang once; seconds until deadlocked_workers >= 1 (None: not seen)."""
    wait_ok(agent, timeout=60)
    clients = Clients(app)
    progress("injecting the seed's hang (PostgreSQL and HTTPS handshakes stall, 16 x /db)")
    injected = time.monotonic()
    app.database.stall()
    app.harvest.stall()
    burst = [clients.once("/db", timeout=120) for _ in range(BURST)]
    latency = None
    try:
        while time.monotonic() - injected < STUCK_AFTER + 30:
            check_alive(agent)
            with contextlib.suppress(OSError):
                if value(agent.scrape(), "deadlock_agent_deadlocked_workers",
                         signature=SIG) >= 1:  # fmt: skip
                    latency = time.monotonic() - injected
                    break
            time.sleep(0.1)
    finally:
        app.database.heal()
        app.harvest.heal()
        for thread in burst:
            thread.join(30)
    shown = "not detected" if latency is None else f"detected in {latency:.2f}s"
    progress(f"hang {shown}; healed ({statuses_text(clients.statuses)})")
    return latency


def print_table(modes: list[Mode], latency: float | None, cpu_model: str) -> None:
    """The result on stdout."""
    print(f"cost ratio: naive `py-spy dump` of every worker each second vs `python -m agent "
          f"watch` at its defaults, side by side; gunicorn gthread {WORKERS}x{THREADS} (demo app "
          f"+ harvest HTTPS thread, real PostgreSQL over TLS); {os.cpu_count()} CPUs, "
          f"{cpu_model}")  # fmt: skip
    print("CPU in ms over each window, py-spy children included; /proc = utime+stime+cutime+"
          "cstime in 10 ms ticks (cross-check)")  # fmt: skip
    print(f"{'mode':<18} {'window_s':>8} {'req/s':>6} {'agent_ms':>8} {'(own+pyspy)':>14} "
          f"{'agent_/proc':>11} {'naive_ms':>8} {'naive_/proc':>11} {'naive/agent':>11} "
          f"{'agent_pyspy_runs':>16} {'naive_runs':>10} {'load1':>5}")  # fmt: skip
    for m in modes:
        assert m.agent is not None and m.naive is not None
        agent_ms = 1000 * (m.agent.own + m.agent.pyspy)
        split = f"{1000 * m.agent.own:.1f}+{1000 * m.agent.pyspy:.1f}"
        print(f"{m.name:<18} {m.seconds:>8.1f} {m.requests / m.seconds:>6.1f} "
              f"{agent_ms:>8.1f} {split:>14} {1000 * m.agent.proc:>11.0f} "
              f"{1000 * (m.naive.own + m.naive.pyspy):>8.0f} {1000 * m.naive.proc:>11.0f} "
              f"{m.ratio:>11.1f} {m.agent.dumps:>16g} {m.naive.dumps:>10g} "
              f"{m.load:>5.2f}")  # fmt: skip
    print()
    for m in modes:
        assert m.agent is not None
        if m.statuses:
            print(f"{m.name}: requests {statuses_text(m.statuses)} (0 = failed or timed out)")
        print(f"{m.name}: agent's own CPU {1000 * m.agent.own / m.seconds:.2f} ms/s "
              f"(deadlock_agent_cycle_cpu_seconds of its last "
              f"cycle: {1000 * m.cycle_cpu:.2f} ms), py-spy {1000 * m.agent.pyspy:.1f} ms in "
              f"{m.agent.dumps:g} runs")  # fmt: skip
        threads = ", ".join(f"{t} {1000 * cpu / m.seconds:.2f}" for t, cpu in m.threads.items())
        print(f"{m.name}: agent threads' on-CPU time (schedstat), ms/s: {threads}")
    print()
    for m in modes:
        met = "MET" if m.ratio >= GOAL_RATIO else "MISSED"
        print(f"goal: {m.name}: naive/agent >= {GOAL_RATIO:g} -> {met} ({m.ratio:.1f})")
    if modes:
        bound = STUCK_AFTER + 2
        if latency is None:
            print(f"goal: seed hang detected <= stuck-after + 2 s = {bound:g} s -> MISSED "
                  "(not detected)")  # fmt: skip
        else:
            met = "MET" if latency <= bound else "MISSED"
            print(f"goal: seed hang detected <= stuck-after + 2 s = {bound:g} s -> {met} "
                  f"({latency:.2f} s)")  # fmt: skip
    sys.stdout.flush()


def cpu_model() -> str:
    """The first `model name` of /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def run(modes: list[Mode], warmup: float, seconds: float, progress: Progress) -> float | None:
    """Every mode on one app and agent, then one injected hang; returns its detection latency."""
    with tempfile.TemporaryDirectory(prefix="cost-ratio-") as tmp:
        workdir = Path(tmp)
        progress("starting PostgreSQL 15 (ssl=on)")
        with running_postgres(workdir / "postgres") as postgres:
            progress(f"starting gunicorn gthread {WORKERS}x{THREADS} behind fault proxies")
            (workdir / "app").mkdir()
            with running_app(workdir / "app", postgres, workers=WORKERS, threads=THREADS) as app:
                agent_proc = AgentProcess(workdir, ["--master-pid", str(app.gunicorn.pid)])
                try:
                    wait_ok(agent_proc, timeout=30)
                    progress(f"agent pid {agent_proc.proc.pid} up on {agent_proc.url} "
                             f"(package {Path(agent.__file__).parent})")  # fmt: skip
                    for mode in modes:
                        measure(app, agent_proc, mode, warmup, seconds, progress)
                    return detect(app, agent_proc, progress)
                finally:
                    code = agent_proc.stop()
                    progress(f"agent stopped (exit {code})")


def main() -> int:
    """Parse arguments and run (or, with --naive-loop, be the naive watcher)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="measured window per traffic mode (default 60)")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=15.0,
                        help="seconds before each window (default 15)")  # fmt: skip
    parser.add_argument("--rate", type=float, default=25.0,
                        help="requests a second in the traffic modes (default 25)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny run (~20 s of modes)")
    parser.add_argument("--naive-loop", type=int, metavar="MASTER_PID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_loop is not None:
        return naive_loop(args.naive_loop)
    warmup, seconds = (1.0, 2.5) if args.smoke else (args.warmup, args.seconds)
    modes = [
        Mode("idle", 0.0),
        Mode("keep-alive", args.rate, keepalive=True),
        Mode("new-connection", args.rate),
    ]
    progress = Progress("cost")
    with contextlib.suppress(KeyboardInterrupt):
        latency = run(modes, warmup, seconds, progress)
        print_table(modes, latency, cpu_model())
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
