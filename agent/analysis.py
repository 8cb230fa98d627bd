"""Stuck-thread tracking, dump planning, signature matching and incidents. Pure: no I/O, no clock.

Every method takes the time from its caller. Two facts it leans on:

* a thread whose on-CPU time and times-scheduled count have not moved since its last stack dump
  has not run, so that stack is still its stack. /proc tells us that for microseconds; py-spy is
  only asked when it cannot;
* progress is on-CPU time in nanoseconds (schedstat), net of what our own dumps cost the thread
  and of a small allowance for what a blocked thread accrues anyway. A thread serving 2 s
  queries spends ~1.4 ms of CPU per request; a blocked one 0, plus 8-36 us per ptrace stop.
  Clock ticks (10 ms) cannot tell them apart; nanoseconds separate them by ~40x.
"""

from __future__ import annotations

import collections
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from agent.locks import LockProof
from agent.signatures import Candidate, Catalog
from agent.types import (
    NO_SIGNATURE,
    DumpKind,
    Finding,
    HangClass,
    Incident,
    ProcSample,
    RemediationEvent,
    StackSnapshot,
    ThreadActivity,
    ThreadReport,
    ThreadStack,
    ThreadState,
    WorkerRef,
    WorkerReport,
    WorkerState,
)

# Which gunicorn worker class a worker runs, from its main thread's frames.
_WORKER_KIND = re.compile(
    r"gunicorn/workers/(gthread|sync|ggevent|geventlet|gtornado|base_async|gasgi)\.py$"
)
# Failing that, a main thread running an asyncio event loop: uvicorn's UvicornWorker
# (uvicorn/workers.py, or uvicorn_worker/_workers.py from the uvicorn-worker package; named
# too because under uvloop the loop's own frames are Cython, invisible to py-spy), or any
# worker whose loop is asyncio's. That loop serves every request of the worker.
_ASYNCIO_KIND = re.compile(r"(^|/)(uvicorn(_worker)?/_?workers|asyncio/base_events)\.py$")
# A frame of gunicorn handing a request to the app: the thread serves requests.
_HANDLES_REQUEST = re.compile(r"(^|\.)handle(_request)?$")
_POOL_WORKER = re.compile(r"(^|\.)_worker$")
# What counts as progress, from measurements on this kernel (6.18; ARCHITECTURE.md, "Progress"):
# a thread blocked with no timeout accrues exactly 0 ns and 0 runs; a slow stream (1 KiB every
# 0.5-1 s) 27-386 us a second; a request with a 2 s query ~6 ms (new TLS connection each time).
#: CPU a blocked thread may accrue in one progress window (suspect_after, 2 s) and still not
#: count as progress, plus IDLE_RATE_NS a second of it.
IDLE_ALLOWANCE_NS = 25_000
IDLE_RATE_NS = 10_000
#: What one of our own py-spy dumps may cost a thread (measured 8-173 us, median 12-47 us): CPU
#: seen between the scans just before and after a dump, up to this much, is written off.
DUMP_ALLOWANCE_NS = 250_000
#: A thread polling in slices (psycopg 3's poll(fd, 1, 100), Event.wait(0.1) loops) wakes 10-13
#: times a second for 36-100 us each while it waits for nothing. When it is in a timed wait at
#: the same point as at the last scan and was scheduled at least POLL_MIN_RATE times a second,
#: up to POLL_WAKE_NS per time scheduled is written off. Streams (1-5 runs a second, in a sleep)
#: and real requests (~400 us a run) keep their progress.
POLL_WAKE_NS = 150_000
POLL_MIN_RATE = 8.0
#: A thread using at least this share of a CPU between two scans is *hot*; hot for
#: `stuck_after` on the same stack shape (dumps at least half that apart) is *spinning*.
HOT_SHARE = 0.5
#: Ticks of noise allowed at clock-tick resolution (ptrace stops are charged as system time).
CPU_NOISE_TICKS = 2
#: What a blocked write(2)/writev/sendto/sendmsg's fd may be for the worker to be spared
#: re-dumps: a ptrace stop can cut a blocked pipe write short (research fact 6; sockets alike).
WRITE_FD_KINDS = frozenset({"pipe", "socket"})


@dataclass(frozen=True)
class AnalysisSettings:
    """The timing knobs of tracking; validated by agent.config."""

    stuck_after: float = 10.0  # no progress for this long -> stuck
    suspect_after: float = 2.0  # no progress for this long -> worth a stack dump
    dump_interval: float = 300.0  # re-check a worker whose threads ran unseen this often
    native_gap: float = 5.0  # at most one --native dump (which pauses the worker) per this
    native: bool = True  # allow --native dumps at all
    max_dumps_per_minute: int = 30  # py-spy runs in any 60 s, all workers together
    interval: float = 1.0  # the cycle's period: how many dumps one cycle may take


def stack_key(stack: ThreadStack) -> tuple[tuple[str, str, int], ...]:
    """What "the stack has not changed" compares: the Python frames, comparable across kinds."""
    return tuple((f.function, f.file, f.line) for f in stack.frames if not f.native)


