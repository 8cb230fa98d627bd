"""The /proc wrapper: a per-thread scan that costs microseconds, so it can run every second."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agent.errors import ProcessVanished, ProcReadError
from agent.types import ProcSample, ThreadActivity, WorkerRef

log = logging.getLogger(__name__)

DEFAULT_PROC = "/proc"


def parse_stat(text: str) -> tuple[str, str, int, int]:
    """Return (comm, state, utime+stime, starttime) from a /proc/PID/task/TID/stat line."""
    # comm sits in parentheses and may itself contain spaces and ")": split at the last one.
    open_at = text.index("(")
    close_at = text.rindex(")")
    comm = text[open_at + 1 : close_at]
    rest = text[close_at + 2 :].split()
    # rest[0] is field 3 (state); utime, stime are fields 14, 15; starttime is field 22.
    return comm, rest[0], int(rest[11]) + int(rest[12]), int(rest[19])


def parse_ctx_switches(status: str) -> int:
    """Return voluntary + nonvoluntary context switches from a status file."""
    total = 0
    for line in status.splitlines():
        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
            total += int(line.split(":", 1)[1])
    return total


def parse_syscall(text: str) -> int | None:
    """Return the syscall number a blocked thread sits in, or None when running/unknown."""
    first = text.split(" ", 1)[0].strip()
    # "running" while on CPU, "-1 ..." when blocked outside a syscall.
    if not first or first == "running" or first.startswith("-"):
        return None
    try:
        return int(first)
    except ValueError:
        return None


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as handle:
        return handle.read()


def _read_optional(path: str) -> str | None:
    # syscall needs ptrace access and wchan may be hidden; neither is required.
    try:
        return _read(path)
    except OSError:
        return None


def scan_thread(task_dir: str, tid: int) -> ThreadActivity:
    """Read one thread's activity; raises FileNotFoundError/ProcessLookupError if it is gone."""
    comm, state, cpu_ticks, start_ticks = parse_stat(_read(f"{task_dir}/stat"))
    ctx = parse_ctx_switches(_read(f"{task_dir}/status"))
    syscall_text = _read_optional(f"{task_dir}/syscall")
    wchan = _read_optional(f"{task_dir}/wchan")
    return ThreadActivity(
        tid=tid,
        start_ticks=start_ticks,
        comm=comm,
        state=state,
        cpu_ticks=cpu_ticks,
        ctx_switches=ctx,
        syscall=parse_syscall(syscall_text) if syscall_text is not None else None,
        wchan=(wchan.strip() or None) if wchan is not None and wchan.strip() != "0" else None,
    )


def scan_worker(worker: WorkerRef, *, now: float, proc: str = DEFAULT_PROC) -> ProcSample:
    """Scan every thread of a worker; a thread exiting mid-scan is skipped, not an error."""
    tasks = f"{proc}/{worker.pid}/task"
    try:
        tids = sorted(int(name) for name in os.listdir(tasks) if name.isdigit())
    except FileNotFoundError as err:
        raise ProcessVanished("worker exited", pid=worker.pid) from err
    except OSError as err:
        raise ProcReadError(f"cannot list {tasks}: {err}", pid=worker.pid) from err
    threads = []
    for tid in tids:
        try:
            threads.append(scan_thread(f"{tasks}/{tid}", tid))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listdir and read: normal
        except (OSError, ValueError, IndexError) as err:
            raise ProcReadError(f"cannot read thread {tid}: {err}", pid=worker.pid) from err
    if not threads and not Path(tasks).exists():
        raise ProcessVanished("worker exited", pid=worker.pid)
    return ProcSample(worker=worker, taken_at=now, threads=tuple(threads))


def children(pid: int, *, proc: str = DEFAULT_PROC) -> list[int] | None:
    """Child pids of a process from /proc/PID/task/*/children, or None where the kernel lacks
    it (CONFIG_PROC_CHILDREN). One small read instead of psutil's scan of every process."""
    found: list[int] = []
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
        for tid in tids:
            try:
                found.extend(int(c) for c in _read(f"{proc}/{pid}/task/{tid}/children").split())
            except FileNotFoundError:
                if not os.path.exists(f"{proc}/{pid}/task/{tid}"):
                    continue  # that thread ended: normal
                return None  # the file itself is missing: no kernel support
    except FileNotFoundError:
        return []  # the process is gone
    except (OSError, ValueError):
        return None
    return sorted(found)
