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


def _titled(proc: ProcInfo, role: str) -> bool:
    # gunicorn renames its processes "gunicorn: master [app]" when setproctitle is installed.
    return bool(proc.cmdline) and proc.cmdline[0].startswith(f"gunicorn: {role}")


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

    def _pinned(self) -> int | None:
        if self.pidfile is not None:
            try:
                return read_pidfile(self.pidfile)
            except ConfigError as err:
                log.warning("%s; gunicorn may be (re)starting", err)
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
                log.warning("gunicorn master pid %s is not running", pinned)
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

    def masters(self) -> list[psutil.Process]:
        """Live masters; re-scanned every `rescan_every` cycles, or at once when one died."""
        alive = [m for m in self._masters if m.is_running()]  # compares create_time: pid reuse
        if (
            len(alive) != len(self._masters)
            or not alive
            or self._cycles % self.rescan_every == 0
            or self.pidfile is not None
        ):
            alive = self._scan()
        self._cycles += 1
        if [m.pid for m in alive] != [m.pid for m in self._masters]:
            log.info("gunicorn masters: %s", [m.pid for m in alive] or "none found")
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
        masters = self.masters()
        for master in masters:
            pids = procfs.children(master.pid)
            try:
                if pids is None:  # no /proc children file: psutil scans every process
                    pids = [kid.pid for kid in master.children(recursive=False)]
            except psutil.NoSuchProcess:
                continue
            for pid in pids:
                # A worker's start time is read once: the same pid under the same master is the
                # same worker until it is reported gone (forget), which the sampler notices
                # first (its /proc files held open fail once the process exits).
                ref = self._refs.get(pid)
                if ref is None or ref.master_pid != master.pid:
                    try:
                        ref = WorkerRef(pid, psutil.Process(pid).create_time(), master.pid)
                    except psutil.NoSuchProcess:
                        continue
                refs.append(ref)
        self._refs = {ref.pid: ref for ref in refs}
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