def spin_shape(stack: ThreadStack) -> tuple[tuple[str, str], ...]:
    """What "a busy stack has not moved" compares: its Python functions, not their lines (a
    loop spinning inside one function is caught on different lines)."""
    return tuple((f.function, f.file) for f in stack.frames if not f.native)


@dataclass
class _ThreadTrack:
    activity: ThreadActivity
    moved_at: float  # last scan that saw it run: CPU time or times scheduled moved (or first)
    cpu_at: float  # last scan that saw progress (or first seen)
    window_at: float  # start of the current progress window
    window_ns: int  # its on-CPU ns then
    written_off_ns: int = 0  # CPU our dumps and its poll slices cost it within the window
    stack: ThreadStack | None = None  # None: the last dump had no Python stack for it
    stack_at: float = -math.inf  # when the last dump that covered this thread was taken
    request: bool = False  # sticky once seen serving a request
    idle: bool = False  # the stack matches an idle rule: judged once per dump, not per cycle
    # Since when its (Python) stack is known to be the one it has: set when a dump shows a
    # new stack, kept while later dumps show the same one.
    unchanged_since: float = math.inf
    dumped_point: str | None = None  # its blocking point right after the last dump
    report: ThreadReport | None = None  # the last verdict, reused while it still holds
    # Hot: on a CPU at least HOT_SHARE of the time since hot_since, scan after scan.
    hot_since: float | None = None
    shape: tuple[tuple[str, str], ...] | None = None  # spin_shape of the last dump's stack
    shape_since: float | None = None  # the first dump of this hot spell with that shape

    @property
    def current(self) -> bool:
        """Its stack is still the one the last dump saw: it has not run since, or it sits at the
        very blocking point it had then (same syscall arguments, stack and instruction
        pointers), whether it only woke up, as a thread polling in slices does, or did work in
        between and came back (the work queue, the next query at the same line)."""
        if self.stack_at >= self.moved_at:
            return True
        point = self.activity.blocked_at
        # Back at the very point where the last dump saw it (same syscall arguments, stack and
        # instruction pointers: the same call site at the same depth), with or without work in
        # between: a pool thread back on the work queue, or serving the next 2 s query at the
        # same line. Its stack is that one again; how long it has been stalled there is still
        # counted from its last progress.
        return point is not None and point == self.dumped_point

    @property
    def write_seen(self) -> bool:
        """Blocked writing to a pipe or socket, where a dump has already seen it: another dump
        could cut that write short (ARCHITECTURE.md, "Side effects of our own dumps")."""
        return (
            self.activity.fd_kind in WRITE_FD_KINDS
            and self.stack_at > -math.inf
            and self.current
            and self.activity.state != "R"
        )

    @property
    def held(self) -> bool:
        """Woken since the last dump (e.g. by someone's ptrace) without progress, and not
        provably where it was: stuck/role verdicts hold until a dump re-checks."""
        return not self.current and self.cpu_at <= self.stack_at

    def quiet(self, now: float) -> float:
        """Seconds without progress."""
        return now - self.cpu_at

    def calm_until(self, suspect_after: float) -> float:
        """Until when time alone changes nothing about its verdict or its need of a dump, as
        long as no scan or dump brings news: forever for a thread where its last dump saw it
        on an idle stack (or with no Python stack: idle or running by /proc, not by time);
        until it has been quiet for suspect_after (then it wants a dump) for one that made
        progress since its last dump (running, or idle by rule, whatever the time); never for
        the rest (a stalled clock runs)."""
        if self.hot_since is not None:
            return -math.inf  # a spin is judged on time
        if self.current:
            return math.inf if self.idle or self.stack is None else -math.inf
        if self.cpu_at > self.stack_at:
            return self.cpu_at + suspect_after
        return math.inf if self.stack is None else -math.inf


