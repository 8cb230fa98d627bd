"""How each worker is sampled: py-spy from outside, or the in-process probe from inside.

`--sampler=auto` picks, per gunicorn master, the first level that actually works:

1. ``py-spy``: full py-spy (native frames for suspects; the agent's own /proc scan);
2. ``py-spy --nonblocking``: when attaching is denied but the worker's memory can still be read
   (a seccomp filter on ptrace(2) alone): Python frames only, the agent's own /proc scan;
3. ``probe``: when py-spy is denied outright (another uid without CAP_SYS_PTRACE, Heroku): the
   in-process probe (agent/probe/) serves the worker's Python stacks and its own /proc view.

A level is chosen when a worker's first dump is denied, and kept for that master's workers.
The Monitor uses a Sampler as both its scanner and its stack source.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from typing import Protocol

from agent import procfs
from agent.errors import AgentError, ProbeMissing, PtraceDenied
from agent.types import ProcSample, StackSnapshot, WorkerRef

log = logging.getLogger(__name__)


class Mode(enum.StrEnum):
    """--sampler."""

    AUTO = "auto"
    PYSPY = "py-spy"
    PROBE = "probe"


class Level(enum.StrEnum):
    """How one master's workers are sampled, once known."""

    PYSPY = "py-spy"
    NONBLOCKING = "py-spy --nonblocking"
    PROBE = "probe"


class PySpyDumper(Protocol):
    """agent.pyspy.PySpy."""

    def dump(
        self, worker: WorkerRef, *, native: bool, nonblocking: bool = False
    ) -> StackSnapshot: ...


class Probe(Protocol):
    """agent.probe.client.ProbeClient."""

    def available(self, pid: int) -> bool: ...

    def scan(self, worker: WorkerRef, *, now: float) -> ProcSample: ...

    def dump(self, worker: WorkerRef, *, native: bool) -> StackSnapshot: ...

    def retain(self, workers: Iterable[WorkerRef]) -> None: ...

    def forget(self, worker: WorkerRef) -> None: ...

    def close(self) -> None: ...


class Sampler:
    """Routes each worker's /proc scans and dumps to py-spy + procfs, or to the probe."""

    def __init__(
        self,
        mode: Mode,
        *,
        pyspy: PySpyDumper | None,
        probe: Probe | None,
        scanner: procfs.Scanner,
    ) -> None:
        if mode is Mode.PYSPY and pyspy is None:
            raise ValueError("--sampler=py-spy needs py-spy")
        if mode is Mode.PROBE and probe is None:
            raise ValueError("--sampler=probe needs a probe directory")
        self.mode = mode
        self.pyspy = pyspy
        self.probe = probe
        self.scanner = scanner
        self._levels: dict[int, Level] = {}  # master pid -> level
        self._errors: list[AgentError] = []  # what scan() worked around, for the Monitor to count

    # --- what the Monitor asks --------------------------------------------------------------

    @property
    def precise(self) -> bool:
        """Whether progress is measured in nanoseconds (schedstat), as procfs.Scanner says."""
        return self.scanner.precise

    def level(self, worker: WorkerRef) -> Level | None:
        """How this worker is sampled, or None before its first dump decided it."""
        if self.mode is Mode.PROBE:
            return Level.PROBE
        if self.mode is Mode.AUTO and self.pyspy is None:
            return Level.PROBE
        return self._levels.get(worker.master_pid)

    def levels(self) -> dict[int, Level]:
        """Each master's level, as far as known."""
        return dict(self._levels)

    def sees_memory(self, worker: WorkerRef) -> bool:
        """Whether the agent itself may read this worker's memory and /proc files (lock proof,
        library versions): not when only the probe can look."""
        return self.level(worker) is not Level.PROBE

    def drain_errors(self) -> list[AgentError]:
        """Errors worked around since the last call (a silent probe), for the counters."""
        errors, self._errors = self._errors, []
        return errors

    def retain(self, workers: Iterable[WorkerRef]) -> None:
        """Drop state of workers no longer watched (and the levels of masters gone)."""
        if not isinstance(workers, tuple):
            workers = tuple(workers)
        if self._levels:
            masters = {w.master_pid for w in workers}
            for gone in [m for m in self._levels if m not in masters]:
                del self._levels[gone]
        self.scanner.retain(workers)
        if self.probe is not None:
            self.probe.retain(workers)

    def forget(self, worker: WorkerRef) -> None:
        """Drop a worker that vanished."""
        self.scanner.forget(worker)
        if self.probe is not None:
            self.probe.forget(worker)

    def close(self) -> None:
        """Close held files and probe connections."""
        self.scanner.close()
        if self.probe is not None:
            self.probe.close()

    def scan(self, worker: WorkerRef, *, now: float) -> ProcSample:
        """The worker's threads from /proc: the agent's own view, or the probe's when only it
        can read the blocking syscalls. A probe that does not answer is counted and the agent's
        own (coarser) view is used: on-CPU time is readable from outside, syscalls are not."""
        if self.level(worker) is not Level.PROBE:
            return self.scanner.scan(worker, now=now)
        assert self.probe is not None  # noqa: S101 - level PROBE implies a probe
        try:
            return self.probe.scan(worker, now=now)
        except AgentError as err:
            if err.reason not in ("probe_silent", "probe_missing", "bad_output"):
                raise
            self._errors.append(err)
            return self.scanner.scan(worker, now=now)

    def dump(self, worker: WorkerRef, *, native: bool) -> StackSnapshot:
        """One dump at this worker's level; the first denial moves its master down a level."""
        level = self.level(worker)
        if level is Level.PROBE:
            return self._probe().dump(worker, native=False)
        assert self.pyspy is not None  # noqa: S101 - levels above PROBE imply py-spy
        if level is Level.NONBLOCKING:
            return self.pyspy.dump(worker, native=False, nonblocking=True)
        try:
            snapshot = self.pyspy.dump(worker, native=native)
        except PtraceDenied as denied:
            if self.mode is Mode.PYSPY:
                raise
            return self._fall_back(worker, denied)
        self._levels.setdefault(worker.master_pid, Level.PYSPY)
        return snapshot

    # --- falling back -----------------------------------------------------------------------

    def _fall_back(self, worker: WorkerRef, denied: PtraceDenied) -> StackSnapshot:
        assert self.pyspy is not None  # noqa: S101
        try:
            snapshot = self.pyspy.dump(worker, native=False, nonblocking=True)
        except PtraceDenied:
            pass
        else:
            self._set(worker, Level.NONBLOCKING, "py-spy may read its memory but not attach")
            return snapshot
        if self.probe is None or not self.probe.available(worker.pid):
            raise PtraceDenied(
                f"{denied}; no in-process probe answers for it either (start gunicorn under "
                "`deadlock-agent run`, or with the probe's environment and --probe-dir)",
                pid=worker.pid,
            ) from denied
        self._set(worker, Level.PROBE, "py-spy is denied (no ptrace rights)")
        return self.probe.dump(worker, native=False)

    def _set(self, worker: WorkerRef, level: Level, why: str) -> None:
        self._levels[worker.master_pid] = level
        log.warning(
            "gunicorn master %s: %s; sampling its workers with %s from now on (Python frames "
            "only: native frames such as libpq's and OpenSSL's are not visible)",
            worker.master_pid, why, "the in-process probe" if level is Level.PROBE else level,
        )  # fmt: skip

    def _probe(self) -> Probe:
        if self.probe is None:
            raise ProbeMissing(
                "no probe directory: give --probe-dir, or run gunicorn under `deadlock-agent run`"
            )
        return self.probe
