"""Signals for remediation: a worker's identity checked right before each signal, then sent.

The effectful half of agent.remediation. The identity comes from agent.discovery (psutil's
home); the signal goes through a pidfd opened *before* the check (`pidfd_open(2)`,
`pidfd_send_signal(2)`, Linux 5.3+), so it reaches the very process that was checked even if
the pid is reused in between; without pidfds, `os.kill` right after the check.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Callable, Collection

from agent.discovery import Identity, identify
from agent.remediation import Action
from agent.types import WorkerRef

log = logging.getLogger(__name__)

SIGNALS = {Action.ABORT: signal.SIGABRT, Action.KILL: signal.SIGKILL}


class Signaller:
    """Sends SIGABRT/SIGKILL to a gunicorn worker, only if it still is that worker."""

    def __init__(
        self,
        *,
        identify: Callable[[int], Identity | None] = identify,
        use_pidfd: bool = True,
    ) -> None:
        self._identify = identify
        self._use_pidfd = use_pidfd and hasattr(os, "pidfd_open")

    def send(self, worker: WorkerRef, action: Action, masters: Collection[int]) -> tuple[str, str]:
        """(result, detail): done, gone, identity_changed, refused or failed."""
        if worker.pid in masters or worker.pid <= 1:
            return "refused", f"pid {worker.pid} is a gunicorn master (or init)"
        if worker.master_pid not in masters:
            return "refused", f"its master {worker.master_pid} is not a discovered master"
        pidfd = self._open(worker.pid)
        try:
            if pidfd == -1:
                return "gone", "no such process"
            found = self._identify(worker.pid)
            if found is None or found.zombie:
                return "gone", "exited" if found is not None else "no such process"
            if found.create_time != worker.create_time:
                return "identity_changed", (
                    f"pid {worker.pid} started at {found.create_time:.2f}, the worker at "
                    f"{worker.create_time:.2f}: pid reused"
                )
            if found.ppid != worker.master_pid:
                return "refused", (
                    f"its parent is {found.ppid}, not the gunicorn master {worker.master_pid}"
                )
            return self._signal(worker.pid, pidfd, SIGNALS[action])
        finally:
            if pidfd is not None and pidfd >= 0:
                os.close(pidfd)

    def _open(self, pid: int) -> int | None:
        """A pidfd for pid; -1 when the process is gone; None without pidfd support."""
        if not self._use_pidfd:
            return None
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            return -1
        except OSError as err:  # ENOSYS (kernel < 5.3), EPERM under some seccomp profiles
            log.info("pidfd_open unavailable (%s); signalling by pid", err.strerror)
            self._use_pidfd = False
            return None

    @staticmethod
    def _signal(pid: int, pidfd: int | None, signum: signal.Signals) -> tuple[str, str]:
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            return "gone", "exited just before the signal"
        except OSError as err:
            name = errno.errorcode.get(err.errno, "error") if err.errno else "error"
            return "failed", f"{name}: {err.strerror}"
        return "done", ""