@dataclass
class _WorkerTrack:
    worker: WorkerRef
    threads: dict[int, _ThreadTrack] = field(default_factory=dict)
    live: frozenset[int] = frozenset()  # the live tids at the last scan
    scanned_at: float = -math.inf  # the last scan's time
    kind: str | None = None
    last_dump_at: float = -math.inf
    last_native_at: float = -math.inf
    stuck_tids: frozenset[int] = frozenset()  # stuck at the last judgment
    spin_tids: frozenset[int] = frozenset()  # spinning at the last judgment
    role_tids: frozenset[int] = frozenset()  # filling a signature role at the last judgment
    want_native: bool = False  # a thread just became stuck: refresh every stack, natively
    report: WorkerReport | None = None  # the last verdict, reused while it still holds
    native_works: bool = True  # False once py-spy could not unwind it (gevent's greenlets)
    dumpable: bool = True  # False once py-spy found no Python in it (a non-Python child)
    # Until when time alone changes nothing about this worker's verdict or its plan: while no
    # scan or dump brings news (dirty), plan and judge skip it, so an idle worker, or one whose
    # threads serve and go back to where they were dumped, costs its scan and nothing more.
    calm_until: float = -math.inf
    dirty: bool = True
    hot: set[int] = field(default_factory=set)  # tids whose hot_since is set (kept in step)
    proof: LockProof | None = None  # native mutex waits read from memory (agent.locks)
    seen_at: float = math.inf  # when its first scan was taken

    def settle(self, settings: AnalysisSettings) -> None:
        """After a judgment: take the news as read, and work out `calm_until`."""
        self.dirty = False
        if (
            self.stuck_tids
            or self.spin_tids
            or self.role_tids
            or self.want_native
            or self.last_dump_at == -math.inf
        ):
            self.calm_until = -math.inf
            return
        until = min(
            (t.calm_until(settings.suspect_after) for t in self.threads.values()),
            default=math.inf,
        )
        if until > self.last_dump_at + settings.dump_interval and not all(
            t.current for t in self.threads.values()
        ):
            until = self.last_dump_at + settings.dump_interval  # the refresh comes due
        self.calm_until = until

    def calm(self, now: float) -> bool:
        """Nothing to plan or judge anew this cycle."""
        return not self.dirty and now < self.calm_until


