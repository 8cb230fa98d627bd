"""What the agent costs, and how fast it still finds a hang, at 64 workers x 16 threads (issue #7).

    python benchmarks/scale.py [--workers 64] [--threads 16] [--seconds 60] [--smoke]

The target is benchmarks/synthetic.py (a gunicorn-shaped master with N workers of T real
threads); the agent is the real process, `python -m agent watch --master-pid M --stuck-after 5`.

P4, per mode (idle: --rate 0; traffic: --rate 1 and 5 tasks/s per worker; churn: --rate 1
--churn 0.2, five respawns a second): a fresh target and agent, a warm-up (at least --warmup s,
then until deadlock_agent_dumps_deferred_total has stopped growing for 5 s, at most
--warmup-max s: the agent's first look at every worker goes through its py-spy budget), then
--seconds of scrapes once a second. Each cycle (deduplicated by
deadlock_agent_last_sample_timestamp_seconds) gives deadlock_agent_cycle_cpu_seconds and
deadlock_agent_cycle_duration_seconds; the agent's VmRSS is read from /proc every second;
py-spy runs and deferred dumps per minute come from counter deltas. The threads that ran in one
second (what the /proc scan has to read) are counted once per mode from the target's schedstat.

P3, in the modes of --p3-modes, on that mode's target and agent after its P4 window: --hangs
times, SIGUSR1 to a different worker (one of its pool threads then waits forever on a lock it
holds), and the time from the signal until deadlock_agent_threads{state="stuck"} (scraped every
0.1 s) is higher than before it. Stuck threads accumulate; each hang only has to raise the count.

Progress goes to stderr, the tables to stdout. Exit 0 whatever the figures (this is a
measurement); non-zero only when the run itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import AgentProcess, Metrics, Progress, value

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STUCK_AFTER = 5.0
INTERVAL = 1.0
CPU_GOAL = 0.010  # s of CPU per steady-state cycle
RSS_GOAL = 60 * 1024 * 1024
DETECT_EVERY = 0.1
SETTLED = 5.0  # warm-up ends once deferred dumps have not grown for this long
PYSPY = ("pyspy", "pyspy_native")

progress = Progress("scale")


@dataclass(frozen=True)
class Mode:
    """One traffic shape of the target."""

    name: str
    rate: float
    churn: float = 0.0

    def describe(self) -> str:
        """`--rate 1 --churn 0.2`."""
        return f"--rate {self.rate:g}" + (f" --churn {self.churn:g}" if self.churn else "")


MODES = {
    "idle": Mode("idle", 0.0),
    "rate1": Mode("rate1", 1.0),
    "rate5": Mode("rate5", 5.0),
    "churn": Mode("churn", 1.0, 0.2),
}


@dataclass
class Cost:
    """What one mode's measurement window saw."""

    mode: Mode
    code: str = ""  # the agent's commit when this mode's agent started
    warmup: float = 0.0
    window: float = 0.0
    cycle_cpu: list[float] = field(default_factory=list)
    cycle_wall: list[float] = field(default_factory=list)
    rss_max: int = 0
    pyspy_runs: float = 0.0
    deferred: float = 0.0
    agent_cpu: float = 0.0  # agent process CPU in the window (its own, not py-spy's)
    pyspy_cpu: float = 0.0
    threads_min: float = math.inf
    threads_max: float = 0.0
    stuck_max: float = 0.0
    stuck_scrapes: int = 0  # scrapes with deadlock_agent_threads{state="stuck"} > 0
    scrapes: int = 0
    workers_max: float = 0.0
    ran_per_second: int = 0  # target threads whose schedstat moved in one second
    errors: dict[str, float] = field(default_factory=dict)  # by reason, in the window


@dataclass
class Hang:
    """One injected hang."""

    mode: str
    number: int
    pid: int
    before: float
    latency: float | None = None
    pyspy_runs: float = 0.0  # py-spy runs (all workers) from the signal to the detection
    deferred: float = 0.0  # dumps put off in that time


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of 10 is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.nan


