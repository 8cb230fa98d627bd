"""What watching costs, side by side in one run: CPU of the sampler (including its py-spy
children) as a percentage of one core, against a real gunicorn app (gthread, 2 workers x 4
threads) under light traffic.

    python benchmarks/sampling_cost.py [--seconds 30]

Compared: a /proc-only scan of every thread each second (the floor), a naive loop that runs
`py-spy dump` on every worker each second, and the agent's own cycle. Also how long the target
workers were paused by --native dumps, which is what the app feels.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent import procfs
from agent.analysis import AnalysisSettings, Tracker
from agent.demo.run import Gunicorn, demo_world, get
from agent.discovery import Discovery
from agent.monitor import Monitor
from agent.pyspy import PySpy
from agent.signatures import load_catalog
from agent.types import WorkerRef


def cpu_seconds() -> float:
    """CPU of this process and its reaped children (py-spy runs as a child)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(name: str, seconds: float, step: Callable[[], None]) -> float:
    """Run step() once a second for `seconds`; print and return % of one core."""
    start_cpu, start = cpu_seconds(), time.monotonic()
    next_at = start
    while time.monotonic() - start < seconds:
        step()
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))
    used = cpu_seconds() - start_cpu
    percent = 100 * used / (time.monotonic() - start)
    print(f"{name:<34} {percent:7.3f} % of a core  ({used * 1000:.0f} ms CPU)", flush=True)
    return percent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, demo_world(Path(tmp)) as (_db, _hv, env):
        gunicorn = Gunicorn(Path(tmp), env)
        stop = threading.Event()
        try:
            gunicorn.wait_ready(workers=2)
            refs = [WorkerRef(pid, 0.0, gunicorn.pid) for pid in gunicorn.worker_pids()]

            def traffic() -> None:  # light traffic: a request every 200 ms
                while not stop.wait(0.2):
                    get(gunicorn.url + "/", timeout=5)

            threading.Thread(target=traffic, daemon=True).start()
            print(f"gunicorn gthread 2x4, pids {[r.pid for r in refs]}, {args.seconds:g}s each")

            def proc_scan() -> None:
                for ref in refs:
                    procfs.scan_worker(ref, now=time.time())

            spy = PySpy()

            def naive() -> None:
                for ref in refs:
                    spy.dump(ref, native=False)

            monitor = Monitor(
                workers=Discovery(master_pid=gunicorn.pid),
                stacks=spy,
                tracker=Tracker(load_catalog(), AnalysisSettings()),
                listeners=[],
            )
            # The traffic thread runs in this process too: measure it alone and subtract.
            base = measure("baseline (traffic thread only)", args.seconds, lambda: None)
            floor = measure("/proc scan of every thread, 1 Hz", args.seconds, proc_scan) - base
            naive_cost = measure("naive py-spy dump of each, 1 Hz", args.seconds, naive) - base
            agent_cost = measure("deadlock-agent cycle, 1 Hz", args.seconds, monitor.cycle) - base
            print(f"net of baseline: /proc {floor:.3f} %, naive {naive_cost:.3f} %, "
                  f"agent {agent_cost:.3f} % of a core")  # fmt: skip
            report = monitor.last_report
            assert report is not None
            print(f"agent samples: {dict(report.samples)}")
            print(f"agent / naive  = {agent_cost / naive_cost:.3f}")
            print(f"agent / floor  = {agent_cost / max(floor, 1e-3):.1f}")
        finally:
            stop.set()
            gunicorn.stop()
    print(f"(pid {os.getpid()}; figures vary with machine load: compare ratios, not values)")


if __name__ == "__main__":
    main()
