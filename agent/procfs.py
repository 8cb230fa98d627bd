"""The /proc wrapper: a per-thread scan that costs microseconds, so it can run every second."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import struct
from collections.abc import Iterable
from pathlib import Path

from agent.errors import ProcessVanished, ProcReadError
from agent.locks import MUTEX_SIZE, MutexWait, mutex_futex
from agent.types import ProcSample, ThreadActivity, WorkerRef
from agent.versions import Versions, driver_dirs, mapped_files, parse_versions

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
# epoll waits: Python passes a fresh events buffer (and the count of registered fds) on every
# call, so only the epoll fd identifies the wait (measured: gunicorn's gthread loop under
# keep-alive traffic came back to its epoll_wait with another buffer each time).
_EPOLL = {"x86_64": (232, 281, 441), "aarch64": (22, 441)}
_RESTART = {"x86_64": 219, "aarch64": 128}
_MACHINE = os.uname().machine
# The names signatures may ask for (a role's `syscall`), by machine.
SYSCALL_NAMES: dict[str, dict[int, str]] = {
    "x86_64": {
        0: "read", 1: "write", 7: "poll", 17: "pread64", 19: "readv", 20: "writev",
        23: "select", 35: "nanosleep", 42: "connect", 43: "accept", 44: "sendto",
        45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 61: "wait4", 72: "fcntl", 73: "flock",
        202: "futex", 219: "restart_syscall", 230: "clock_nanosleep", 232: "epoll_wait",
        247: "waitid", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 288: "accept4",
        441: "epoll_pwait2",
    },
    "aarch64": {
        63: "read", 64: "write", 67: "pread64", 65: "readv", 66: "writev", 73: "ppoll",
        72: "pselect6", 101: "nanosleep", 203: "connect", 202: "accept", 206: "sendto",
        207: "recvfrom", 211: "sendmsg", 212: "recvmsg", 260: "wait4", 25: "fcntl",
        32: "flock", 98: "futex", 128: "restart_syscall", 115: "clock_nanosleep",
        22: "epoll_pwait", 95: "waitid", 242: "accept4", 441: "epoll_pwait2",
    },
}  # fmt: skip


#: Syscalls that write to an fd: a thread blocked in one on a full pipe or socket can have its
#: write cut short by a ptrace stop (py-spy's dump): ARCHITECTURE.md, "Side effects".
WRITE_SYSCALLS = frozenset({"write", "writev", "sendto", "sendmsg"})


def fd_kind(task_dir: str, syscall_text: str | None, name: str | None) -> str | None:
    """For a thread blocked in a write-family syscall: what its fd (the first argument) is,
    "pipe", "socket" or "other"; None for any other syscall or when it cannot be read."""
    if name not in WRITE_SYSCALLS or not syscall_text:
        return None
    fields = syscall_text.split()
    try:
        target = os.readlink(f"{task_dir}/fd/{int(fields[1], 16)}")
    except (OSError, ValueError, IndexError):
        return None
    if target.startswith("pipe:"):
        return "pipe"
    return "socket" if target.startswith("socket:") else "other"


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


def syscall_name(number: int | None, machine: str = _MACHINE) -> str | None:
    """The name of a syscall number on this machine, when signatures may ask for it."""
    return None if number is None else SYSCALL_NAMES.get(machine, {}).get(number)


def parse_syscall(text: str, machine: str = _MACHINE) -> tuple[int | None, str | None, bool]:
    """Return (syscall number, blocking point, timed wait) from a syscall file; (None, None,
    False) when the thread is running or blocked outside a syscall.

    The blocking point is the first three arguments and the stack and instruction pointers:
    what identifies the call site. Left out: the number, which becomes restart_syscall after a
    ptrace stop, and the other argument registers, which hold leftovers that change between
    calls at the same site (measured: psycopg 3's poll slices). An epoll wait is identified by
    its epoll fd and pc alone: Python passes a fresh events buffer each call, and asyncio's
    loop reaches its select at two stack depths in turn (sp 0x60 apart, measured); a thread
    waiting on that epoll fd is that loop's thread, waiting in it."""
    fields = text.split()
    # "running" while on CPU, "-1 sp pc" when blocked outside a syscall.
    if not fields or fields[0] == "running" or fields[0].startswith("-"):
        return None, None, False
    try:
        number = int(fields[0])
        args = fields[1:7]
        if len(fields) < 9:
            point = None
        elif number in _EPOLL.get(machine, ()):
            point = f"{args[0]} {fields[8]}"
        else:
            point = " ".join([*args[:3], *fields[7:9]])
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
    name = syscall_name(number)
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
        syscall_name=name,
        fd_kind=fd_kind(task_dir, syscall_text, name),
    )