class Tracker:
    """Remembers every thread of every worker across cycles and judges them."""

    def __init__(self, catalog: Catalog, settings: AnalysisSettings | None = None) -> None:
        self.catalog = catalog
        self.settings = settings or AnalysisSettings()
        self._workers: dict[WorkerRef, _WorkerTrack] = {}
        self._dumped_at: collections.deque[float] = collections.deque()  # the last minute's
        self.deferred = 0  # dumps planned but left for a later cycle by the budget
        self._retained: object = None  # the last workers tuple retained

    @property
    def workers(self) -> tuple[WorkerRef, ...]:
        """The workers being tracked, in pid order."""
        return tuple(sorted(self._workers))

    def retain(self, workers: Iterable[WorkerRef]) -> None:
        """Forget workers that are gone; start tracking new ones."""
        if isinstance(workers, tuple) and workers is self._retained:
            return  # discovery's cached tuple again: nothing came or went
        self._retained = workers if isinstance(workers, tuple) else None
        alive = set(workers)
        for ref in [ref for ref in self._workers if ref not in alive]:
            del self._workers[ref]
        for ref in alive:
            if ref not in self._workers:
                self._workers[ref] = _WorkerTrack(ref)

    def native_failed(self, worker: WorkerRef) -> None:
        """py-spy cannot unwind this worker natively: plan only Python dumps for it from now."""
        track = self._workers.get(worker)
        if track is not None:
            track.native_works = False
            track.want_native = False
            track.dirty = True

    def no_stacks(self, worker: WorkerRef) -> None:
        """py-spy found no Python in this process: plan no dumps of it (its threads are shown
        from /proc, never stuck)."""
        track = self._workers.get(worker)
        if track is not None:
            track.dumpable = False

    def lock_suspects(self) -> list[WorkerRef]:
        """Workers with a thread stuck in a futex wait: their native mutexes are worth reading
        (agent.locks proves a cycle or an orphaned lock from them)."""
        return [
            ref
            for ref, track in self._workers.items()
            if any(
                track.threads[tid].activity.syscall_name == "futex"
                for tid in track.stuck_tids
                if tid in track.threads
            )
        ]

    def observe_locks(self, worker: WorkerRef, proof: LockProof) -> None:
        """Fold in what the worker's mutexes say (read while some thread of it is stuck)."""
        track = self._workers.get(worker)
        if track is not None and proof != track.proof:
            track.proof = proof
            track.dirty = True

    def native_allowed(self, worker: WorkerRef) -> bool:
        """Whether a --native dump of this worker is allowed and has not failed before."""
        track = self._workers.get(worker)
        return self.settings.native and (track is None or track.native_works)

    def forget(self, worker: WorkerRef) -> None:
        """Drop a worker that vanished mid-cycle."""
        self._workers.pop(worker, None)
        self._retained = None

    def observe_proc(self, sample: ProcSample, *, after_dump: bool = False) -> None:
        """Fold in a /proc scan: note which threads ran, and which made progress.

        Progress is judged over windows of `suspect_after` seconds: a thread progressed when,
        within the current window, its on-CPU time grew by more than a blocked thread accrues
        (`_allowance`), not counting what our own dumps cost it. A py-spy dump stops every
        thread of the worker (ptrace): `after_dump` marks the scan taken right after one, so
        the dump's few microseconds and its two context switches are written off instead of
        making a blocked thread look as if it ran. Only the CPU between the scans just before
        and after the dump is written off (at most DUMP_ALLOWANCE_NS), never what the thread
        earned before: a thread that resumed is seen to resume however often it is dumped."""
        track = self._workers.setdefault(sample.worker, _WorkerTrack(sample.worker))
        now = sample.taken_at
        resolution = sample.resolution_ns
        track.seen_at = min(track.seen_at, now)
        previous, track.scanned_at = track.scanned_at, now
        live = sample.tids if sample.tids is not None else frozenset(a.tid for a in sample.threads)
        if live is not track.live and live != track.live:
            track.threads = {tid: t for tid, t in track.threads.items() if tid in live}
            track.live = live
            track.hot.intersection_update(track.threads)
            track.dirty = True
        if not after_dump and track.hot:
            ran = {a.tid for a in sample.threads}
            for tid in [tid for tid in track.hot if tid not in ran]:
                track.threads[tid].hot_since = None  # it did not run at all: cooled down
                track.hot.discard(tid)
                track.dirty = True
        # Only threads that changed are in the sample: the rest did not run, and nothing about
        # them needs doing now (their windows are rolled when they next change).
        for activity in sample.threads:
            old = track.threads.get(activity.tid)
            if old is None or old.activity.start_ticks != activity.start_ticks:
                track.threads[activity.tid] = _ThreadTrack(
                    activity=activity, moved_at=now, cpu_at=now, window_at=now,
                    window_ns=activity.cpu_ns,
                )  # fmt: skip
                track.hot.discard(activity.tid)
                track.dirty = True
                continue
            calm = old.calm_until(self.settings.suspect_after)
            if previous - old.window_at >= self.settings.suspect_after:
                # Its window ended while it sat unchanged: start the new one at the last scan.
                old.window_at, old.window_ns, old.written_off_ns = previous, old.activity.cpu_ns, 0
            step = activity.cpu_ns - old.activity.cpu_ns
            runs = activity.runs - old.activity.runs
            if after_dump:
                old.written_off_ns += min(step, max(DUMP_ALLOWANCE_NS, resolution))
                old.dumped_point = activity.blocked_at
            elif step or runs:
                old.moved_at = now
                share = step / ((now - previous) * 1e9) if now > previous else 0.0
                if share < HOT_SHARE:
                    old.hot_since = None
                    track.hot.discard(activity.tid)
                elif old.hot_since is None:
                    old.hot_since = previous
                    track.hot.add(activity.tid)
                if (
                    activity.timed_wait
                    and activity.blocked_at is not None
                    and activity.blocked_at == old.activity.blocked_at
                    and runs >= POLL_MIN_RATE * (now - previous)
                ):
                    old.written_off_ns += min(step, POLL_WAKE_NS * runs)
            elapsed = now - old.window_at
            earned = activity.cpu_ns - old.window_ns - old.written_off_ns
            if earned > _allowance(elapsed, resolution):
                old.cpu_at = old.moved_at = now
            if earned > _allowance(elapsed, resolution) or elapsed >= self.settings.suspect_after:
                old.window_at, old.window_ns, old.written_off_ns = now, activity.cpu_ns, 0
            old.activity = activity
            if old.calm_until(self.settings.suspect_after) < calm:
                track.dirty = True  # news (a thread back at its idle point brings none)

    def observe_stacks(self, snapshot: StackSnapshot) -> None:
        """Fold in a py-spy dump of one worker."""
        track = self._workers.get(snapshot.worker)
        if track is None:
            return
        at = snapshot.taken_at
        track.dirty = True
        stacks = {s.tid: s for s in snapshot.threads}
        main = stacks.get(snapshot.worker.pid)
        if main is not None and track.kind is None:
            track.kind = _worker_kind(main)
        for tid, thread in track.threads.items():
            stack = stacks.get(tid)
            keep_native = (
                stack is not None
                and not stack.native
                and thread.stack is not None
                and thread.stack.native
                and thread.current
                and stack_key(stack) == stack_key(thread.stack)
            )
            if keep_native:
                # It has not run since the native dump: that richer stack is still true.
                thread.stack_at = at
                continue
            changed = thread.stack is None or stack is None or (
                stack_key(stack) != stack_key(thread.stack)
            )
            if not changed and thread.cpu_at > thread.stack_at:
                # The same stack as the last dump, but it made progress in between (a pool
                # thread caught twice on the same line of two different requests): it has
                # been on this stack only since it last ran, not since the first dump.
                thread.unchanged_since = thread.moved_at
            if changed:
                if thread.stack is not None and thread.moved_at <= thread.stack_at:
                    # /proc saw no run since the last dump, yet the stack changed: it ran
                    # inside a dump's re-baselined window. Count it as running until now.
                    thread.moved_at = at
                # It has not run since moved_at, so this stack has been its stack since then.
                thread.unchanged_since = thread.moved_at
            shape = spin_shape(stack) if stack is not None else None
            if (
                shape != thread.shape
                or thread.shape_since is None
                or thread.hot_since is None
                or thread.shape_since < thread.hot_since
            ):
                thread.shape_since = at  # a new shape, or the first look in this hot spell
            thread.shape = shape
            thread.stack = stack
            thread.idle = stack is not None and self.catalog.idle_rule(stack) is not None
            thread.stack_at = at
            thread.dumped_point = thread.activity.blocked_at  # refined by the re-scan after it
            if stack is not None and tid == snapshot.worker.pid:
                # The main thread serves requests in every worker class but gthread (sync,
                # gevent's hub, an asyncio event loop such as UvicornWorker's), including
                # one whose frames do not say (gevent shows the running greenlet's).
                thread.request = track.kind != "gthread"
            elif stack is not None and not thread.request:
                thread.request = _serves_requests(stack, track.kind)
        track.last_dump_at = at
        if snapshot.native:
            track.last_native_at = at
            track.want_native = False

    def plan(self, now: float) -> list[tuple[WorkerRef, DumpKind]]:
        """Which workers need a py-spy dump this cycle, and of which kind: most urgent first
        (stuck and role threads to re-check, then quiet threads whose stack is unknown, then
        first looks and refreshes, the longest-unseen worker first), within the budget of
        `max_dumps_per_minute`; what does not fit waits for a later cycle (`deferred`)."""
        s = self.settings
        wanted: list[tuple[int, float, WorkerRef, DumpKind]] = []
        for ref, track in self._workers.items():
            if track.calm(now) or not track.dumpable:
                continue  # no news, and nothing comes due yet (or no dump can work)
            if any(t.write_seen for t in track.threads.values()):
                # A thread blocked writing to a pipe or socket, and a dump has seen it there:
                # its stack is known while it stays, and every further dump could cut its
                # write short. No re-check, native refresh or refresh while it sits there
                # (the incident's evidence dump is the Monitor's, one per incident).
                continue
            threads = track.threads.values()
            quiet = [t for t in threads if t.quiet(now) >= s.suspect_after]
            watched = track.stuck_tids | track.role_tids
            # A thread we called stuck (or that fills a role) was woken away from where it was
            # dumped: re-check it rather than let the verdict flap. At most once per
            # suspect_after: a held verdict stands until then.
            recheck = now - track.last_dump_at >= s.suspect_after and any(
                not t.current for tid, t in track.threads.items() if tid in watched
            )
            # Quiet for a while and we have not seen its stack since it last ran: a suspect
            # when we knew its stack before (it moved, then stopped), a first look when not.
            unseen = any(not t.current and t.stack is not None for t in quiet)
            never_seen = any(t.stack is None and t.stack_at == -math.inf for t in quiet)
            # Hot for a while: look, then look again half of stuck_after later (the same
            # functions both times make it spinning), then every stuck_after while it spins.
            spin_gap = max(s.suspect_after, (s.stuck_after - s.suspect_after) / 2)
            spin = any(
                t.hot_since is not None
                and now - t.hot_since >= s.suspect_after
                and (
                    t.stack_at < t.hot_since
                    or now - t.stack_at >= (s.stuck_after if tid in track.spin_tids else spin_gap)
                )
                for tid, t in track.threads.items()
            )
            # Quiet, busy-looking, and we only have its Python frames: the native ones tell
            # whether it is inside libpq or OpenSSL.
            needs_native = any(
                t.current and t.stack is not None and not t.stack.native and not t.idle
                for t in quiet
            )
            native = (
                s.native
                and track.native_works
                and (needs_native or track.want_native)
                and now - track.last_native_at >= s.native_gap
            )
            kind = DumpKind.NATIVE if native else DumpKind.PYTHON
            # A worker that has lived stuck_after with a thread quiet where no dump has seen
            # it: as suspect as one that moved and stopped (a respawned worker hanging again
            # must not wait behind the budget's share for first looks). Short-lived workers
            # (churn) stay first looks.
            long_unseen = never_seen and now - track.seen_at >= s.stuck_after
            if (track.want_native and native) or recheck:
                priority = 0
            elif native or unseen or spin or long_unseen:
                priority = 1
            elif never_seen or track.last_dump_at == -math.inf:
                priority = 2  # a first look
            elif now - track.last_dump_at >= s.dump_interval and any(
                not t.current for t in threads
            ):
                priority = 3  # threads that keep running unseen
            else:
                continue
            wanted.append((priority, track.last_dump_at, ref, kind))
        wanted.sort()
        while self._dumped_at and now - self._dumped_at[0] >= 60.0:
            self._dumped_at.popleft()
        room = max(0, s.max_dumps_per_minute - len(self._dumped_at))
        # Re-checks and suspects are held back only by the budget. First looks and refreshes
        # also by a per-cycle share (a burst of new workers must not stretch one cycle), and
        # they leave a third of the budget to suspects: a worker that respawns every second
        # must not delay the dump that tells a hang.
        per_cycle = max(4, math.ceil(s.max_dumps_per_minute * s.interval / 60.0))
        urgent = sum(1 for w in wanted if w[0] <= 1)
        reserve = s.max_dumps_per_minute // 3
        rest = max(0, min(room - urgent - reserve, per_cycle - urgent))
        # Never more than are wanted: the budget counts dumps that will run, not the share.
        take = min(room, urgent + rest, len(wanted))
        self.deferred += max(0, len(wanted) - take)
        # Counted when planned, not when done: a dump of a worker that exited meanwhile still
        # ran py-spy. (An incident's evidence dump is not planned: one per incident.)
        self._dumped_at.extend([now] * take)
        return [(ref, kind) for _, _, ref, kind in wanted[:take]]

    def _classify(
        self, thread: _ThreadTrack, now: float, was_stuck: bool
    ) -> tuple[ThreadState, float]:
        stack = thread.stack
        if stack is None:
            # No Python stack (not dumped yet, or a native-only thread): never called stuck.
            state = ThreadState.RUNNING if thread.activity.state == "R" else ThreadState.IDLE
            return state, 0.0
        if thread.hot_since is not None:
            # On a CPU scan after scan. Spinning once it has been so for stuck_after and two
            # dumps at least half that apart caught the same functions; else simply running.
            s = self.settings
            hot_for = now - thread.hot_since
            if (
                hot_for >= s.stuck_after
                and thread.shape_since is not None
                and thread.shape_since >= thread.hot_since
                and thread.stack_at - thread.shape_since >= (s.stuck_after - s.suspect_after) / 2
            ):
                return ThreadState.SPINNING, hot_for
            return ThreadState.RUNNING, 0.0
        if thread.idle:
            return ThreadState.IDLE, 0.0
        if thread.current or (was_stuck and thread.held):
            # Not run since the dump (or only woken, and a re-dump is planned): the stack is
            # still the one we saw.
            unchanged = now - thread.unchanged_since
        elif thread.cpu_at > thread.stack_at:
            # It made progress since its last dump: that stack is history, and whatever it
            # waits on now has not been seen. Never stuck on a stack it has left; the plan
            # re-dumps it once it is quiet.
            return ThreadState.RUNNING, 0.0
        else:
            # Woken since, without progress: we only know the stack up to the last dump.
            unchanged = thread.stack_at - thread.unchanged_since
        stalled = min(unchanged, now - thread.cpu_at)
        if stalled >= self.settings.stuck_after:
            return ThreadState.STUCK, stalled
        return ThreadState.RUNNING, 0.0

    def judge(self, now: float) -> tuple[WorkerReport, ...]:
        """Classify every thread, match signatures, and give each worker a verdict.

        Reports are reused while nothing about them changed, so a quiet worker costs a few
        comparisons a cycle and no new objects."""
        reports = []
        for ref, track in sorted(self._workers.items()):
            if track.report is not None and track.calm(now):
                reports.append(track.report)  # no news, and time alone changes nothing yet
                continue
            threads: list[ThreadReport] = []
            any_stuck = any_spin = False
            for tid, thread in sorted(track.threads.items()):
                state, stuck_for = self._classify(thread, now, tid in track.stuck_tids)
                report = thread.report
                if (
                    report is None
                    or report.state is not state
                    or report.stuck_for != stuck_for
                    or report.stack is not thread.stack
                    or report.request != thread.request
                ):
                    report = thread.report = ThreadReport(
                        tid=tid,
                        name=thread.stack.name if thread.stack is not None else None,
                        state=state,
                        request=thread.request,
                        stuck_for=stuck_for,
                        stack=thread.stack,
                    )
                threads.append(report)
                any_stuck = any_stuck or state is ThreadState.STUCK
                any_spin = any_spin or state is ThreadState.SPINNING
            stuck = (
                frozenset(t.tid for t in threads if t.state is ThreadState.STUCK)
                if any_stuck
                else frozenset()
            )
            if stuck - track.stuck_tids:
                track.want_native = True
            track.stuck_tids = stuck
            track.spin_tids = (
                frozenset(t.tid for t in threads if t.state is ThreadState.SPINNING)
                if any_spin
                else frozenset()
            )
            if not stuck:
                track.proof = None  # read again when something is stuck again
            findings = (
                self._match(track, threads, now) if stuck or track.spin_tids else ()
            )
            findings = tuple(f for f in findings if _counts(ref, f))
            track.role_tids = frozenset(t.tid for f in findings for _, t in f.threads)
            verdict = _verdict(threads, findings)
            last = track.report
            if (
                last is None
                or last.state is not verdict
                or last.findings != findings
                or len(last.threads) != len(threads)
                or any(a is not b for a, b in zip(last.threads, threads, strict=True))
            ):
                last = track.report = WorkerReport(ref, verdict, tuple(threads), findings)
            track.settle(self.settings)
            reports.append(last)
        return tuple(reports)

    def _candidates(
        self, track: _WorkerTrack, threads: list[ThreadReport], now: float
    ) -> tuple[list[tuple[ThreadReport, Candidate]], list[Candidate]]:
        """Threads that may fill a signature's role (with what /proc says of each), and every
        other thread with a stack (for roles that must be absent).

        A role is filled only by a thread whose stack is its stack *now*: it has not run since
        the dump, nor for a while (a busy HTTPS thread caught mid-call by one dump is not
        "inside OpenSSL"). A thread already in a role keeps it while only woken (held), so
        someone else's ptrace does not make the verdict flap."""
        candidates: list[tuple[ThreadReport, Candidate]] = []
        others: list[Candidate] = []
        for report in threads:
            thread = track.threads[report.tid]
            if thread.stack is None:
                continue
            in_role = report.tid in track.role_tids
            stuck = report.state is ThreadState.STUCK
            spinning = report.state is ThreadState.SPINNING
            settled = (
                thread.current
                and (thread.quiet(now) >= self.settings.suspect_after or stuck or in_role)
            ) or (thread.held and in_role)
            candidate = Candidate(thread.stack, thread.activity, stuck, spinning)
            if settled or spinning:
                candidates.append((report, candidate))
            else:
                others.append(candidate)
        return candidates, others

    def _match(
        self, track: _WorkerTrack, threads: list[ThreadReport], now: float
    ) -> tuple[Finding, ...]:
        candidates, others = self._candidates(track, threads, now)
        if not any(c.stuck or c.spinning for _, c in candidates):
            return ()
        pool = [c for _, c in candidates]
        findings = []
        for signature in self.catalog.signatures:
            assigned = self.catalog.assign_roles(signature, pool, others)
            if assigned is not None:
                present = [role for role in signature.roles if not role.absent]
                pairs = zip(present, assigned, strict=True)
                roles = tuple((role.name, candidates[i][0]) for role, i in pairs)
                findings.append(Finding(signature, roles))
        return (*findings, *self._proven(track, threads, findings))

    def _proven(
        self, track: _WorkerTrack, threads: list[ThreadReport], found: list[Finding]
    ) -> list[Finding]:
        """Findings of a lock proof: a cycle of mutex waits, or a mutex whose owner is gone,
        among stuck threads; left out where a deadlock-class finding from frames names the
        same threads (the more specific entry)."""
        proof = track.proof
        if proof is None or not proof.proven:
            return []
        by_tid = {t.tid: t for t in threads if t.state is ThreadState.STUCK}
        named = {
            t.tid
            for f in found
            if f.signature.hang_class is HangClass.DEADLOCK
            for _, t in f.threads
        }
        waits = {waiter: (address, owner) for waiter, address, owner in proof.edges}
        findings = []
        for kind, groups in (
            ("cycle", proof.cycles),
            ("orphan", tuple((waiter,) for waiter, _ in proof.orphans)),
        ):
            signature = self.catalog.proven(kind)
            if signature is None:
                continue
            for tids in groups:
                if not all(tid in by_tid for tid in tids) or set(tids) <= named:
                    continue
                roles = []
                for tid in tids:
                    address, owner = waits.get(tid, (0, 0))
                    gone = "" if owner in track.threads else ", gone"
                    roles.append((f"waits for {owner}{gone} (mutex {address:#x})", by_tid[tid]))
                findings.append(Finding(signature, tuple(roles)))
        return findings


