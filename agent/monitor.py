"""The sampling loop: discovery -> /proc scan -> (py-spy when needed) -> analysis -> report.

It owns no policy: when to dump is Tracker.plan, what is stuck is Tracker.judge. It owns the I/O
and the bookkeeping (counters, the last published report) and never lets one bad worker or one bad
sample stop the loop.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Protocol

from agent import locks, procfs
from agent.analysis import IncidentBook, Tracker
from agent.discovery import running
from agent.errors import (
    ERROR_REASONS,
    AgentError,
    NativeUnwindFailed,
    NotPython,
    ProcessVanished,
    PtraceDenied,
    PySpyBadOutput,
    PySpyFailed,
    PySpyStopped,
    PySpyTimeout,
)
from agent.incidents import IncidentStore
from agent.remediation import Action, Remediator, Step, Verdict
from agent.render import incident_record, incident_text
from agent.sampler import Sampler
from agent.signaller import Signaller
from agent.types import (
    CycleReport,
    DumpKind,
    Incident,
    ProcSample,
    RemediationEvent,
    StackSnapshot,
    WorkerRef,
    WorkerReport,
)
from agent.versions import Versions

log = logging.getLogger(__name__)


class WorkerSource(Protocol):
    """Finds the workers to watch (agent.discovery.Discovery in production)."""

    def workers(self) -> tuple[tuple[int, ...], tuple[WorkerRef, ...]]: ...

    def forget(self, pid: int) -> None: ...


class StackSource(Protocol):
    """Takes stack dumps (agent.sampler.Sampler in production: py-spy or the probe)."""

    def dump(self, worker: WorkerRef, *, native: bool) -> StackSnapshot: ...


class ProcSource(Protocol):
    """Reads workers' threads from /proc (agent.procfs.Scanner, or a Sampler routing some
    workers to their in-process probe)."""

    @property
    def precise(self) -> bool: ...

    def scan(self, worker: WorkerRef, *, now: float) -> ProcSample: ...

    def retain(self, workers: Iterable[WorkerRef]) -> None: ...

    def forget(self, worker: WorkerRef) -> None: ...


IncidentListener = Callable[[Incident], None]
#: Told of each remediation event, with the incident as it now stands (the Slack follow-up).
RemediationListener = Callable[[Incident, RemediationEvent], None]

#: deadlock_agent_samples_total{method} of a dump not taken by blocking py-spy.
METHOD_OF_SOURCE = {
    "py-spy --nonblocking": "pyspy_nonblocking",
    "probe": "probe",
    "probe-watchdog": "probe",
}

#: Every reason deadlock_agent_sample_errors_total counts: the errors' own, plus a bug caught at
#: the top of the loop and a failure to write incident evidence.
SAMPLE_ERROR_REASONS = (*ERROR_REASONS, "internal", "incident_store")


def log_incident(incident: Incident) -> None:
    """The default listener: one structured line per incident event, then readable text."""
    record = incident_record(incident)
    log.warning("%s %s", record["event"], json.dumps(record, sort_keys=True))
    if incident.resolved_at is None:
        log.warning("%s", incident_text(incident))


def log_remediation(step: Step, event: RemediationEvent, worker: WorkerRef) -> None:
    """One line per remediation action: what was (or would be) sent, to whom, or why not."""
    what = (f"pid {worker.pid} (create_time {worker.create_time:.2f}, master "
            f"{worker.master_pid}, signature {step.signature}, incident {step.incident_id}, "
            f"deadlocked {step.deadlocked_for:.0f}s)")  # fmt: skip
    signal = "SIGABRT" if step.action is Action.ABORT else "SIGKILL"
    if event.result == "dry_run":
        log.warning("remediation dry-run: would send %s to %s", signal, what)
    elif event.result == "done":
        log.warning("remediation: sent %s to %s", signal, what)
    elif event.result == "gone" and step.action is Action.KILL:
        log.warning("remediation: no SIGKILL needed, %s exited after SIGABRT", what)
    else:
        log.warning("remediation: not sending %s to %s: %s (%s)", signal, what,
                    event.result, event.detail)  # fmt: skip


class Monitor:
    """Runs cycles and publishes the last CycleReport for the metrics and health endpoints."""

    def __init__(
        self,
        *,
        workers: WorkerSource,
        stacks: StackSource | None = None,
        tracker: Tracker,
        sampler: Sampler | None = None,
        interval: float = 1.0,
        proc: str = procfs.DEFAULT_PROC,
        clock: Callable[[], float] = time.time,
        listeners: Sequence[IncidentListener] = (log_incident,),
        incidents: IncidentBook | None = None,
        store: IncidentStore | None = None,
        remediator: Remediator | None = None,
        signaller: Signaller | None = None,
        remediation_listeners: Sequence[RemediationListener] = (),
        alive: Callable[[WorkerRef], bool] = running,
    ) -> None:
        self.workers = workers
        self.alive = alive
        if (stacks is None) == (sampler is None):
            raise ValueError("give a stack source or a sampler, not both")
        self.sampler = sampler
        # A Sampler is both: it routes each worker to py-spy + /proc, or to its probe.
        self.stacks: StackSource
        if sampler is not None:
            self.stacks = sampler
        elif stacks is not None:
            self.stacks = stacks
        self.tracker = tracker
        self.interval = interval
        self.proc = proc
        self.scanner: ProcSource = sampler if sampler is not None else procfs.Scanner(proc)
        self.clock = clock
        self.listeners = list(listeners)
        self.incidents = incidents if incidents is not None else IncidentBook()
        self.store = store
        self.remediator = remediator
        self.signaller = signaller if signaller is not None else Signaller()
        self.remediation_listeners = list(remediation_listeners)
        # Resolved incidents whose SIGKILL follow-up is still to come, by id: its outcome is
        # added to their record too.
        self._awaiting: dict[str, Incident] = {}
        self.last_report: CycleReport | None = None
        self._samples: Counter[str] = Counter()
        self._seconds: dict[str, float] = {}
        self._errors: Counter[str] = Counter(dict.fromkeys(SAMPLE_ERROR_REASONS, 0))
        self._warned: set[str] = set()  # reasons already logged (bounded by the reasons)

    def _error(self, err: AgentError, *, note: str = "") -> None:
        self._errors[err.reason] += 1
        if isinstance(err, ProcessVanished) and not note:
            log.debug("%s", err)  # a worker exiting is normal control flow
            return
        # One line per cause (reason): under churn every failure has a new pid, and a
        # persistent problem must not flood the log every second. The counter counts them all.
        if err.reason in self._warned:
            log.debug("%s%s", err, note)
            return
        self._warned.add(err.reason)
        (log.error if isinstance(err, PtraceDenied) else log.warning)(
            "%s%s (logged once; deadlock_agent_sample_errors_total{reason=\"%s\"} counts "
            "every one)", err, note, err.reason,
        )  # fmt: skip

    def _vanished(self, ref: WorkerRef, err: ProcessVanished) -> bool:
        """A worker reported gone: forget it only when it really is (its pid not running, a
        zombie, or another process's); True when forgotten. py-spy's "No such file or
        directory" about a live worker (classify_failure) must not drop its state and its
        open incident: that would resolve the incident and open it again."""
        if self.alive(ref):
            self._error(err, note=f"; but worker {ref.pid} is still running: its state is kept")
            return False
        self._error(err)
        self._forget(ref)
        return True

    def _timed(self, method: str, started: float) -> None:
        self._samples[method] += 1
        self._seconds[method] = self._seconds.get(method, 0.0) + time.perf_counter() - started

    def cycle(self) -> CycleReport:
        """One pass over every worker; returns (and publishes) its report."""
        started = time.perf_counter()
        cpu_started = time.thread_time()
        masters, refs = self.workers.workers()
        self.tracker.retain(refs)
        self.scanner.retain(refs)
        complete = True
        for ref in refs:
            begun = time.perf_counter()
            try:
                sample: ProcSample = self.scanner.scan(ref, now=self.clock())
            except ProcessVanished as err:
                if not self._vanished(ref, err):
                    complete = False
                continue
            except AgentError as err:
                self._error(err)
                complete = False
                continue
            self._timed("proc", begun)
            self.tracker.observe_proc(sample)
        if self.sampler is not None:
            for missed in self.sampler.drain_errors():  # a silent probe, read around from outside
                self._error(missed)
        for ref, kind in self.tracker.plan(self.clock()):
            try:
                self._dump(ref, kind)
            except ProcessVanished as err:
                if not self._vanished(ref, err):
                    complete = False
            except (PySpyFailed, PySpyBadOutput, PySpyTimeout) as err:
                if not isinstance(err, PySpyStopped) and not self.alive(ref):
                    # The target exited mid-dump: py-spy's words for it vary ("Failed to find
                    # a python interpreter in the .data section", truncated JSON, a hang).
                    self._vanished(ref, ProcessVanished(f"exited during a dump: {err}",
                                                        pid=ref.pid))  # fmt: skip
                    continue
                if isinstance(err, NotPython):
                    # A non-Python process taken for a worker: no dump of it will ever work.
                    self.tracker.no_stacks(ref)
                self._error(err)
                complete = False
            except AgentError as err:
                self._error(err)
                complete = False
        for ref in self.tracker.lock_suspects():
            if self.sampler is not None and not self.sampler.sees_memory(ref):
                continue  # only its probe may look inside it
            # A thread stuck in a futex wait: read its worker's mutexes (owner tids) and let
            # agent.locks prove a cycle or an orphaned lock, or nothing.
            try:
                waits, live, elsewhere = procfs.read_lock_waits(ref.pid, proc=self.proc)
            except AgentError as err:
                self._error(err)
                continue
            self.tracker.observe_locks(ref, locks.prove(waits, live, alive_elsewhere=elsewhere))
        now = self.clock()
        reports = self.tracker.judge(now)
        opened, resolved = self.incidents.update(reports, now)
        for incident in opened:
            snapshot = self._capture(incident.worker)
            self._keep_evidence(incident, snapshot, self._versions(incident.worker))
            self._notify(incident)
        for incident in resolved:
            self._keep_evidence(incident, None)
            self._notify(incident)
            if self.remediator is not None and self.remediator.pending(incident.id):
                self._awaiting[incident.id] = incident
        if self.remediator is not None:
            # After judge and incidents: an incident's evidence is stored (at its opening,
            # above) before any signal, and the grace is measured on this cycle's clock.
            self._remediate(masters, refs, reports, now)
        report = CycleReport(
            finished_at=now,
            duration=time.perf_counter() - started,
            masters=masters,
            workers=reports,
            complete=complete,
            signatures=self.tracker.catalog.names,
            open_incidents=self.incidents.open,
            samples=dict(self._samples),
            sample_seconds=dict(self._seconds),
            sample_errors=dict(self._errors),
            incidents_total=dict(self.incidents.totals),
            hangs_total=dict(self.incidents.named),
            catalog=self.tracker.catalog.signatures,
            progress_resolution_ns=1 if self.scanner.precise else procfs.NS_PER_TICK,
            cycle_cpu=time.thread_time() - cpu_started,
            dumps_deferred=self.tracker.deferred,
            remediations=dict(self.remediator.counts) if self.remediator is not None else {},
        )
        self.last_report = report  # one reference swap: readers never see half a report
        return report

    def _remediate(
        self,
        masters: tuple[int, ...],
        refs: tuple[WorkerRef, ...],
        reports: Sequence[WorkerReport],
        now: float,
    ) -> None:
        """Review deadlocked workers; send (or describe) what the policy says is due."""
        assert self.remediator is not None  # noqa: S101 - only called with one
        steps = self.remediator.review(
            now=now, masters=masters, workers=refs, reports=reports, incidents=self.incidents.open
        )
        for step in steps:
            if step.verdict is not Verdict.GO:
                result, detail = step.verdict.value, step.reason
            elif self.remediator.dry_run:
                result, detail = "dry_run", ""
            else:
                # Identity (pid, create_time, parent) checked right before this very signal.
                result, detail = self.signaller.send(step.worker, step.action, masters)
            event = self.remediator.record(step, result, now, detail)
            log_remediation(step, event, step.worker)
            incident = self._note(step.incident_id, event)
            if incident is None:
                continue
            self._keep_evidence(incident, None)  # rewrite: the record says what was done
            for listener in self.remediation_listeners:
                try:
                    listener(incident, event)
                except Exception:
                    log.exception("remediation listener %r failed", listener)

    def _note(self, incident_id: str, event: RemediationEvent) -> Incident | None:
        """The incident with the event added: open in the book, or resolved but awaited."""
        updated = self.incidents.note(incident_id, event)
        if updated is None:
            resolved = self._awaiting.pop(incident_id, None)
            if resolved is None:
                return None
            updated = replace(resolved, remediation=(*resolved.remediation, event))
        assert self.remediator is not None  # noqa: S101
        if updated.resolved_at is not None and self.remediator.pending(incident_id):
            self._awaiting[incident_id] = updated
        return updated

    def _forget(self, ref: WorkerRef) -> None:
        self.tracker.forget(ref)
        self.scanner.forget(ref)
        self.workers.forget(ref.pid)

    def _dump(self, ref: WorkerRef, kind: DumpKind) -> StackSnapshot:
        """One py-spy dump, folded into the tracker, then a /proc re-baseline.

        A native dump py-spy cannot unwind (gevent's greenlet stacks: "UNW_EINVAL") is counted,
        and the worker is watched with Python frames only from then on."""
        begun = time.perf_counter()
        try:
            snapshot = self.stacks.dump(ref, native=kind is DumpKind.NATIVE)
        except NativeUnwindFailed as err:
            if kind is not DumpKind.NATIVE:
                raise
            self._error(err)
            log.warning("pid %s: native frames unavailable; using Python frames only", ref.pid)
            self.tracker.native_failed(ref)
            kind = DumpKind.PYTHON
            snapshot = self.stacks.dump(ref, native=False)
        if kind is DumpKind.NATIVE and not snapshot.native:
            # The sampler could not give native frames (py-spy --nonblocking, the probe):
            # plan Python dumps only for this worker from now on.
            self.tracker.native_failed(ref)
            kind = DumpKind.PYTHON
        self._timed(METHOD_OF_SOURCE.get(snapshot.source, kind.value), begun)
        self.tracker.observe_stacks(snapshot)
        try:
            # The dump itself stopped every thread: re-baseline their counters.
            baseline = self.scanner.scan(ref, now=self.clock())
        except AgentError:
            return snapshot  # the next cycle's scan will tell
        self.tracker.observe_proc(baseline, after_dump=True)
        return snapshot

    def _capture(self, worker: WorkerRef) -> StackSnapshot | None:
        """A full dump of the worker for the incident's evidence (every thread, native)."""
        kind = DumpKind.NATIVE if self.tracker.native_allowed(worker) else DumpKind.PYTHON
        try:
            return self._dump(worker, kind)
        except AgentError as err:
            self._error(err)
            return None

    def _versions(self, worker: WorkerRef) -> Versions | None:
        """What the worker maps, for the incident's evidence (only when there is a store)."""
        if self.store is None or (self.sampler and not self.sampler.sees_memory(worker)):
            return None
        return procfs.read_versions(worker.pid, proc=self.proc)

    def _keep_evidence(
        self,
        incident: Incident,
        snapshot: StackSnapshot | None,
        found: Versions | None = None,
    ) -> None:
        if self.store is None:
            return
        try:
            self.store.save(incident, snapshot, found)
        except OSError as err:
            self._errors["incident_store"] += 1
            log.error("cannot write incident %s to %s: %s", incident.id, self.store.directory,
                      err)  # fmt: skip

    def _notify(self, incident: Incident) -> None:
        for listener in self.listeners:
            try:
                listener(incident)
            except Exception:
                log.exception("incident listener %r failed", listener)

    def run(self, events: queue.SimpleQueue[int] | None = None) -> int | None:
        """Cycle every `interval` until an event (a signal number) arrives; return it."""
        events = events if events is not None else queue.SimpleQueue()
        next_at = time.monotonic()
        while True:
            try:
                self.cycle()
            except Exception:
                # The top of the loop is the one place that catches everything: the agent
                # must keep watching even when a cycle hits a bug.
                self._errors["internal"] += 1
                log.exception("sampling cycle failed; continuing")
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # a slow cycle: do not try to catch up with a burst
                next_at = time.monotonic()
                delay = 0.0
            try:
                return events.get(timeout=delay)
            except queue.Empty:
                continue


class MonitorThread(threading.Thread):
    """Runs a Monitor in the background (the demo, tests) until stop() is called."""

    def __init__(self, monitor: Monitor) -> None:
        super().__init__(name="deadlock-agent-monitor", daemon=True)
        self.monitor = monitor
        self.events: queue.SimpleQueue[int] = queue.SimpleQueue()

    def run(self) -> None:
        """Loop until stopped."""
        try:
            self.monitor.run(self.events)
        except BaseException:  # the loop catches a cycle's bugs; this is the last word
            log.exception("the sampling loop stopped; nothing is watched any more")

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end and wait for it."""
        self.events.put(0)
        self.join(timeout)