class _Task:
    """One thread the Scanner keeps an eye on: its schedstat file held open."""

    __slots__ = ("activity", "fd", "path", "raw", "syscall", "syscall_fd", "syscall_raw")

    def __init__(self, path: str, fd: int | None, activity: ThreadActivity) -> None:
        self.path = path  # .../task/TID
        self.fd = fd  # schedstat, open; None past the fd budget (then open-read-close)
        self.syscall_fd: int | None = None  # syscall, opened when it first runs
        self.raw = b""  # schedstat's bytes at the last look
        self.syscall_raw: bytes | None = None  # syscall's bytes at the last look, and parsed:
        # (number, blocking point, timed, running, name, fd kind of a blocked write)
        self.syscall: tuple[int | None, str | None, bool, bool, str | None, str | None] = (
            None, None, False, False, None, None,
        )  # fmt: skip
        self.activity = activity


class _Watched:
    """One worker the Scanner keeps an eye on."""

    __slots__ = ("stat_fd", "tasks", "tids")

    def __init__(self, stat_fd: int) -> None:
        self.stat_fd = stat_fd  # /proc/PID/stat, open: its num_threads says when to relist
        self.tasks: dict[int, _Task] = {}
        self.tids: frozenset[int] = frozenset()


class Scanner:
    """Scans workers' threads, cheaply enough for a thousand threads a second.

    schedstat gives on-CPU time in nanoseconds, which tells a blocked thread (0 between scans)
    from a busy one (about a millisecond per request) where clock ticks (10 ms) cannot. Each
    thread's schedstat stays open and is re-read with one pread (about 1 us, fresh every time);
    a thread whose schedstat bytes did not change has not run, so nothing else is read or built
    for it, and the sample carries only the threads that changed. The task list is re-read only
    when the worker's thread count changes or a thread vanishes. Without schedstat (a kernel
    without CONFIG_SCHED_INFO) it falls back to reading every thread's stat and status, says so
    once in the log, and reports the coarser resolution in every ProcSample."""

    def __init__(self, proc: str = DEFAULT_PROC, *, max_fds: int | None = None) -> None:
        self.proc = proc
        self.precise = True
        self._watched: dict[WorkerRef, _Watched] = {}
        self._open_fds = 0
        self._retained: object = None
        self.max_fds = fd_budget() if max_fds is None else max_fds

    # --- lifecycle --------------------------------------------------------------------------

    def retain(self, workers: Iterable[WorkerRef]) -> None:
        """Close what is held open for workers no longer watched."""
        if isinstance(workers, tuple) and workers is self._retained:
            return  # discovery's cached tuple again: nothing came or went
        keep = set(workers)
        for worker in [w for w in self._watched if w not in keep]:
            self.forget(worker)
        self._retained = workers if isinstance(workers, tuple) else None

    def forget(self, worker: WorkerRef) -> None:
        """Close every fd held for a worker."""
        self._retained = None
        watched = self._watched.pop(worker, None)
        if watched is None:
            return
        self._close(watched.stat_fd)
        for task in watched.tasks.values():
            self._close_task(task)

    def close(self) -> None:
        """Close everything (the agent is stopping)."""
        self.retain(())

    @property
    def open_fds(self) -> int:
        """How many /proc files are held open right now."""
        return self._open_fds

    def _open(self, path: str) -> int | None:
        if self._open_fds >= self.max_fds:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                self.max_fds = self._open_fds  # the limit is lower than we thought
                return None
            raise
        self._open_fds += 1
        return fd

    def _close_task(self, task: _Task) -> None:
        for fd in (task.fd, task.syscall_fd):
            if fd is not None:
                self._close(fd)

    def _close(self, fd: int) -> None:
        self._open_fds -= 1
        with contextlib.suppress(OSError):
            os.close(fd)

    # --- scanning ---------------------------------------------------------------------------

    def scan(self, worker: WorkerRef, *, now: float) -> ProcSample:
        """The threads of a worker that changed since its last scan (all of them the first
        time), and the set of its live threads."""
        if not self.precise:
            return scan_worker(worker, now=now, proc=self.proc, precise=False)
        try:
            return self._scan(worker, now)
        except SchedstatMissing:
            self.forget(worker)
            self.precise = False
            log.warning(
                "%s/*/task/*/schedstat is missing (kernel without CONFIG_SCHED_INFO): progress "
                "is measured in clock ticks, which cannot see a thread that uses under 10 ms of "
                "CPU per request; busy threads may be called stuck. Raise --stuck-after.",
                self.proc,
            )
            return scan_worker(worker, now=now, proc=self.proc, precise=False)

    def _scan(self, worker: WorkerRef, now: float) -> ProcSample:
        base = f"{self.proc}/{worker.pid}"
        watched = self._watched.get(worker)
        if watched is None:
            try:
                fd = self._open(f"{base}/stat")
            except FileNotFoundError as err:
                raise ProcessVanished("worker exited", pid=worker.pid) from err
            except OSError as err:
                raise ProcReadError(f"cannot open {base}/stat: {err}", pid=worker.pid) from err
            if fd is None:  # no fd to spare: read the slow way
                return scan_worker(worker, now=now, proc=self.proc)
            watched = self._watched[worker] = _Watched(fd)
            count = -1
        else:
            try:
                count = _num_threads(os.pread(watched.stat_fd, 1024, 0))
            except (OSError, ValueError, IndexError) as err:
                self.forget(worker)
                raise ProcessVanished("worker exited", pid=worker.pid) from err
        changed: list[ThreadActivity] = []
        if count != len(watched.tasks):
            self._relist(worker, watched, changed)
        gone = False
        for tid, task in watched.tasks.items():
            try:
                if task.fd is not None:
                    raw = os.pread(task.fd, 128, 0)
                else:
                    with open(f"{task.path}/schedstat", "rb") as handle:
                        raw = handle.read()
            except OSError:
                gone = True  # ESRCH: the thread exited; the relist below drops it
                continue
            if raw == task.raw:
                continue  # it has not run: nothing else to read or build
            task.raw = raw
            task.activity = self._activity(tid, task, raw)
            changed.append(task.activity)
        if gone:
            self._relist(worker, watched, changed)
        return ProcSample(
            worker=worker, taken_at=now, threads=tuple(changed), tids=watched.tids
        )

    def _relist(self, worker: WorkerRef, watched: _Watched, changed: list[ThreadActivity]) -> None:
        tasks_dir = f"{self.proc}/{worker.pid}/task"
        try:
            tids = {int(name) for name in os.listdir(tasks_dir) if name.isdigit()}
        except FileNotFoundError as err:
            self.forget(worker)
            raise ProcessVanished("worker exited", pid=worker.pid) from err
        except OSError as err:
            raise ProcReadError(f"cannot list {tasks_dir}: {err}", pid=worker.pid) from err
        for tid in [t for t in watched.tasks if t not in tids]:
            self._close_task(watched.tasks.pop(tid))
        seen = {a.tid for a in changed}
        for tid in sorted(tids - set(watched.tasks)):
            path = f"{tasks_dir}/{tid}"
            try:
                comm, _state, _ticks, start = parse_stat(_read(f"{path}/stat"))
                fd = self._open(f"{path}/schedstat")
                raw = os.pread(fd, 128, 0) if fd is not None else _read_bytes(f"{path}/schedstat")
            except FileNotFoundError:
                if os.path.isdir(path):
                    raise SchedstatMissing from None  # the kernel lacks CONFIG_SCHED_INFO
                continue  # the thread ended between listdir and read: normal
            except ProcessLookupError:
                continue
            except (OSError, ValueError, IndexError) as err:
                raise ProcReadError(f"cannot read thread {tid}: {err}", pid=worker.pid) from err
            placeholder = ThreadActivity(tid, start, comm, "S", 0, 0, None, None)
            task = _Task(path, fd, placeholder)
            task.raw = raw
            task.activity = self._activity(tid, task, raw)
            watched.tasks[tid] = task
            if tid not in seen:
                changed.append(task.activity)
        if not watched.tasks:
            self.forget(worker)
            raise ProcessVanished("worker exited", pid=worker.pid)
        watched.tids = frozenset(watched.tasks)

    def _activity(self, tid: int, task: _Task, raw: bytes) -> ThreadActivity:
        cpu_ns, runs = parse_schedstat(raw.decode("ascii"))
        # Only for a thread that ran: where it blocks now ("running": on a CPU). The file needs
        # ptrace access; without it the thread is judged on schedstat alone. A thread back at
        # the same point (a pool thread on its work queue) reads the same bytes: parsed once.
        syscall_raw = self._read_syscall(task)
        if syscall_raw != task.syscall_raw:
            text = syscall_raw.decode("ascii", "replace") if syscall_raw is not None else None
            task.syscall_raw = syscall_raw
            number, point, timed = parse_syscall(text) if text else (None, None, False)
            name = syscall_name(number)
            if number == _RESTART.get(_MACHINE) and point == task.syscall[1]:
                name = task.syscall[4]  # after a ptrace stop: the wait it resumes
            running = text is not None and text.startswith("running")
            kind = fd_kind(task.path, text, name) if not running else None
            task.syscall = (number, point, timed, running, name, kind)
        number, blocked_at, timed, running, name, kind = task.syscall
        old = task.activity
        return ThreadActivity(
            tid=tid, start_ticks=old.start_ticks, comm=old.comm, state="R" if running else "S",
            cpu_ns=cpu_ns, runs=runs, syscall=number, wchan=None, blocked_at=blocked_at,
            timed_wait=timed, syscall_name=name, fd_kind=kind,
        )  # fmt: skip

    def _read_syscall(self, task: _Task) -> bytes | None:
        try:
            if task.syscall_fd is None:
                task.syscall_fd = self._open(f"{task.path}/syscall")
                if task.syscall_fd is None:  # past the fd budget
                    return _read_bytes(f"{task.path}/syscall")
            return os.pread(task.syscall_fd, 256, 0)
        except OSError:
            return None


