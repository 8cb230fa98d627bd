"""Boundary types: the only shapes modules exchange (never py-spy dicts or psutil objects)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class WorkerRef:
    """A Gunicorn worker, identified by pid *and* start time: pids are reused."""

    pid: int
    create_time: float
    master_pid: int


@dataclass(frozen=True)
class ThreadActivity:
    """One thread as /proc shows it: cheap to read, enough to tell whether it ran."""

    tid: int
    start_ticks: int  # /proc/.../stat field 22: tells a reused tid from the old thread
    comm: str
    state: str  # R, S, D, T, Z ...
    cpu_ns: int  # on-CPU time: schedstat's nanoseconds, or (utime + stime) ticks without it
    runs: int  # times scheduled (schedstat); voluntary + nonvoluntary switches without it
    syscall: int | None  # None when not readable (no ptrace access) or running
    wchan: str | None
    # Where it blocks: the syscall's first arguments, stack and instruction pointers (not the
    # number, which becomes restart_syscall after a ptrace stop). None when unknown.
    blocked_at: str | None = None
    timed_wait: bool = False  # that syscall waits with a timeout (poll slices, timed futex)
    # The syscall's name ("poll", "recvfrom", "futex"...; the one restarted, not
    # "restart_syscall", after a ptrace stop), when procfs knows it.
    syscall_name: str | None = None
    # What the fd of a blocked write(2)/writev/sendto/sendmsg is: "pipe", "socket", or "other"
    # (procfs reads /proc/PID/fd/N only for those syscalls). None for every other wait.
    fd_kind: str | None = None


@dataclass(frozen=True)
class ProcSample:
    """One worker's threads at one instant, from /proc: those that changed since its last
    scan (every thread the first time), and which threads are alive."""

    worker: WorkerRef
    taken_at: float
    threads: tuple[ThreadActivity, ...]
    # How fine cpu_ns is: 1 with schedstat, one clock tick (usually 10 ms) without it.
    resolution_ns: int = 1
    # Every live thread; a thread alive but not in `threads` has not run since the last scan.
    # None: `threads` is every live thread.
    tids: frozenset[int] | None = None


@dataclass(frozen=True)
class Frame:
    """One stack frame, Python or native; innermost frames come first in a stack."""

    function: str
    file: str  # short file name for Python frames ("psycopg2/__init__.py"), full for native
    line: int = 0
    module: str | None = None  # the shared object of a native frame, None for Python frames

    @property
    def native(self) -> bool:
        """True for a frame in a shared object rather than Python source."""
        return self.module is not None

    def __str__(self) -> str:
        if self.native:
            return f"{self.function} ({self.module})"
        return f"{self.function} ({self.file}:{self.line})"


@dataclass(frozen=True)
class ThreadStack:
    """The stack of one thread from one py-spy dump."""

    tid: int
    name: str | None
    frames: tuple[Frame, ...]
    native: bool  # whether the dump asked for native frames
    source: str = "py-spy"  # who took it: "py-spy", "py-spy --nonblocking", "probe", ...


@dataclass(frozen=True)
class StackSnapshot:
    """One dump of one worker's threads (py-spy's, or the in-process probe's)."""

    worker: WorkerRef
    taken_at: float
    native: bool
    threads: tuple[ThreadStack, ...]
    source: str = "py-spy"  # as ThreadStack.source


@dataclass(frozen=True)
class FramePattern:
    """Regular expressions a frame must all match (searched, not anchored)."""

    function: str | None = None
    file: str | None = None
    module: str | None = None


@dataclass(frozen=True)
class IdleRule:
    """A stack shape that means "waiting for work", never "stuck"."""

    name: str
    top: FramePattern  # the innermost Python frame
    under: FramePattern | None = None  # some frame below it must match
    unless_under: FramePattern | None = None  # ...and none below may match this


class Wait(enum.StrEnum):
    """How a blocked thread waits, read from its syscall's arguments."""

    FOREVER = "forever"  # no timeout: poll(-1), recv on a blocking socket, an untimed futex
    TIMED = "timed"  # with a deadline: poll(..., ms), a timed futex wait


