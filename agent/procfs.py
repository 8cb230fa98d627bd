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


def parse_schedstat(text: str) -> tuple[int, int]:
    """Return (on-CPU ns, times scheduled) from a /proc/PID/task/TID/schedstat line."""
    on_cpu, _wait, slices = text.split()[:3]
    return int(on_cpu), int(slices)


# Syscalls that wait for something with a deadline of their own, by machine (x86_64, aarch64):
# a thread polling in slices (psycopg 3: poll(fd, 1, 100)) wakes ~10 times a second at the same
# point in one of these. restart_syscall is a timed wait resumed after a ptrace stop.
_POLL_FAMILY = {
    "x86_64": {7: 2, 271: 2, 23: 4, 270: 4, 232: 3, 281: 3, 441: 3},  # nr -> timeout arg index
    "aarch64": {73: 2, 72: 4, 22: 3, 441: 3},
}
_FUTEX = {"x86_64": 202, "aarch64": 98}
_RESTART = {"x86_64": 219, "aarch64": 128}
_MACHINE = os.uname().machine


def timed_wait(number: int, args: list[str], machine: str = _MACHINE) -> bool:
    """Whether a blocking syscall waits with a timeout (not a sleep, not an untimed wait)."""
    if number == _RESTART.get(machine):
        return True
    timeout_arg = _POLL_FAMILY.get(machine, {}).get(number)
    if timeout_arg is not None:
        value = int(args[timeout_arg], 16) if len(args) > timeout_arg else 0
        if number in (7, 73, 232, 281):  # an int in milliseconds: -1 is "forever"
            return value not in (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
        return value != 0  # a pointer to the timeout: NULL is "forever"
    if number == _FUTEX.get(machine):
        return len(args) > 3 and int(args[3], 16) != 0  # the timeout pointer
    return False


def parse_syscall(text: str, machine: str = _MACHINE) -> tuple[int | None, str | None, bool]:
    """Return (syscall number, blocking point, timed wait) from a syscall file; (None, None,
    False) when the thread is running or blocked outside a syscall.

    The blocking point is the first three arguments and the stack and instruction pointers:
    what identifies the call site. Left out: the number, which becomes restart_syscall after a
    ptrace stop, and the other argument registers, which hold leftovers that change between
    calls at the same site (measured: psycopg 3's poll slices)."""
    fields = text.split()
    # "running" while on CPU, "-1 sp pc" when blocked outside a syscall.
    if not fields or fields[0] == "running" or fields[0].startswith("-"):
        return None, None, False
    try:
        number = int(fields[0])
        args = fields[1:7]
        point = " ".join([*args[:3], *fields[7:9]]) if len(fields) >= 9 else None
        return number, point, point is not None and timed_wait(number, args, machine)
    except ValueError:
        return None, None, False


#: Nanoseconds per clock tick, for the fallback when schedstat is missing.
NS_PER_TICK = 1_000_000_000 // (os.sysconf("SC_CLK_TCK") or 100)


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as handle:
        return handle.read()


def _read_optional(path: str) -> str | None:
    # syscall needs ptrace access and wchan may be hidden; neither is required.
    try:
        return _read(path)
    except OSError:
        return None


class SchedstatMissing(Exception):
    """This kernel has no /proc/.../schedstat: fall back to clock ticks."""


def scan_thread(task_dir: str, tid: int, *, precise: bool = True) -> ThreadActivity:
    """Read one thread's activity; raises FileNotFoundError/ProcessLookupError if it is gone,
    and SchedstatMissing when `precise` but the kernel has no schedstat."""
    comm, state, cpu_ticks, start_ticks = parse_stat(_read(f"{task_dir}/stat"))
    if precise:
        try:
            cpu_ns, runs = parse_schedstat(_read(f"{task_dir}/schedstat"))
        except FileNotFoundError:
            if os.path.isdir(task_dir):
                raise SchedstatMissing from None  # the kernel lacks CONFIG_SCHED_INFO
            raise
    else:
        cpu_ns = cpu_ticks * NS_PER_TICK
        runs = parse_ctx_switches(_read(f"{task_dir}/status"))
    syscall_text = _read_optional(f"{task_dir}/syscall")
    wchan = _read_optional(f"{task_dir}/wchan")
    number, blocked_at, timed = parse_syscall(syscall_text) if syscall_text else (None, None, False)
    return ThreadActivity(
        tid=tid,
        start_ticks=start_ticks,
        comm=comm,
        state=state,
        cpu_ns=cpu_ns,
        runs=runs,
        syscall=number,
        wchan=(wchan.strip() or None) if wchan is not None and wchan.strip() != "0" else None,
        blocked_at=blocked_at,
        timed_wait=timed,
    )


class Scanner:
    """Scans workers' threads; remembers whether this kernel has schedstat.

    schedstat gives on-CPU time in nanoseconds, which tells a blocked thread (0 to a few tens of
    microseconds between scans) from a busy one (about a millisecond per request) where clock
    ticks (10 ms) cannot. Without it the scan falls back to ticks, says so once in the log, and
    reports the coarser resolution in every ProcSample (exported as a metric)."""

    def __init__(self, proc: str = DEFAULT_PROC) -> None:
        self.proc = proc
        self.precise = True

    def scan(self, worker: WorkerRef, *, now: float) -> ProcSample:
        """Scan every thread of a worker (see scan_worker)."""
        try:
            return scan_worker(worker, now=now, proc=self.proc, precise=self.precise)
        except SchedstatMissing:
            self.precise = False
            log.warning(
                "%s/*/task/*/schedstat is missing (kernel without CONFIG_SCHED_INFO): progress "
                "is measured in clock ticks, which cannot see a thread that uses under 10 ms of "
                "CPU per request; busy threads may be called stuck. Raise --stuck-after.",
                self.proc,
            )
            return scan_worker(worker, now=now, proc=self.proc, precise=False)


def scan_worker(
    worker: WorkerRef, *, now: float, proc: str = DEFAULT_PROC, precise: bool = True
) -> ProcSample:
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
            threads.append(scan_thread(f"{tasks}/{tid}", tid, precise=precise))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listdir and read: normal
        except (OSError, ValueError, IndexError) as err:
            raise ProcReadError(f"cannot read thread {tid}: {err}", pid=worker.pid) from err
    if not threads and not Path(tasks).exists():
        raise ProcessVanished("worker exited", pid=worker.pid)
    resolution = 1 if precise else NS_PER_TICK
    return ProcSample(worker=worker, taken_at=now, threads=tuple(threads), resolution_ns=resolution)


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
