"""The psutil wrapper: find Gunicorn masters and their workers, as (pid, create_time) pairs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent import procfs
from agent.errors import ConfigError
from agent.types import WorkerRef

log = logging.getLogger(__name__)


def is_gunicorn_cmdline(cmdline: Sequence[str]) -> bool:
    """Whether a command line runs gunicorn: `gunicorn ...`, `python -m gunicorn ...`,
    `python /venv/bin/gunicorn ...`, or a setproctitle'd "gunicorn: master [app]"."""
    if not cmdline:
        return False
    if cmdline[0].startswith("gunicorn:"):
        return True
    # Only the launcher part (interpreter, wrapper, script) is looked at, not the app's flags.
    head = cmdline[:4]
    for i, arg in enumerate(head):
        if os.path.basename(arg) in ("gunicorn", "gunicorn3"):
            return True
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] == "gunicorn":
            return True
    return False


@dataclass(frozen=True)
class ProcInfo:
    """What discovery needs of one process (kept small so tests can build trees)."""

    pid: int
    ppid: int
    create_time: float
    cmdline: tuple[str, ...]


def find_masters(processes: Iterable[ProcInfo]) -> list[int]:
    """Pure: the gunicorn masters among processes.

    Top-down from each gunicorn process whose parent is not one: step into its only gunicorn
    child while that child runs a different command line (a wrapper such as `timeout 3600
    gunicorn ...` that did not exec). Workers are forks of the master with its very command
    line, so a worker that forks children of its own is never taken for a master."""
    procs = {p.pid: p for p in processes}
    gunicorn = {pid for pid, p in procs.items() if is_gunicorn_cmdline(p.cmdline)}
    children: dict[int, list[int]] = {}
    for pid in sorted(gunicorn):
        children.setdefault(procs[pid].ppid, []).append(pid)
    masters = []
    for root in sorted(pid for pid in gunicorn if procs[pid].ppid not in gunicorn):
        pid = root
        while not _titled(procs[pid], "master"):
            kids = children.get(pid, [])
            if len(kids) != 1:
                break
            kid = procs[kids[0]]
            if kid.cmdline == procs[pid].cmdline or _titled(kid, "worker"):
                break
            pid = kid.pid
        if children.get(pid) or _titled(procs[pid], "master"):
            masters.append(pid)
    return masters


def _is_worker(
    cmdline: tuple[str, ...], exe: str | None, master: tuple[str, ...], master_exe: str | None
) -> bool:
    """Whether a child of the master is worth watching as a worker: a fork of the master (its
    very command line, or a setproctitle'd "gunicorn: worker [app]"), or any child running the
    master's own executable (its interpreter: py-spy can read it). A child running another
    program (`sleep`, a shell, a Node helper a server hook spawned) is not; nor is a zombie (no
    command line). Unknown executables (access denied) count as workers: py-spy will say."""
    if not cmdline:
        return False
    if cmdline == master or cmdline[0].startswith("gunicorn: worker") or (
        cmdline[0].startswith("gunicorn:") and len(cmdline) > 1 and cmdline[1] == "worker"
    ):
        return True
    return exe is None or master_exe is None or exe == master_exe


def _exe(proc: psutil.Process) -> str | None:
    """The process's executable, None when it cannot be read (another uid, gone mid-read)."""
    try:
        return proc.exe() or None
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _titled(proc: ProcInfo, role: str) -> bool:
    # gunicorn renames its processes "gunicorn: master [app]" when setproctitle is installed.
    return bool(proc.cmdline) and proc.cmdline[0].startswith(f"gunicorn: {role}")


#: How far apart two readings of one process's start time may be: psutil derives it from the
#: boot time, which the kernel moves when the clock is stepped (NTP); a pid reused by another
#: process within a second of the old one's start is not a case worth a false "alive".
SAME_START = 1.0