@dataclass(frozen=True)
class Role:
    """One thread a signature needs, e.g. the libpq thread or the HTTPS thread."""

    name: str
    any_of: tuple[FramePattern, ...] = ()  # some frame matches one of these
    all_of: tuple[FramePattern, ...] = ()  # each of these matches some frame
    none_of: tuple[FramePattern, ...] = ()  # no frame matches any of these
    stuck: bool = False  # must the thread be stuck, or merely inside these frames?
    spinning: bool = False  # must the thread be spinning (on CPU, its stack not moving)?
    syscall: tuple[str, ...] = ()  # it blocks in one of these syscalls (by name)
    wait: Wait | None = None  # ...and waits forever, or with a timeout
    thread: str | None = None  # its thread name (py-spy's, else /proc comm) matches this
    # No thread of the worker but those filling other roles may match this role: it says
    # what must be missing ("nobody holds the lock"), and fills nothing.
    absent: bool = False


class HangClass(enum.StrEnum):
    """What kind of hang a signature names; it drives the worker's verdict."""

    DEADLOCK = "deadlock"  # a wait-for cycle or an orphaned lock: never ends by itself
    STALL = "stall"  # waits on another party with no effective timeout
    BOUNDED_STALL = "bounded_stall"  # the same, but a (late) timeout will end it
    SPIN = "spin"  # burns CPU without progress


@dataclass(frozen=True)
class Signature:
    """A known hang: distinct threads of one worker filling every role."""

    name: str
    summary: str
    remedy: str
    roles: tuple[Role, ...]
    hang_class: HangClass = HangClass.DEADLOCK
    references: tuple[str, ...] = ()  # links: the issues and docs that describe it
    # Matched by a proof read from memory instead of by frames: "cycle" (threads waiting on
    # each other's mutexes) or "orphan" (a mutex whose owner thread is gone). No roles then.
    proof: str | None = None


class ThreadState(enum.StrEnum):
    RUNNING = "running"
    IDLE = "idle"
    STUCK = "stuck"
    SPINNING = "spinning"  # on CPU all along, its stack not moving


class WorkerState(enum.StrEnum):
    OK = "ok"
    STUCK = "stuck"  # a request thread stuck (with a named cause when a stall matched)
    SPINNING = "spinning"  # a request thread spinning, or a spin signature matched
    DEADLOCKED = "deadlocked"  # a deadlock-class signature matched, or a proven lock cycle


class DumpKind(enum.StrEnum):
    PYTHON = "pyspy"
    NATIVE = "pyspy_native"


@dataclass(frozen=True)
class ThreadReport:
    """The verdict on one thread in one cycle."""

    tid: int
    name: str | None
    state: ThreadState
    request: bool  # serves requests (gthread pool thread, sync worker main thread)
    stuck_for: float  # seconds without progress; 0 unless stuck
    stack: ThreadStack | None


@dataclass(frozen=True)
class Finding:
    """A signature matched in one worker: which thread fills which role."""

    signature: Signature
    threads: tuple[tuple[str, ThreadReport], ...]  # (role name, thread)


@dataclass(frozen=True)
class WorkerReport:
    """The verdict on one worker in one cycle."""

    worker: WorkerRef
    state: WorkerState
    threads: tuple[ThreadReport, ...]
    findings: tuple[Finding, ...] = ()


#: What an incident of a worker stuck with no known signature is filed under.
NO_SIGNATURE = "none"

STUCK_REMEDY = (
    "Threads of this worker have made no progress for a long time and match no known "
    "signature. Read their stacks (below, and at /incidents) to see what they wait on. Now: "
    "restart the worker (kill -TERM <worker pid>; the master respawns it). Gunicorn's "
    "--timeout does not fire while the worker's main loop still heartbeats."
)


@dataclass(frozen=True)
class RemediationEvent:
    """One thing remediation did (or would do, or refused to do) to an incident's worker.

    `action`: "abort" (SIGABRT) or "kill" (SIGKILL); `result`: one of
    agent.remediation.RESULTS ("done", "dry_run", "rate_limited", ...); `detail`: why, in words.
    """

    action: str
    result: str
    at: float
    pid: int
    detail: str = ""

    @property
    def signal(self) -> str:
        """The signal's name: SIGABRT or SIGKILL."""
        return "SIGABRT" if self.action == "abort" else "SIGKILL"

    def describe(self) -> str:
        """One line: "SIGABRT sent to pid 42", "dry-run: would send SIGKILL to pid 42", ..."""
        what = {
            "done": f"{self.signal} sent to pid {self.pid}",
            "dry_run": f"dry-run: would send {self.signal} to pid {self.pid}",
            "rate_limited": f"not killed: pid {self.pid}",
            "gone": f"no {self.signal} needed: pid {self.pid} had already exited",
            "identity_changed": f"{self.signal} refused: pid {self.pid} is another process now",
            "refused": f"{self.signal} refused for pid {self.pid}",
            "failed": f"{self.signal} to pid {self.pid} failed",
        }.get(self.result, f"{self.signal} to pid {self.pid}: {self.result}")
        return f"{what} ({self.detail})" if self.detail else what