#: The worker verdict a finding of each class gives.
VERDICT_OF_CLASS = {
    HangClass.DEADLOCK: WorkerState.DEADLOCKED,
    HangClass.STALL: WorkerState.STUCK,
    HangClass.BOUNDED_STALL: WorkerState.STUCK,
    HangClass.SPIN: WorkerState.SPINNING,
}
_SEVERITY = (WorkerState.OK, WorkerState.SPINNING, WorkerState.STUCK, WorkerState.DEADLOCKED)


def _counts(worker: WorkerRef, finding: Finding) -> bool:
    """A deadlock always counts; a stall or a spin only when a request thread or the main
    thread fills one of its roles. A background thread stuck alone (an APM harvest in a dead
    handshake) is shown as a stuck thread, but the worker still serves."""
    return finding.signature.hang_class is HangClass.DEADLOCK or any(
        t.request or t.tid == worker.pid for _, t in finding.threads
    )


def _verdict(threads: Sequence[ThreadReport], findings: Sequence[Finding]) -> WorkerState:
    """The worker's verdict: the gravest of its findings' classes (only a deadlock-class
    finding makes it deadlocked) and of its request threads' states."""
    verdict = WorkerState.OK
    for finding in findings:
        verdict = max(verdict, VERDICT_OF_CLASS[finding.signature.hang_class],
                      key=_SEVERITY.index)  # fmt: skip
    for thread in threads:
        if thread.request and thread.state is ThreadState.STUCK:
            verdict = max(verdict, WorkerState.STUCK, key=_SEVERITY.index)
        elif thread.request and thread.state is ThreadState.SPINNING:
            verdict = max(verdict, WorkerState.SPINNING, key=_SEVERITY.index)
    return verdict