def vm_rss(pid: int) -> int:
    """A process's resident set in bytes (0 once it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """A process's children, from /proc (the synthetic master's are its workers)."""
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def schedstats(pids: list[int]) -> dict[tuple[int, int], str]:
    """(pid, tid) -> the first two schedstat fields (on-CPU ns, times scheduled)."""
    out: dict[tuple[int, int], str] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    stat = (task / "schedstat").read_text().split()
                    out[(pid, int(task.name))] = " ".join(stat[:2])
    return out


def threads_that_ran(master: int) -> int:
    """How many target threads ran (schedstat moved) in one second."""
    before = schedstats(children(master))
    time.sleep(1.0)
    after = schedstats(children(master))
    return sum(1 for key, stat in after.items() if before.get(key, stat) != stat)


def total(m: Metrics, name: str, methods: tuple[str, ...]) -> float:
    """Sum of a counter over some of its `method` labels."""
    return sum(value(m, name, method=method) for method in methods)


def threads_watched(m: Metrics) -> float:
    """Sum of deadlock_agent_threads over every state."""
    return sum(m.series("deadlock_agent_threads").values())


class Target:
    """benchmarks/synthetic.py as a subprocess; stop() ends it and its workers."""

    def __init__(self, workers: int, threads: int, mode: Mode) -> None:
        self.workers = workers
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "synthetic.py"), "--workers", str(workers),
             "--threads", str(threads), "--rate", str(mode.rate), "--churn", str(mode.churn)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if line[:1] != ["ready"]:
            self.stop()
            raise RuntimeError(f"synthetic target did not start: {line!r}")
        self.pid = int(line[1])

    def wait_threads(self, threads: int, timeout: float) -> None:
        """Wait until every worker runs, nearly all with every thread (pools start them all)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = []
            for pid in children(self.pid):
                with contextlib.suppress(OSError):
                    counts.append(sum(1 for _ in Path(f"/proc/{pid}/task").iterdir()))
            # Under --churn a respawned worker is always starting: three in four complete will do.
            full = sum(1 for c in counts if c >= threads)
            if len(counts) >= self.workers and full >= math.ceil(0.75 * self.workers):
                return
            time.sleep(0.2)
        raise RuntimeError(f"synthetic workers not up after {timeout:g}s")

    def stop(self) -> None:
        """SIGTERM the master (it ends its workers), then make sure of every worker."""
        workers = children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def watched(workdir: Path, target: Target) -> Iterator[AgentProcess]:
    """The real agent process watching the target, run from this checkout."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    agent = AgentProcess(
        workdir,
        ["--master-pid", str(target.pid), "--stuck-after", f"{STUCK_AFTER:g}"],
        env={"PYTHONPATH": path},
    )
    try:
        agent.wait_for("the first cycle", lambda m: value(m, "deadlock_agent_up") == 1, 60)
        yield agent
    finally:
        code = agent.stop()
        if code not in (0, None):
            progress(f"agent exited {code}; log tail:\n{agent.log()[-2000:]}")


def scrape(agent: AgentProcess) -> Metrics | None:
    """One scrape, None when the agent did not answer in time (a slow cycle holds no lock)."""
    try:
        return agent.scrape()
    except OSError as err:
        progress(f"scrape failed: {err}")
        return None


def warm_up(agent: AgentProcess, least: float, most: float) -> float:
    """Scrape once a second until the first looks are done; return how long it took."""
    started = time.monotonic()
    deferred, since = -1.0, started
    while (elapsed := time.monotonic() - started) < most:
        m = scrape(agent)
        if m is not None:
            now_deferred = value(m, "deadlock_agent_dumps_deferred_total")
            if now_deferred != deferred:
                deferred, since = now_deferred, time.monotonic()
            if elapsed >= least and time.monotonic() - since >= SETTLED:
                break
        time.sleep(1.0)
    return time.monotonic() - started


def measure(agent: AgentProcess, target: Target, cost: Cost, seconds: float) -> None:
    """Scrape once a second for `seconds`; fill in `cost`."""
    first: Metrics | None = None
    last: Metrics | None = None
    seen: set[float] = set()
    started = time.monotonic()
    next_at = started
    while time.monotonic() - started < seconds:
        m = scrape(agent)
        cost.rss_max = max(cost.rss_max, vm_rss(agent.proc.pid))
        if m is not None:
            first = first or m
            last = m
            stamp = value(m, "deadlock_agent_last_sample_timestamp_seconds")
            if stamp not in seen:
                seen.add(stamp)
                cost.cycle_cpu.append(value(m, "deadlock_agent_cycle_cpu_seconds"))
                cost.cycle_wall.append(value(m, "deadlock_agent_cycle_duration_seconds"))
            watched_now = threads_watched(m)
            cost.threads_min = min(cost.threads_min, watched_now)
            cost.threads_max = max(cost.threads_max, watched_now)
            stuck = value(m, "deadlock_agent_threads", state="stuck")
            cost.stuck_max = max(cost.stuck_max, stuck)
            cost.stuck_scrapes += stuck > 0
            cost.scrapes += 1
            workers = sum(m.series("deadlock_agent_workers").values())
            cost.workers_max = max(cost.workers_max, workers)
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))
    if first is None or last is None or first is last:
        raise RuntimeError("fewer than two scrapes in the measurement window")
    cost.window = time.monotonic() - started
    per_minute = 60.0 / cost.window

    def delta(name: str, **labels: str) -> float:
        return value(last, name, **labels) - value(first, name, **labels)

    samples = "deadlock_agent_samples_total"
    cost.pyspy_runs = (total(last, samples, PYSPY) - total(first, samples, PYSPY)) * per_minute
    cost.deferred = delta("deadlock_agent_dumps_deferred_total") * per_minute
    cost.agent_cpu = delta("deadlock_agent_cpu_seconds_total", part="agent")
    cost.pyspy_cpu = delta("deadlock_agent_cpu_seconds_total", part="pyspy")
    errors = "deadlock_agent_sample_errors_total"
    for labels, count in last.series(errors).items():
        reason = dict(labels).get("reason", "?")
        if count - value(first, errors, reason=reason):
            cost.errors[reason] = count - value(first, errors, reason=reason)
    cost.ran_per_second = threads_that_ran(target.pid)


def inject(agent: AgentProcess, target: Target, mode: str, hangs: int, timeout: float,
           gap: float) -> list[Hang]:  # fmt: skip
    """SIGUSR1 to `hangs` different workers, one at a time; time each until stuck rises."""
    done: list[Hang] = []
    victims = children(target.pid)
    if len(victims) < hangs:
        raise RuntimeError(f"only {len(victims)} workers for {hangs} hangs")
    step = len(victims) // hangs  # spread over the worker list
    for number in range(hangs):
        pid = victims[number * step]
        time.sleep(gap)
        m = scrape(agent) or agent.scrape()
        hang = Hang(mode, number + 1, pid, value(m, "deadlock_agent_threads", state="stuck"))
        first = m
        signalled = time.monotonic()
        os.kill(pid, signal.SIGUSR1)
        while (elapsed := time.monotonic() - signalled) < timeout:
            m = scrape(agent) or m
            if value(m, "deadlock_agent_threads", state="stuck") > hang.before:
                hang.latency = elapsed
                break
            time.sleep(DETECT_EVERY)
        samples = "deadlock_agent_samples_total"
        hang.pyspy_runs = total(m, samples, PYSPY) - total(first, samples, PYSPY)
        hang.deferred = value(m, "deadlock_agent_dumps_deferred_total") - value(
            first, "deadlock_agent_dumps_deferred_total"
        )
        shown = "not detected" if hang.latency is None else f"{hang.latency:.2f} s"
        progress(f"{mode} hang {hang.number} (pid {pid}, {hang.before:g} stuck before): {shown}")
        done.append(hang)
    return done


def revision() -> str:
    """The checkout's commit, and whether agent/ differs from it (the agent runs from here)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "agent"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return head.strip() + (" + uncommitted changes in agent/" if dirty.strip() else "")


