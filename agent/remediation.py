"""Remediation policy ("harakiri for Gunicorn"): which deadlocked worker to signal, when, and
whether a rate limit forbids it. Pure: the clock is an argument; agent.signaller sends.

Off by default. Per incident of a *deadlocked* worker (a deadlock-class signature or a proven
lock cycle; never a worker merely stuck or spinning) that has stayed deadlocked for longer than
`grace` seconds since the incident opened (its evidence was stored then), one SIGABRT (gunicorn's
`worker_abort` hook and its log line run where the worker's main thread still can), then, on the
first review `abort_wait` seconds later, one SIGKILL if the same process is still alive.

The follow-up is a later review, not a timer: `Monitor.cycle` calls `review` once a cycle, so the
loop never sleeps on a worker, every signal goes out from the loop's thread after a fresh
identity check, and the incident, the store and the counters are only ever touched by that
thread. The price is at most one `--interval` of lateness for the SIGKILL.

**Slots.** Gunicorn hides its worker slots (`Arbiter.WORKERS` is keyed by pid; `worker.age` is
not visible from outside). A slot here is a line of succession: a worker the agent signalled,
then the first worker its master starts after that (its replacement), then that one's
replacement, and so on. Every other new worker starts a slot of its own. So a fault that makes
each replacement deadlock again is stopped by `max_per_slot` per slot, whichever worker it hits,
and `max_per_host` caps all slots of every master together, both per sliding `window`.
A dry run counts its would-be signals against the same limits, so it previews them.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from agent.types import Incident, RemediationEvent, WorkerRef, WorkerReport, WorkerState


class Mode(enum.StrEnum):
    OFF = "off"
    DRY_RUN = "dry-run"
    KILL = "kill"


class Action(enum.StrEnum):
    ABORT = "abort"  # SIGABRT: gunicorn's handle_abort runs worker_abort, then exits
    KILL = "kill"  # SIGKILL: when SIGABRT did not end it (its main thread is wedged too)


#: deadlock_agent_remediations_total{result}: done (signal sent), dry_run (would have been
#: sent), rate_limited (a limit forbade it; only alerting), gone (the process had exited; for
#: kill: SIGABRT was enough), identity_changed (the pid is another process now: pid reuse),
#: refused (not the child of a discovered gunicorn master, or a master itself), failed (the
#: kernel refused the signal, e.g. EPERM).
RESULTS = ("done", "dry_run", "rate_limited", "gone", "identity_changed", "refused", "failed")
#: Every (action, result) the agent can count; each is exported, 0 until it happens.
COMBINATIONS: tuple[tuple[str, str], ...] = tuple(
    (action.value, result)
    for action in Action
    for result in RESULTS
    if not (action is Action.KILL and result == "rate_limited")  # a follow-up is never limited
)


@dataclass(frozen=True)
class RemediationSettings:
    """--remediate and its rails."""

    mode: Mode = Mode.OFF
    grace: float = 30.0
    abort_wait: float = 5.0
    max_per_slot: int = 3
    max_per_host: int = 10
    window: float = 3600.0


class Verdict(enum.StrEnum):
    GO = "go"  # send it (or, in a dry run, say so)
    RATE_LIMITED = "rate_limited"
    REFUSED = "refused"


@dataclass(frozen=True)
class Step:
    """One signal the policy wants sent now (or refuses, saying why)."""

    action: Action
    worker: WorkerRef
    incident_id: str
    signature: str
    deadlocked_for: float  # seconds since the incident opened
    verdict: Verdict = Verdict.GO
    reason: str = ""  # why not, for RATE_LIMITED and REFUSED


@dataclass
class _Pending:
    worker: WorkerRef
    incident_id: str
    signature: str
    first_seen: float
    due: float


class Remediator:
    """The per-cycle review: `review` says what to do, `record` is told what came of it."""

    def __init__(self, settings: RemediationSettings) -> None:
        self.settings = settings
        self.counts: Counter[tuple[str, str]] = Counter(dict.fromkeys(COMBINATIONS, 0))
        self._acted: set[str] = set()  # incidents whose SIGABRT was decided (sent or not)
        self._limited: set[str] = set()  # incidents already told they are rate-limited
        self._pending: dict[str, _Pending] = {}  # incident id -> SIGKILL follow-up
        self._history: deque[tuple[float, str]] = deque()  # (when, slot) of each SIGABRT
        self._slot_of: dict[WorkerRef, str] = {}
        self._vacant: dict[int, deque[str]] = {}  # master -> slots whose worker was signalled
        self._serial = itertools.count(1)

    @property
    def dry_run(self) -> bool:
        """Whether signals are only described, never sent."""
        return self.settings.mode is Mode.DRY_RUN

    def slot(self, worker: WorkerRef) -> str:
        """The worker's slot ("<master pid>/<n>"); assigned when first seen."""
        found = self._slot_of.get(worker)
        if found is None:
            vacant = self._vacant.get(worker.master_pid)
            # A new worker of a master whose signalled worker has no successor yet takes over
            # that slot (gunicorn spawns the replacement once it reaps the dead one).
            found = vacant.popleft() if vacant else f"{worker.master_pid}/{next(self._serial)}"
            self._slot_of[worker] = found
        return found

    def pending(self, incident_id: str) -> bool:
        """Whether a SIGKILL follow-up is still to come for this incident."""
        return incident_id in self._pending

    def review(
        self,
        *,
        now: float,
        masters: Collection[int],
        workers: Iterable[WorkerRef],
        reports: Sequence[WorkerReport],
        incidents: Sequence[Incident],
    ) -> list[Step]:
        """What to do this cycle: due SIGKILL follow-ups, then SIGABRTs for workers deadlocked
        past the grace. Rate-limited and refused steps come once per incident."""
        if self.settings.mode is Mode.OFF:
            return []
        live = list(workers)
        for worker in live:
            self.slot(worker)
        current = set(live)
        self._slot_of = {w: s for w, s in self._slot_of.items() if w in current}
        self._vacant = {m: q for m, q in self._vacant.items() if m in masters and q}
        self._expire(now)
        steps = [
            Step(Action.KILL, p.worker, p.incident_id, p.signature, now - p.first_seen)
            for p in self._pending.values()
            if p.due <= now
        ]
        state = {r.worker: r.state for r in reports}
        open_ids = set()
        for incident in incidents:
            open_ids.add(incident.id)
            if (
                incident.id in self._acted
                or incident.resolved_at is not None
                or incident.verdict is not WorkerState.DEADLOCKED
                # Deadlocked now, not merely still stuck under an incident held open.
                or state.get(incident.worker) is not WorkerState.DEADLOCKED
                or now - incident.first_seen <= self.settings.grace
            ):
                continue
            step = self._abort(incident, now, masters)
            if step.verdict is Verdict.RATE_LIMITED:
                if incident.id in self._limited:
                    continue  # said once; the deadlock alert keeps firing meanwhile
                self._limited.add(incident.id)
            steps.append(step)
        # Forget incidents that are over (bounded memory); keep those with a follow-up due.
        self._acted &= open_ids | set(self._pending)
        self._limited &= open_ids
        return steps

    def _abort(self, incident: Incident, now: float, masters: Collection[int]) -> Step:
        worker = incident.worker
        step = Step(Action.ABORT, worker, incident.id, incident.signature_name,
                    now - incident.first_seen)  # fmt: skip
        if worker.pid in masters:
            return _refuse(step, f"pid {worker.pid} is a gunicorn master")
        if worker.master_pid not in masters:
            return _refuse(step, f"its master {worker.master_pid} is not a discovered master")
        s = self.settings
        slot = self.slot(worker)
        in_slot = sum(1 for _, used in self._history if used == slot)
        if in_slot >= s.max_per_slot:
            return _limit(
                step,
                f"rate limit: {in_slot} kill(s) in worker slot {slot} in the "
                f"last {s.window:g}s (--remediate.max-per-slot {s.max_per_slot})",
            )
        if len(self._history) >= s.max_per_host:
            return _limit(
                step,
                f"rate limit: {len(self._history)} kill(s) on this host in the "
                f"last {s.window:g}s (--remediate.max-per-host {s.max_per_host})",
            )
        return step  # fmt: skip

    def _expire(self, now: float) -> None:
        while self._history and self._history[0][0] <= now - self.settings.window:
            self._history.popleft()

    def record(self, step: Step, result: str, now: float, detail: str = "") -> RemediationEvent:
        """Count what came of a step, and schedule or drop what follows from it."""
        if result not in RESULTS:
            raise ValueError(f"unknown remediation result {result!r}")
        self.counts[(step.action.value, result)] += 1
        if step.action is Action.KILL:
            self._pending.pop(step.incident_id, None)
        elif result != Verdict.RATE_LIMITED:
            self._acted.add(step.incident_id)  # one SIGABRT decision per incident, whatever came
            if result in ("done", "dry_run"):
                slot = self.slot(step.worker)
                self._history.append((now, slot))
                self._pending[step.incident_id] = _Pending(
                    step.worker, step.incident_id, step.signature,
                    now - step.deadlocked_for, now + self.settings.abort_wait,
                )  # fmt: skip
                if result == "done":  # its replacement inherits the slot
                    self._vacant.setdefault(step.worker.master_pid, deque()).append(slot)
        return RemediationEvent(step.action.value, result, now, step.worker.pid, detail)


def _refuse(step: Step, reason: str) -> Step:
    return Step(step.action, step.worker, step.incident_id, step.signature, step.deadlocked_for,
                Verdict.REFUSED, reason)  # fmt: skip


def _limit(step: Step, reason: str) -> Step:
    return Step(step.action, step.worker, step.incident_id, step.signature, step.deadlocked_for,
                Verdict.RATE_LIMITED, reason)  # fmt: skip