@dataclass(frozen=True)
class Incident:
    """One hang of one worker, from first detection until it recovers or dies: a deadlock
    (a signature matched) or a worker stuck past the longer incident threshold."""

    id: str
    worker: WorkerRef
    verdict: WorkerState
    signature: Signature | None
    first_seen: float
    threads: tuple[tuple[str, ThreadReport], ...]  # (role, thread); role "stuck" when unsigned
    resolved_at: float | None = None
    # What remediation did about it, in order (empty unless --remediate is dry-run or kill).
    remediation: tuple[RemediationEvent, ...] = ()

    @property
    def signature_name(self) -> str:
        """The signature's name, or NO_SIGNATURE."""
        return self.signature.name if self.signature is not None else NO_SIGNATURE

    @property
    def summary(self) -> str:
        """One sentence on what is wrong."""
        if self.signature is not None:
            return self.signature.summary
        return "Threads of this worker are stuck and match no known signature."

    @property
    def remedy(self) -> str:
        """What to do about it."""
        return self.signature.remedy if self.signature is not None else STUCK_REMEDY

    @property
    def hang_class(self) -> str:
        """The signature's class (deadlock, stall, bounded_stall, spin), or "unknown"."""
        return self.signature.hang_class.value if self.signature is not None else "unknown"

    @property
    def references(self) -> tuple[str, ...]:
        """Links that describe the hang (issues, docs)."""
        return self.signature.references if self.signature is not None else ()

    @property
    def sampled_by(self) -> tuple[str, ...]:
        """Who took the involved threads' stacks ("py-spy", "probe", ...), sorted."""
        return tuple(sorted({t.stack.source for _, t in self.threads if t.stack is not None}))

    @property
    def blind_spot(self) -> str | None:
        """What the stacks could not show, when they come from a sampler without ptrace."""
        return (
            BLIND_SPOTS.get(self.sampled_by[0])
            if len(self.sampled_by) == 1
            else (BLIND_SPOTS["mixed"] if any(s in BLIND_SPOTS for s in self.sampled_by) else None)
        )


#: What an incident says when its stacks come from a sampler that cannot see native frames.
BLIND_SPOTS: Mapping[str, str] = {
    "probe": "Stacks from the in-process probe (ptrace was denied): Python frames and the "
    "worker's own /proc view only; native frames (libpq, OpenSSL) cannot be seen from inside.",
    "probe-watchdog": "Stacks written by the probe's faulthandler watchdog: the probe itself "
    "could not run (a thread may hold the GIL); Python frames only.",
    "py-spy --nonblocking": "Stacks read with py-spy --nonblocking (ptrace attach was denied): "
    "Python frames only; native frames (libpq, OpenSSL) were not sampled.",
    "mixed": "Some stacks come from a sampler without native frames (libpq, OpenSSL).",
}


@dataclass(frozen=True)
class CycleReport:
    """Everything one cycle learned; the metrics and the health check read only this."""

    finished_at: float
    duration: float
    masters: tuple[int, ...]
    workers: tuple[WorkerReport, ...]
    complete: bool  # every worker found was sampled without error
    signatures: tuple[str, ...]  # every known signature, for 0-valued series
    open_incidents: tuple[Incident, ...] = ()
    # Cumulative counters since start, keyed by label value.
    samples: Mapping[str, int] = field(default_factory=dict)
    sample_seconds: Mapping[str, float] = field(default_factory=dict)
    sample_errors: Mapping[str, int] = field(default_factory=dict)
    incidents_total: Mapping[str, int] = field(default_factory=dict)  # deadlocks, by signature
    hangs_total: Mapping[str, int] = field(default_factory=dict)  # every named hang
    catalog: tuple[Signature, ...] = ()  # the signatures, for their class, remedy and links
    # How finely progress is measured: 1 ns with schedstat, a clock tick without it.
    progress_resolution_ns: int = 1
    cycle_cpu: float = 0.0  # CPU seconds the sampling thread spent on this cycle
    dumps_deferred: int = 0  # dumps the per-minute budget has put off, since start
    # Remediation outcomes since start, by (action, result): deadlock_agent_remediations_total.
    remediations: Mapping[tuple[str, str], int] = field(default_factory=dict)