def running(worker: WorkerRef, *, proc_root: str = procfs.DEFAULT_PROC) -> bool:
    """Whether the worker still runs: its pid alive, not a zombie or exiting, and the same
    process (same start time: pids are reused). Unknown (access denied) counts as running."""
    try:
        proc = psutil.Process(worker.pid)
        with proc.oneshot():
            if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return False
            if abs(proc.create_time() - worker.create_time) >= SAME_START:
                return False
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    # An exiting process has released its memory, and with it /proc/PID/exe, before it is a
    # zombie: py-spy says "No such file or directory" about it then (measured under
    # --max-requests churn), and so does this link. A live worker's link reads.
    try:
        Path(f"{proc_root}/{worker.pid}/exe").readlink()
    except FileNotFoundError:
        return False
    except OSError:
        pass  # EACCES: another uid without ptrace rights; cannot tell
    return True


def read_pidfile(path: str) -> int:
    """The master pid written by `gunicorn --pid PATH`."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
        pid = int(text)
    except OSError as err:
        raise ConfigError(f"cannot read pidfile {path}: {err.strerror}") from err
    except ValueError as err:
        raise ConfigError(f"pidfile {path} does not hold a pid") from err
    if pid <= 0:
        raise ConfigError(f"pidfile {path} holds an invalid pid {pid}")
    return pid


class Discovery:
    """Finds masters (pinned or by command line) and lists their workers.

    Workers are re-listed every `relist_every` cycles, and every cycle for a few cycles after
    one was reported gone (forget): a respawn is found within a cycle or two, and a quiet
    cycle reads no process table at all. Masters found by command line are re-scanned every
    `rescan_every` listings."""

    def __init__(
        self,
        *,
        master_pid: int | None = None,
        pidfile: str | None = None,
        rescan_every: int = 10,
        relist_every: int = 5,
    ) -> None:
        self.master_pid = master_pid
        self.pidfile = pidfile
        self.rescan_every = rescan_every
        self.relist_every = relist_every
        self._calls = 0
        self._eager = 0  # cycles left to re-list every time (a worker just went)
        self._last: tuple[tuple[int, ...], tuple[WorkerRef, ...]] | None = None
        self._masters: list[psutil.Process] = []
        self._cycles = 0
        self._refs: dict[int, WorkerRef] = {}
        # Children of a master that are no gunicorn worker (a helper a server hook or the app
        # spawned): pid -> start time, so each is looked at once. Pruned to the live children
        # at each listing, like _refs: under churn neither may keep a dead pid.
        self._others: dict[int, float] = {}
        self._missing: str | None = None  # why no master was found, as last logged
        self._rescans = 0  # listings left that re-scan for masters (one just went)

    def _pinned(self) -> int | None:
        if self.pidfile is not None:
            try:
                return read_pidfile(self.pidfile)
            except ConfigError as err:
                self._say_missing(f"{err}; gunicorn may be (re)starting")
                return None
        return self.master_pid

    def _scan(self) -> list[psutil.Process]:
        pinned = self._pinned()
        if pinned is not None or self.pidfile is not None:
            if pinned is None:
                return []
            try:
                return [psutil.Process(pinned)]
            except psutil.NoSuchProcess:
                self._say_missing(f"gunicorn master pid {pinned} is not running")
                return []
        infos = []
        for proc in psutil.process_iter(["pid", "ppid", "create_time", "cmdline"]):
            info = proc.info
            infos.append(
                ProcInfo(
                    pid=info["pid"],
                    ppid=info["ppid"] or 0,
                    create_time=info["create_time"] or 0.0,
                    cmdline=tuple(info["cmdline"] or ()),
                )
            )
        found = []
        for pid in find_masters(infos):
            try:
                found.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        return found

    def _say_missing(self, why: str) -> None:
        # Once per cause, not every cycle: the pidfile is re-read every cycle while it is absent.
        if why != self._missing:
            log.warning("%s", why)
            self._missing = why

    def masters(self) -> list[psutil.Process]:
        """Live masters; re-scanned every `rescan_every` cycles, or at once when one died."""
        alive = [m for m in self._masters if m.is_running()]  # compares create_time: pid reuse
        if len(alive) != len(self._masters):
            # A master went: its replacement (a restart, a new deploy) is coming. Look for it
            # at the next listings, not only at the next periodic re-scan.
            self._rescans = self.rescan_every
            self._eager = max(self._eager, self.rescan_every)
        if (
            self._rescans > 0
            or not alive
            or self._cycles % self.rescan_every == 0
            or self.pidfile is not None
        ):
            alive = self._scan()
        self._cycles += 1
        self._rescans = max(0, self._rescans - 1)
        if [m.pid for m in alive] != [m.pid for m in self._masters]:
            log.info("gunicorn masters: %s", [m.pid for m in alive] or "none found")
        if alive:
            self._missing = None
        self._masters = alive
        return alive

    def workers(self) -> tuple[tuple[int, ...], tuple[WorkerRef, ...]]:
        """(master pids, their workers); processes vanishing midway are skipped."""
        self._calls += 1
        if (
            self._last is not None
            and self._eager == 0
            and self.pidfile is None
            and self._calls % self.relist_every != 0
        ):
            return self._last
        self._eager = max(0, self._eager - 1)
        self._last = self._list()
        return self._last

    def _list(self) -> tuple[tuple[int, ...], tuple[WorkerRef, ...]]:
        refs = []
        others: dict[int, float] = {}
        masters = self.masters()
        for master in masters:
            pids = procfs.children(master.pid)
            try:
                if pids is None:  # no /proc children file: psutil scans every process
                    pids = [kid.pid for kid in master.children(recursive=False)]
            except psutil.NoSuchProcess:
                continue
            try:
                command = tuple(master.cmdline())
                executable = _exe(master)
            except psutil.NoSuchProcess:
                continue
            except psutil.AccessDenied:
                command, executable = (), None
            for pid in pids:
                # A worker's start time is read once: the same pid under the same master is the
                # same worker until it is reported gone (forget), which the sampler notices
                # first (its /proc files held open fail once the process exits).
                ref = self._refs.get(pid)
                if ref is not None and ref.master_pid == master.pid:
                    refs.append(ref)
                    continue
                if pid in self._others:
                    others[pid] = self._others[pid]
                    continue
                try:
                    kid = psutil.Process(pid)
                    with kid.oneshot():
                        started = kid.create_time()
                        worker = _is_worker(tuple(kid.cmdline()), _exe(kid), command, executable)
                except psutil.NoSuchProcess:
                    continue
                except psutil.AccessDenied:
                    worker = True  # cannot tell: watch it (py-spy will say)
                if worker:
                    refs.append(WorkerRef(pid, started, master.pid))
                else:
                    log.info("pid %s, a child of gunicorn master %s, is no gunicorn worker "
                             "(another program); not watched", pid, master.pid)  # fmt: skip
                    others[pid] = started
        self._refs = {ref.pid: ref for ref in refs}
        self._others = others
        return tuple(m.pid for m in masters), tuple(sorted(refs))

    def forget(self, pid: int) -> None:
        """A worker was seen gone: re-list every cycle for a while (its replacement is coming)
        and look its pid up afresh if it appears again (pid reuse)."""
        self._refs.pop(pid, None)
        self._eager = 5


@dataclass(frozen=True)
class Identity:
    """Who holds a pid right now: what remediation checks before each signal."""

    pid: int
    create_time: float
    ppid: int
    zombie: bool  # exited, not yet reaped by its parent


def identify(pid: int) -> Identity | None:
    """The process holding `pid` now, or None when there is none."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return Identity(pid, proc.create_time(), proc.ppid(),
                            proc.status() == psutil.STATUS_ZOMBIE)  # fmt: skip
    except psutil.NoSuchProcess:
        return None