def _num_threads(stat: bytes) -> int:
    """Field 20 of /proc/PID/stat."""
    return int(stat[stat.rindex(b")") + 2 :].split()[17])


def _read_bytes(path: str) -> bytes:
    """A small /proc file's bytes: one open, read and close (no buffered file object)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 4096)]
        while len(chunks[-1]) == 4096:  # a master with hundreds of children
            chunks.append(os.read(fd, 4096))
        return b"".join(chunks)
    finally:
        os.close(fd)


def fd_budget(reserve: int = 256) -> int:
    """How many /proc files the Scanner may hold open: the soft RLIMIT_NOFILE, raised to the hard
    limit first (it is often 1024 soft), less a reserve for sockets, logs and py-spy's pipes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(0, soft - reserve)


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
    return ProcSample(
        worker=worker, taken_at=now, threads=tuple(threads), resolution_ns=resolution,
        tids=frozenset(t.tid for t in threads),
    )  # fmt: skip


def children(pid: int, *, proc: str = DEFAULT_PROC) -> list[int] | None:
    """Child pids of a process from /proc/PID/task/*/children, or None where the kernel lacks
    it (CONFIG_PROC_CHILDREN). One small read instead of psutil's scan of every process."""
    found: list[int] = []
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
        for tid in tids:
            try:
                found.extend(map(int, _read_bytes(f"{proc}/{pid}/task/{tid}/children").split()))
            except FileNotFoundError:
                if not os.path.exists(f"{proc}/{pid}/task/{tid}"):
                    continue  # that thread ended: normal
                return None  # the file itself is missing: no kernel support
    except FileNotFoundError:
        return []  # the process is gone
    except (OSError, ValueError):
        return None
    return sorted(found)


