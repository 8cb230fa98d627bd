"""A synthetic gunicorn-shaped target for cost benchmarks: a master process with N worker
processes of T real threads each, shaped like gthread workers.

    python benchmarks/synthetic.py --workers 64 --threads 16 [--rate 2] [--churn 0]

Each worker has a main thread that heartbeats once a second from an asyncio event loop (the shape
of an asyncio worker's main thread; a gthread loop's is idle by rule just the same),
and the rest in a real ThreadPoolExecutor, as gthread's pool threads. A feeder thread submits
`--rate` tasks a second per worker; a task is ~1 ms of CPU, then the pool thread waits again at
the same point. `--churn S` replaces one worker every S seconds (SIGTERM, respawn), as
`--max-requests` does. It prints "ready <master pid>" once every worker runs, then serves until
SIGTERM (which ends the workers too).

SIGUSR1 to a worker hangs one of its pool threads for good, as a request stuck in a deadlock: a
task that acquires a plain `threading.Lock` twice, an untimed futex wait that never ends
(benchmarks/scale.py times how long the agent takes to call it stuck).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def _busy(seconds: float) -> None:
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def _hang() -> None:
    """Block forever on an untimed lock acquire: the second acquire of a non-reentrant lock."""
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()


def worker(threads: int, rate: float) -> None:
    """The worker process: a heartbeating main thread and a real ThreadPoolExecutor."""
    pool_size = threads - 1 - (rate > 0)
    pool = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="ThreadPoolExecutor-0")
    barrier = threading.Barrier(pool_size + 1)
    for _ in range(pool_size):  # start every pool thread now, not lazily
        pool.submit(barrier.wait)
    barrier.wait()
    # The handler runs in the main thread between its selects; submit only queues the task.
    signal.signal(signal.SIGUSR1, lambda *_: pool.submit(_hang))
    if rate > 0:  # the feeder stands in for gunicorn's accept loop handing out requests

        def feed() -> None:
            while True:
                time.sleep(1 / rate)
                pool.submit(_busy, 0.001)

        threading.Thread(target=feed, name="feeder", daemon=True).start()
    heartbeat = os.open(os.devnull, os.O_WRONLY)

    async def beat() -> None:
        while True:
            await asyncio.sleep(1.0)
            os.write(heartbeat, b".")

    asyncio.run(beat())  # an event loop in the main thread, as an asyncio worker's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.0, help="tasks a second per worker")
    parser.add_argument("--churn", type=float, default=0.0, help="replace a worker every S s")
    args = parser.parse_args()

    children: list[int] = []

    def spawn() -> int:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                worker(args.threads, args.rate)
            finally:
                os._exit(0)
        return pid

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    children = [spawn() for _ in range(args.workers)]
    print(f"ready {os.getpid()}", flush=True)
    victim = 0
    next_churn = time.monotonic() + args.churn
    while not stopping.is_set():
        stopping.wait(0.2)
        for i, pid in enumerate(children):  # reap and respawn the dead, as an arbiter does
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done and not stopping.is_set():
                children[i] = spawn()
        if args.churn and time.monotonic() >= next_churn:
            next_churn += args.churn
            victim = (victim + 1) % len(children)
            os.kill(children[victim], signal.SIGTERM)
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    sys.exit(0)


if __name__ == "__main__":
    main()