def ms(seconds: float) -> str:
    """Seconds as milliseconds with one decimal."""
    return f"{seconds * 1000:.1f}"


def verdict(ok: bool) -> str:
    """The goal line's word."""
    return "MET" if ok else "MISSED"


def print_costs(costs: list[Cost], workers: int, threads: int) -> bool:
    """The P4 table and its goal lines; True when every goal was met."""
    print(f"\nP4: agent cost at {workers} workers x {threads} threads, --stuck-after "
          f"{STUCK_AFTER:g}, --interval {INTERVAL:g}")  # fmt: skip
    rows = [
        ("target", lambda c: c.mode.describe()),
        ("agent code (commit)", lambda c: c.code.replace(" + uncommitted changes in agent/", "+")),
        ("warm-up (s)", lambda c: f"{c.warmup:.0f}"),
        ("window (s) / cycles seen", lambda c: f"{c.window:.0f} / {len(c.cycle_cpu)}"),
        ("workers (max)", lambda c: f"{c.workers_max:g}"),
        ("threads watched (min-max)", lambda c: f"{c.threads_min:g}-{c.threads_max:g}"),
        ("target threads that ran in 1 s", lambda c: f"{c.ran_per_second}"),
        ("stuck threads (max)", lambda c: f"{c.stuck_max:g}"),
        ("scrapes with a stuck thread", lambda c: f"{c.stuck_scrapes} of {c.scrapes}"),
        (
            "cycle CPU p50 / p95 / max (ms)",
            lambda c: " / ".join(ms(percentile(c.cycle_cpu, q)) for q in (50, 95, 100)),
        ),
        (
            "cycle wall p50 / p95 / max (ms)",
            lambda c: " / ".join(ms(percentile(c.cycle_wall, q)) for q in (50, 95, 100)),
        ),
        ("agent CPU, % of a core", lambda c: f"{100 * c.agent_cpu / c.window:.2f}"),
        ("py-spy CPU, % of a core", lambda c: f"{100 * c.pyspy_cpu / c.window:.2f}"),
        ("py-spy runs / min", lambda c: f"{c.pyspy_runs:.1f}"),
        ("dumps deferred / min", lambda c: f"{c.deferred:.1f}"),
        (
            "sample errors in window",
            lambda c: ", ".join(f"{k} {v:g}" for k, v in c.errors.items()) or "0",
        ),
        ("agent VmRSS max (MB)", lambda c: f"{c.rss_max / 2**20:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    cols = [max(22, len(c.mode.describe()) + 2) for c in costs]
    pairs = list(zip(costs, cols, strict=True))
    print(f"{'mode':<{width}}  " + "".join(f"{c.mode.name:>{w}}" for c, w in pairs))
    for name, cell in rows:
        print(f"{name:<{width}}  " + "".join(f"{cell(c):>{w}}" for c, w in pairs))
    all_met = True
    print()
    for c in costs:
        p95 = percentile(c.cycle_cpu, 95)
        wall = percentile(c.cycle_wall, 95)
        goals = [
            (f"cycle CPU p95 <= {ms(CPU_GOAL)} ms", p95 <= CPU_GOAL, f"p95 {ms(p95)} ms, max "
             f"{ms(max(c.cycle_cpu))} ms"),
            (f"agent VmRSS <= {RSS_GOAL // 2**20} MB", c.rss_max <= RSS_GOAL,
             f"max {c.rss_max / 2**20:.1f} MB"),
            (f"cycle wall p95 < --interval {INTERVAL:g} s", wall < INTERVAL, f"p95 {ms(wall)} ms"),
            ("no stuck thread with nothing stuck", c.stuck_max == 0, f"max {c.stuck_max:g}"),
        ]  # fmt: skip
        for text, ok, shown in goals:
            all_met &= ok
            print(f"goal ({c.mode.name}): {text} -> {verdict(ok)} ({shown})")
    return all_met


def print_hangs(hangs: list[Hang]) -> bool:
    """The P3 table and its goal line; True when met."""
    bound = STUCK_AFTER + 2.0
    print(f"\nP3: detection latency, SIGUSR1 -> deadlock_agent_threads{{state=\"stuck\"}} rises "
          f"(scraped every {DETECT_EVERY:g} s)")  # fmt: skip
    print(f"{'mode':<8}{'hang':>6}{'pid':>10}{'stuck before':>14}{'latency (s)':>13}"
          f"{'py-spy runs':>13}{'deferred':>10}")  # fmt: skip
    for h in hangs:
        shown = "-" if h.latency is None else f"{h.latency:.2f}"
        note = ""
        if h.latency is not None and h.latency < STUCK_AFTER:
            note = "  (< stuck-after: another thread was called stuck)"
        print(f"{h.mode:<8}{h.number:>6}{h.pid:>10}{h.before:>14g}{shown:>13}"
              f"{h.pyspy_runs:>13g}{h.deferred:>10g}{note}")  # fmt: skip
    all_met = True
    for mode in dict.fromkeys(h.mode for h in hangs):
        mine = [h for h in hangs if h.mode == mode]
        found = [h.latency for h in mine if h.latency is not None]
        p95 = percentile(found, 95) if len(found) == len(mine) else math.inf
        print(f"{mode}: detected {len(found)}/{len(mine)}, latency p50 / p95 / max "
              f"{percentile(found, 50):.2f} / {percentile(found, 95):.2f} / "
              f"{max(found, default=math.nan):.2f} s")  # fmt: skip
        ok = p95 <= bound
        all_met &= ok
        print(f"goal ({mode}): p95 <= stuck-after + 2 s = {STUCK_AFTER:g} + 2 = {bound:g} s -> "
              f"{verdict(ok)} (p95 {p95:.2f} s)")  # fmt: skip
    return all_met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window per mode")
    parser.add_argument("--warmup", type=float, default=30.0, help="at least this long")
    parser.add_argument("--warmup-max", type=float, default=150.0, help="at most this long")
    parser.add_argument(
        "--modes", default="idle,rate1,rate5,churn", help=f"comma-separated, of {', '.join(MODES)}"
    )
    parser.add_argument("--p3-modes", default="idle,rate1", help="modes to inject hangs in")
    parser.add_argument("--hangs", type=int, default=10, help="hangs per P3 mode")
    parser.add_argument(
        "--smoke", action="store_true", help="4 workers x 4 threads, idle only, 1 hang: about 30 s"
    )
    args = parser.parse_args()
    if args.smoke:
        args.workers, args.threads, args.seconds = 4, 4, 8.0
        args.warmup, args.warmup_max = 3.0, 15.0
        args.modes, args.p3_modes, args.hangs = "idle", "idle", 1
    modes = [MODES[name] for name in args.modes.split(",")]
    p3 = set(args.p3_modes.split(",")) if args.p3_modes else set()
    costs: list[Cost] = []
    hangs: list[Hang] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for mode in modes:
            progress(f"{mode.name}: starting {args.workers}x{args.threads} {mode.describe()}")
            try:
                target = Target(args.workers, args.threads, mode)
            except (OSError, RuntimeError) as err:
                progress(f"{mode.name}: target failed: {err}")
                continue
            try:
                target.wait_threads(args.threads, 120)
                with watched(Path(tmp), target) as agent:
                    cost = Cost(mode, code=revision())
                    cost.warmup = warm_up(agent, args.warmup, args.warmup_max)
                    progress(f"{mode.name}: warm after {cost.warmup:.0f}s; measuring "
                             f"{args.seconds:g}s")  # fmt: skip
                    measure(agent, target, cost, args.seconds)
                    costs.append(cost)
                    progress(f"{mode.name}: cycle CPU p95 {ms(percentile(cost.cycle_cpu, 95))} "
                             f"ms, RSS {cost.rss_max / 2**20:.1f} MB, py-spy "
                             f"{cost.pyspy_runs:.1f}/min")  # fmt: skip
                    if mode.name in p3:
                        hangs += inject(agent, target, mode.name, args.hangs,
                                        timeout=STUCK_AFTER + 55.0, gap=2.0)  # fmt: skip
            except (OSError, RuntimeError, AssertionError) as err:
                # One mode failing must not lose the others' figures.
                progress(f"{mode.name}: FAILED: {err}")
                failed.append(mode.name)
            finally:
                target.stop()
    print(f"agent code at the end: {revision()} (per mode in the table; + = uncommitted edits)")
    cost_met = print_costs(costs, args.workers, args.threads)
    hang_met = print_hangs(hangs) if hangs else True
    if failed:
        print(f"\nmodes that failed to run (see stderr): {', '.join(failed)}")
    print(f"\nall goals: {verdict(cost_met and hang_met and not failed)}")


if __name__ == "__main__":
    main()
