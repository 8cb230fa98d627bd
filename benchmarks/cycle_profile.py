"""Where one sampling cycle's CPU goes, stage by stage (issue #7: the profile behind P1 and P4).

    python benchmarks/cycle_profile.py [--workers 64] [--threads 16] [--rate 1] [--cycles 30]
                                       [--pause 1.0] [--smoke]

Starts benchmarks/synthetic.py (a gunicorn-shaped target of real processes and threads), builds
the agent's real Monitor in this process (real Discovery, Scanner, Tracker and py-spy), lets it
take its first look at every worker (a large py-spy budget for the warm-up only), then runs
--cycles cycles --pause seconds apart and times each stage with the thread's CPU clock. A pause
of 1 s is the agent's real rhythm: every stage then runs "cold" (caches and branch predictors
lost while asleep); --pause 0 shows the same work back to back, "hot".

Separately it measures what a 1 Hz loop costs with no work at all: the thread CPU of a C-level
sleep (time.sleep) and of the agent's own wait (SimpleQueue.get with a timeout), per wake-up.

Prints a table on stdout, progress on stderr. A measurement: exit 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.analysis import AnalysisSettings, Tracker
from agent.discovery import Discovery
from agent.monitor import Monitor
from agent.pyspy import PySpy
from agent.signatures import load_catalog

SYNTHETIC = Path(__file__).resolve().parent / "synthetic.py"
STAGES = (
    ("discovery", "workers", "workers"),
    ("tracker.retain", "tracker", "retain"),
    ("scanner.retain", "scanner", "retain"),
    ("scan (/proc)", "scanner", "scan"),
    ("observe_proc", "tracker", "observe_proc"),
    ("plan", "tracker", "plan"),
    ("judge", "tracker", "judge"),
    ("incidents", "incidents", "update"),
)


def progress(message: str) -> None:
    print(f"[cycle-profile] {message}", file=sys.stderr, flush=True)


def timed(spent: dict[str, int], label: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time_ns()
        try:
            return func(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0) + time.thread_time_ns() - started

    return wrapper


def own_thread_ns() -> int:
    path = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")
    return int(path.read_bytes().split()[0])


def wake_cost(kind: str, wakes: int, period: float) -> float:
    """Thread CPU (us) per wake-up of a loop that does nothing else."""
    events: queue.SimpleQueue[int] = queue.SimpleQueue()
    started = own_thread_ns()
    for _ in range(wakes):
        if kind == "sleep":
            time.sleep(period)
        else:
            try:  # noqa: SIM105 - the agent's own loop, as it is written (Monitor.run)
                events.get(timeout=period)
            except queue.Empty:
                pass
    return (own_thread_ns() - started) / wakes / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1.0, help="tasks a second per worker")
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between cycles")
    parser.add_argument("--smoke", action="store_true", help="2 x 4, 3 cycles: a few seconds")
    args = parser.parse_args()
    if args.smoke:
        args.workers, args.threads, args.cycles, args.pause = 2, 4, 3, 0.2

    progress(f"starting synthetic target {args.workers}x{args.threads} --rate {args.rate:g}")
    target = subprocess.Popen(
        [sys.executable, str(SYNTHETIC), "--workers", str(args.workers),
         "--threads", str(args.threads), "--rate", str(args.rate)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert target.stdout is not None
        line = target.stdout.readline()
        if not line.startswith("ready "):
            progress(f"the target did not start: {line!r}")
            return 1
        master = int(line.split()[1])
        pyspy = PySpy()
        pyspy.check()
        # The real settings but for the py-spy budget, so that the first look at every worker
        # is done within the warm-up; steady state spends none of it.
        tracker = Tracker(load_catalog(), AnalysisSettings(max_dumps_per_minute=100_000))
        mon = Monitor(
            workers=Discovery(master_pid=master), stacks=pyspy, tracker=tracker, listeners=[]
        )
        warm = 0
        while warm < 60:
            mon.cycle()
            warm += 1
            if all(t.last_dump_at > float("-inf") for t in tracker._workers.values()) and (
                len(tracker._workers) >= args.workers and warm >= 5
            ):
                break
            time.sleep(0.2)
        progress(f"warm after {warm} cycles ({dict(mon._samples)} samples); profiling")
        spent: dict[str, int] = {}
        holders = {"workers": mon.workers, "tracker": mon.tracker, "scanner": mon.scanner,
                   "incidents": mon.incidents}  # fmt: skip
        for label, holder, method in STAGES:
            obj = holders[holder]
            setattr(obj, method, timed(spent, label, getattr(obj, method)))
        totals: list[int] = []
        changed: list[int] = []
        scan = mon.scanner.scan

        def counting_scan(*a: Any, **k: Any) -> Any:
            sample = scan(*a, **k)
            changed[-1] += len(sample.threads)
            return sample

        mon.scanner.scan = counting_scan  # type: ignore[method-assign]
        for _ in range(args.cycles):
            changed.append(0)
            started = time.thread_time_ns()
            mon.cycle()
            totals.append(time.thread_time_ns() - started)
            time.sleep(args.pause)
        report = mon.last_report
        threads = sum(len(w.threads) for w in report.workers) if report else 0
        print(f"cycle profile: {len(report.workers) if report else 0} workers, {threads} threads, "
              f"target --rate {args.rate:g}; {args.cycles} cycles {args.pause:g} s apart "
              f"(thread CPU, us per cycle, mean)")  # fmt: skip
        print(f"threads that ran, per cycle (mean)   {statistics.mean(changed):8.0f}")
        for label, _, _ in STAGES:
            print(f"{label:36s} {spent.get(label, 0) / args.cycles / 1e3:8.1f}")
        body = sum(totals) - sum(spent.values())
        print(f"{'the rest (loop, report)':36s} {body / args.cycles / 1e3:8.1f}")
        ordered = sorted(totals)
        print(f"{'cycle total p50 / p95':36s} {ordered[len(ordered) // 2] / 1e3:8.1f} / "
              f"{ordered[int(len(ordered) * 0.95)] / 1e3:.1f}")  # fmt: skip
        wakes = 3 if args.smoke else 10
        period = args.pause or 1.0
        for kind in ("sleep", "queue"):
            print(f"{'idle wake-up, ' + kind:36s} {wake_cost(kind, wakes, period):8.1f}")
        return 0
    finally:
        target.terminate()
        target.wait(10)


if __name__ == "__main__":
    sys.exit(main())