def _allowance(elapsed: float, resolution_ns: int) -> float:
    """CPU a blocked thread may accrue over `elapsed` seconds without it being progress."""
    if resolution_ns > 1:  # clock ticks: a ptrace stop can cost a tick of system time
        return CPU_NOISE_TICKS * resolution_ns
    return IDLE_ALLOWANCE_NS + IDLE_RATE_NS * max(elapsed, 0.0)


def _worker_kind(main: ThreadStack) -> str | None:
    files = [frame.file for frame in main.frames if not frame.native]
    for file in files:
        found = _WORKER_KIND.search(file)
        if found:
            return found.group(1)
    if any(_ASYNCIO_KIND.search(file) for file in files):
        return "asyncio"  # its main thread serves requests, as gevent's hub does
    return None


def _serves_requests(stack: ThreadStack, kind: str | None) -> bool:
    for frame in stack.frames:
        if frame.native:
            continue
        if "gunicorn/workers/" in frame.file and _HANDLES_REQUEST.search(frame.function):
            return True
        if (
            kind == "gthread"
            and frame.file.endswith("concurrent/futures/thread.py")
            and _POOL_WORKER.search(frame.function)
        ):
            return True  # gthread's pool threads are its request threads
    return False


def request_capacity(reports: Iterable[WorkerReport]) -> float | None:
    """Request threads not stuck / request threads; None when no request thread is known."""
    total = stuck = 0
    for report in reports:
        for thread in report.threads:
            if thread.request:
                total += 1
                stuck += thread.state is ThreadState.STUCK
    return (total - stuck) / total if total else None