# --- native mutexes (agent/locks.py judges what is read here) --------------------------------

# glibc's LP64 pthread_mutex_t head: __lock, __count, __owner, __nusers, __kind (locks.py).
_MUTEX = struct.Struct("<iIiIi")


def read_mutex(
    pid: int, address: int, *, proc: str = DEFAULT_PROC
) -> tuple[int, int, int, int, int] | None:
    """(lock word, count, owner, nusers, kind) of the glibc mutex at `address` in the process,
    read through /proc/PID/mem; None when unreadable (gone, unmapped, or no ptrace access:
    like py-spy and the syscall file, reading it takes the right to ptrace the process)."""
    try:
        fd = os.open(f"{proc}/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _pread_mutex(fd, address)
    finally:
        os.close(fd)


def _pread_mutex(fd: int, address: int) -> tuple[int, int, int, int, int] | None:
    try:
        raw = os.pread(fd, MUTEX_SIZE, address)  # EIO where nothing is mapped
    except (OSError, OverflowError):
        return None
    if len(raw) < MUTEX_SIZE:
        return None
    lock_word, count, owner, nusers, kind = _MUTEX.unpack(raw)
    return lock_word, count, owner, nusers, kind


def mutex_waits(
    pid: int, tids: Iterable[int], *, proc: str = DEFAULT_PROC, machine: str = _MACHINE
) -> list[MutexWait]:
    """The threads among `tids` blocked in glibc's mutex wait, each with its mutex as read from
    memory (one read per mutex). A thread that exited, a syscall file or a mutex that cannot be
    read (no ptrace access) is left out."""
    waiting: list[tuple[int, int]] = []
    for tid in tids:
        raw = _read_optional_bytes(f"{proc}/{pid}/task/{tid}/syscall")
        address = mutex_futex(raw.decode("ascii", "replace"), machine) if raw else None
        if address is not None:
            waiting.append((tid, address))
    if not waiting:
        return []
    try:
        fd = os.open(f"{proc}/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        mutexes = {address: _pread_mutex(fd, address) for address in {a for _, a in waiting}}
    finally:
        os.close(fd)
    found = []
    for tid, address in waiting:
        fields = mutexes[address]
        if fields is not None:
            lock_word, count, owner, nusers, kind = fields
            found.append(MutexWait(tid, address, lock_word, owner, kind, count, nusers))
    return found


def alive_elsewhere(pid: int, tids: Iterable[int], *, proc: str = DEFAULT_PROC) -> frozenset[int]:
    """Those of `tids` (mutex owners that are not threads of the process) that are alive in
    another process, other than its parent: the owner of a mutex inherited across fork lives
    on in the parent, but an owner anywhere else means the memory is no mutex of this process."""
    try:
        parent = int(_read(f"{proc}/{pid}/stat").rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        parent = None
    alive = set()
    for tid in tids:
        status = _read_optional(f"{proc}/{tid}/status")  # /proc/TID: any thread, unlisted
        if status is None:
            continue  # no such thread: gone
        tgid = [line.split()[1:2] for line in status.splitlines() if line.startswith("Tgid:")]
        if tgid != [[str(parent)]]:
            alive.add(tid)
    return frozenset(alive)


def read_lock_waits(
    pid: int, *, proc: str = DEFAULT_PROC, machine: str = _MACHINE
) -> tuple[tuple[MutexWait, ...], frozenset[int], frozenset[int]]:
    """What locks.prove() needs for one process: its mutex waits, its live tids, and the
    owners alive elsewhere (see alive_elsewhere).

    The waits are read twice, around the task listing, and only a wait that read the same both
    times is kept: an owner that unlocked and exited between the first read and the listing
    would otherwise look like an orphan. A real deadlock reads the same forever."""
    first = mutex_waits(pid, _tids(pid, proc), proc=proc, machine=machine)
    live = frozenset(_tids(pid, proc))
    if not first:
        return (), live, frozenset()
    again = set(mutex_waits(pid, (w.tid for w in first), proc=proc, machine=machine))
    waits = tuple(w for w in first if w in again)
    owners = {w.owner for w in waits if w.owner not in live}
    return waits, live, alive_elsewhere(pid, owners, proc=proc)


def _tids(pid: int, proc: str) -> list[int]:
    tasks = f"{proc}/{pid}/task"
    try:
        return sorted(int(name) for name in os.listdir(tasks) if name.isdigit())
    except FileNotFoundError as err:
        raise ProcessVanished("process exited", pid=pid) from err
    except OSError as err:
        raise ProcReadError(f"cannot list {tasks}: {err}", pid=pid) from err


def _read_optional_bytes(path: str) -> bytes | None:
    try:
        return _read_bytes(path)
    except OSError:
        return None


def read_maps(pid: int, *, proc: str = DEFAULT_PROC) -> str:
    """The text of /proc/PID/maps: what files the process maps (needs ptrace-read access)."""
    try:
        return _read(f"{proc}/{pid}/maps")
    except FileNotFoundError as err:
        raise ProcessVanished("process exited", pid=pid) from err
    except OSError as err:
        raise ProcReadError(f"cannot read {proc}/{pid}/maps: {err}", pid=pid) from err


def list_dir_of(pid: int, directory: str, *, proc: str = DEFAULT_PROC) -> list[str] | None:
    """The names in `directory` as the process sees its filesystem (through /proc/PID/root, so
    a container's own site-packages); None when it cannot be listed."""
    try:
        return os.listdir(f"{proc}/{pid}/root{directory}")
    except OSError:
        return None


def read_cmdline(pid: int, *, proc: str = DEFAULT_PROC) -> tuple[tuple[str, ...], int]:
    """(command line, parent pid) of a process; ProcessVanished when there is no such process."""
    try:
        raw = _read_bytes(f"{proc}/{pid}/cmdline")
        stat = _read(f"{proc}/{pid}/stat")
    except FileNotFoundError as err:
        raise ProcessVanished("no such process", pid=pid) from err
    except OSError as err:
        raise ProcReadError(f"cannot read {proc}/{pid}: {err}", pid=pid) from err
    args = tuple(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)
    return args, int(stat.rsplit(")", 1)[1].split()[1])


def read_versions(pid: int, *, proc: str = DEFAULT_PROC) -> Versions | None:
    """What the process maps (libpq, OpenSSL, psycopg, CPython) as versions, with the driver
    versions from their site-packages listings; None when its maps cannot be read."""
    try:
        files = mapped_files(read_maps(pid, proc=proc))
    except (ProcessVanished, ProcReadError):
        return None
    listings = {}
    for directory in driver_dirs(files).values():
        names = list_dir_of(pid, directory, proc=proc)
        if names is not None:
            listings[directory] = names
    return parse_versions(files, listings)