def incident_id(worker: WorkerRef, signature: str, at: float) -> str:
    """A readable, URL-safe, unique-enough id: time, worker pid, signature."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))
    return f"{stamp}-{worker.pid}-{signature}"


class IncidentBook:
    """Opens one incident per (worker, signature) and resolves it when the worker recovers.

    A deadlock opens one at once. A named stall or spin opens one once it has lasted
    `stuck_incident_after` seconds, and so does a worker stuck with no signature (signature
    NO_SIGNATURE). Only deadlock-class incidents count in `totals`; every named one in `named`."""

    def __init__(self, *, stuck_incident_after: float = math.inf) -> None:
        self.stuck_incident_after = stuck_incident_after
        self._open: dict[tuple[WorkerRef, str], Incident] = {}
        self.totals: Counter[str] = Counter()  # deadlock incidents, by signature
        self.named: Counter[str] = Counter()  # incidents of every named hang, by signature

    @property
    def open(self) -> tuple[Incident, ...]:
        """Incidents not yet resolved, oldest first."""
        return tuple(sorted(self._open.values(), key=lambda i: (i.first_seen, i.id)))

    def _opened(self, incident: Incident) -> Incident:
        self._open[(incident.worker, incident.signature_name)] = incident
        if incident.signature is not None:
            self.named[incident.signature.name] += 1
            if incident.signature.hang_class is HangClass.DEADLOCK:
                self.totals[incident.signature.name] += 1
        return incident

    def note(self, incident_id: str, event: RemediationEvent) -> Incident | None:
        """Add a remediation event to the open incident with this id; the updated incident,
        or None when it is not open (any more)."""
        for key, incident in self._open.items():
            if incident.id == incident_id:
                updated = replace(incident, remediation=(*incident.remediation, event))
                self._open[key] = updated
                return updated
        return None

    def update(
        self, reports: Iterable[WorkerReport], now: float
    ) -> tuple[list[Incident], list[Incident]]:
        """Return (opened, resolved) incidents for this cycle's reports."""
        by_worker: Mapping[WorkerRef, WorkerReport] = {r.worker: r for r in reports}
        opened = []
        for report in by_worker.values():
            for finding in report.findings:
                # A deadlock never ends by itself: an incident at once. A stall or a spin may
                # (a long query, a long computation): an incident only once it has lasted
                # stuck_incident_after, as for a worker stuck with no name.
                if finding.signature.hang_class is not HangClass.DEADLOCK and max(
                    (t.stuck_for for _, t in finding.threads), default=0.0
                ) < self.stuck_incident_after:
                    continue
                if (report.worker, finding.signature.name) not in self._open:
                    opened.append(self._opened(Incident(
                        id=incident_id(report.worker, finding.signature.name, now),
                        worker=report.worker,
                        verdict=VERDICT_OF_CLASS[finding.signature.hang_class],
                        signature=finding.signature,
                        first_seen=now,
                        threads=finding.threads,
                    )))  # fmt: skip
            stuck = [t for t in report.threads if t.state is ThreadState.STUCK]
            if (
                report.state is WorkerState.STUCK
                and not report.findings  # a named stall has its own incident
                and max((t.stuck_for for t in stuck), default=0.0) >= self.stuck_incident_after
                and (report.worker, NO_SIGNATURE) not in self._open
            ):
                opened.append(self._opened(Incident(
                    id=incident_id(report.worker, NO_SIGNATURE, now),
                    worker=report.worker,
                    verdict=WorkerState.STUCK,
                    signature=None,
                    first_seen=now,
                    threads=tuple(("stuck", t) for t in stuck),
                )))  # fmt: skip
        resolved = []
        for key, incident in list(self._open.items()):
            current = by_worker.get(incident.worker)
            # Held open while any thread stays stuck, so a flapping match is one incident.
            if current is None or current.state is WorkerState.OK:
                del self._open[key]
                resolved.append(replace(incident, resolved_at=now))
        return opened, resolved
