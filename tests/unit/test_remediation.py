"""agent/remediation.py: the pure policy, driven by a fake clock. Who is eligible (deadlocked
only, past the grace), SIGABRT then SIGKILL, dry runs, rate limits per slot and per host per
window, and never a master."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import pytest

from agent.remediation import (
    COMBINATIONS,
    Action,
    Mode,
    RemediationSettings,
    Remediator,
    Step,
    Verdict,
)
from agent.render import incident_record, incident_text
from agent.slack import remediation_payload
from agent.types import (
    HangClass,
    Incident,
    RemediationEvent,
    Signature,
    WorkerRef,
    WorkerReport,
    WorkerState,
)

MASTER = 100
T0 = 1_700_000_000.0
DEADLOCK = Signature(name="libpq_ssl_with_https", summary="s", remedy="r", roles=())
STALL = Signature(name="tls_handshake_stall", summary="s", remedy="r", roles=(),
                  hang_class=HangClass.STALL)  # fmt: skip


def ref(pid: int, *, master: int = MASTER) -> WorkerRef:
    return WorkerRef(pid=pid, create_time=T0 - 1000 + pid, master_pid=master)


def incident(
    worker: WorkerRef, *, first_seen: float = T0, verdict: WorkerState = WorkerState.DEADLOCKED
) -> Incident:
    signature = DEADLOCK if verdict is WorkerState.DEADLOCKED else STALL
    return Incident(id=f"i-{worker.pid}-{first_seen:g}", worker=worker, verdict=verdict,
                    signature=signature, first_seen=first_seen, threads=())  # fmt: skip


def report(worker: WorkerRef, state: WorkerState = WorkerState.DEADLOCKED) -> WorkerReport:
    return WorkerReport(worker=worker, state=state, threads=())


def remediator(mode: Mode = Mode.KILL, **settings: float) -> Remediator:
    values = {"grace": 30.0, "abort_wait": 5.0, "max_per_slot": 3, "max_per_host": 10,
              "window": 3600.0, **settings}  # fmt: skip
    return Remediator(RemediationSettings(
        mode=mode, grace=values["grace"], abort_wait=values["abort_wait"],
        max_per_slot=int(values["max_per_slot"]), max_per_host=int(values["max_per_host"]),
        window=values["window"],
    ))  # fmt: skip


def review(
    r: Remediator,
    now: float,
    incidents: Sequence[Incident],
    *,
    reports: Sequence[WorkerReport] | None = None,
    masters: Sequence[int] = (MASTER,),
    workers: Sequence[WorkerRef] | None = None,
) -> list[Step]:
    if reports is None:
        reports = [report(i.worker) for i in incidents]
    if workers is None:
        workers = [rep.worker for rep in reports]
    return r.review(now=now, masters=masters, workers=workers, reports=reports,
                    incidents=incidents)  # fmt: skip


def act(r: Remediator, steps: Sequence[Step], now: float, result: str = "done") -> None:
    """Record each step as the Monitor does: GO with `result`, the others with their verdict."""
    for step in steps:
        r.record(step, result if step.verdict is Verdict.GO else step.verdict.value, now)


def only(steps: Sequence[Step]) -> Step:
    assert len(steps) == 1, steps
    return steps[0]


# --- eligibility -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verdict", "now_state"),
    [(WorkerState.STUCK, WorkerState.STUCK), (WorkerState.SPINNING, WorkerState.SPINNING),
     (WorkerState.DEADLOCKED, WorkerState.STUCK), (WorkerState.DEADLOCKED, WorkerState.OK)],
    ids=["stuck-incident", "spinning-incident", "deadlock-incident-worker-now-stuck",
         "deadlock-incident-worker-now-ok"],
)  # fmt: skip
def test_only_a_worker_deadlocked_now_is_eligible(
    verdict: WorkerState, now_state: WorkerState
) -> None:
    r = remediator()
    w = ref(1)
    steps = review(r, T0 + 3600, [incident(w, verdict=verdict)], reports=[report(w, now_state)])
    assert steps == []


def test_grace_must_have_passed_strictly() -> None:
    r = remediator(grace=30)
    i = incident(ref(1))
    assert review(r, T0 + 10, [i]) == []
    assert review(r, T0 + 30, [i]) == []  # "longer than" the grace
    step = only(review(r, T0 + 30.5, [i]))
    assert (step.action, step.verdict, step.worker) == (Action.ABORT, Verdict.GO, i.worker)
    assert step.deadlocked_for == pytest.approx(30.5)
    assert step.signature == "libpq_ssl_with_https"


def test_off_does_nothing() -> None:
    r = remediator(Mode.OFF)
    assert review(r, T0 + 3600, [incident(ref(1))]) == []


# --- order: SIGABRT, then SIGKILL after abort-wait, each once ---------------------------------


def test_abort_then_kill_after_abort_wait_then_nothing() -> None:
    r = remediator(grace=30, abort_wait=5)
    i = incident(ref(1))
    abort = only(review(r, T0 + 31, [i]))
    assert abort.action is Action.ABORT
    r.record(abort, "done", T0 + 31)
    assert r.pending(i.id)
    assert review(r, T0 + 32, [i]) == []  # no second SIGABRT, no SIGKILL yet
    assert review(r, T0 + 35.9, [i]) == []
    kill = only(review(r, T0 + 36, [i]))
    assert (kill.action, kill.worker, kill.incident_id) == (Action.KILL, i.worker, i.id)
    r.record(kill, "done", T0 + 36)
    assert not r.pending(i.id)
    assert review(r, T0 + 40, [i]) == []
    assert r.counts[("abort", "done")] == 1 and r.counts[("kill", "done")] == 1


def test_kill_follow_up_comes_even_after_the_incident_resolved() -> None:
    """The worker may vanish from the reports after SIGABRT: the follow-up still runs (and the
    signaller then finds it gone)."""
    r = remediator(abort_wait=5)
    i = incident(ref(1))
    act(r, review(r, T0 + 31, [i]), T0 + 31)
    kill = only(review(r, T0 + 40, [], reports=[]))
    assert kill.action is Action.KILL
    r.record(kill, "gone", T0 + 40)
    assert r.counts[("kill", "gone")] == 1


@pytest.mark.parametrize("result", ["gone", "identity_changed", "refused", "failed"])
def test_an_abort_that_was_not_sent_has_no_follow_up_and_is_not_retried(result: str) -> None:
    r = remediator()
    i = incident(ref(1))
    act(r, review(r, T0 + 31, [i]), T0 + 31, result)
    assert not r.pending(i.id)
    assert review(r, T0 + 100, [i]) == []
    assert r.counts[("abort", result)] == 1


# --- dry run -----------------------------------------------------------------------------------


def test_dry_run_walks_the_same_steps() -> None:
    r = remediator(Mode.DRY_RUN, abort_wait=5)
    assert r.dry_run
    i = incident(ref(1))
    abort = only(review(r, T0 + 31, [i]))
    event = r.record(abort, "dry_run", T0 + 31)
    assert event.describe() == "dry-run: would send SIGABRT to pid 1"
    kill = only(review(r, T0 + 36, [i]))  # the worker is still there: it would be killed
    assert kill.action is Action.KILL
    assert r.record(kill, "dry_run", T0 + 36).describe() == "dry-run: would send SIGKILL to pid 1"
    assert review(r, T0 + 100, [i]) == []  # once per incident, not once per cycle
    assert r.counts[("abort", "dry_run")] == 1 and r.counts[("kill", "dry_run")] == 1
    assert r.counts[("abort", "done")] == 0


def test_dry_runs_count_against_the_limits() -> None:
    r = remediator(Mode.DRY_RUN, max_per_slot=1, max_per_host=1)
    first, second = incident(ref(1)), incident(ref(2))
    act(r, review(r, T0 + 31, [first]), T0 + 31, "dry_run")
    step = only(review(r, T0 + 32, [first, second]))
    assert (step.worker.pid, step.verdict) == (2, Verdict.RATE_LIMITED)


# --- rate limits -------------------------------------------------------------------------------


def test_slot_limit_follows_the_replacements_and_resets_after_the_window() -> None:
    """Each replacement of a killed worker deadlocks again: at most max_per_slot kills of that
    slot per window, while another slot may still be remediated; then the window slides."""
    r = remediator(max_per_slot=2, max_per_host=10, window=600, abort_wait=1)
    other = ref(50)
    now = T0
    pid = 1
    kills = []
    for generation in range(3):
        w = ref(pid + generation)
        i = incident(w, first_seen=now)
        # The new worker is seen (it claims the slot its predecessor left), then deadlocks.
        review(r, now, [], reports=[report(w, WorkerState.OK), report(other, WorkerState.OK)])
        now += 31
        step = only(review(r, now, [i], reports=[report(w), report(other, WorkerState.OK)]))
        if generation < 2:
            assert step.verdict is Verdict.GO, generation
            act(r, [step], now)
            kills.append(w.pid)
            now += 2
            act(r, review(r, now, [], reports=[report(other, WorkerState.OK)]), now, "gone")
        else:
            assert step.verdict is Verdict.RATE_LIMITED
            assert "2 kill(s) in worker slot 100/1" in step.reason
            assert "--remediate.max-per-slot 2" in step.reason
            r.record(step, "rate_limited", now)
    assert kills == [1, 2]
    assert r.slot(ref(3)) == "100/1"  # the third generation holds the first worker's slot
    # Said once: later cycles of the same incident stay quiet...
    assert review(r, now + 1, [i], reports=[report(ref(3)), report(other)]) == []
    # ...while another slot's deadlock is still remediated.
    j = incident(other, first_seen=now)
    step = only(review(r, now + 32, [i, j], reports=[report(ref(3)), report(other)]))
    assert (step.worker, step.verdict) == (other, Verdict.GO)
    act(r, [step], now + 32)
    # Once the window has slid past the slot's kills, the still-deadlocked worker is signalled.
    later = review(r, T0 + 31 + 600 + 35 + 1, [i], reports=[report(ref(3))], workers=[ref(3)])
    aborts = [s for s in later if s.action is Action.ABORT]
    assert [(s.worker.pid, s.verdict) for s in aborts] == [(3, Verdict.GO)]
    assert r.counts[("abort", "rate_limited")] == 1


def test_host_limit_across_slots_and_masters_resets_after_the_window() -> None:
    r = remediator(max_per_slot=3, max_per_host=2, window=100)
    a, b, c = ref(1), ref(2, master=200), ref(3)
    masters = (MASTER, 200)
    ia, ib, ic = (incident(w) for w in (a, b, c))
    steps = review(r, T0 + 31, [ia, ib, ic], masters=masters)
    assert [(s.worker.pid, s.verdict) for s in steps] == [
        (1, Verdict.GO), (2, Verdict.GO), (3, Verdict.GO)]  # fmt: skip
    # The Monitor records each as it goes; review again sees the count grow.
    r2 = remediator(max_per_slot=3, max_per_host=2, window=100)
    act(r2, review(r2, T0 + 31, [ia], masters=masters), T0 + 31)
    act(r2, review(r2, T0 + 32, [ia, ib], masters=masters), T0 + 32)
    step = only([s for s in review(r2, T0 + 33, [ia, ib, ic], masters=masters)
                 if s.action is Action.ABORT])  # fmt: skip
    assert (step.worker.pid, step.verdict) == (3, Verdict.RATE_LIMITED)
    assert "2 kill(s) on this host in the last 100s (--remediate.max-per-host 2)" in step.reason
    r2.record(step, "rate_limited", T0 + 33)
    # 100 s after the first kill, one is free again.
    step = only([s for s in review(r2, T0 + 131, [ic], masters=masters)
                 if s.action is Action.ABORT])  # fmt: skip
    assert (step.worker.pid, step.verdict) == (3, Verdict.GO)


# --- never the master --------------------------------------------------------------------------


def test_never_a_master_nor_a_worker_of_an_unknown_master() -> None:
    r = remediator()
    master_itself = WorkerRef(pid=MASTER, create_time=T0 - 5000, master_pid=200)
    orphan = ref(7, master=999)  # its master is not (any more) one the agent discovered
    steps = review(r, T0 + 31, [incident(master_itself), incident(orphan)], masters=(MASTER, 200))
    assert [(s.worker.pid, s.verdict) for s in steps] == [
        (MASTER, Verdict.REFUSED), (7, Verdict.REFUSED)]  # fmt: skip
    assert "is a gunicorn master" in steps[0].reason
    assert "not a discovered master" in steps[1].reason
    act(r, steps, T0 + 31)
    assert r.counts[("abort", "refused")] == 2
    assert review(r, T0 + 60, [incident(master_itself), incident(orphan)],
                  masters=(MASTER, 200)) == []  # fmt: skip


def test_every_counted_pair_is_known_and_zero_at_start() -> None:
    r = remediator()
    assert dict(r.counts) == dict.fromkeys(COMBINATIONS, 0)
    assert ("kill", "rate_limited") not in COMBINATIONS
    with pytest.raises(ValueError, match="unknown remediation result"):
        r.record(Step(Action.ABORT, ref(1), "i", "s", 1.0), "exploded", T0)


# --- what people read --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (RemediationEvent("abort", "done", T0, 42), "SIGABRT sent to pid 42"),
        (RemediationEvent("kill", "done", T0, 42), "SIGKILL sent to pid 42"),
        (RemediationEvent("abort", "dry_run", T0, 42), "dry-run: would send SIGABRT to pid 42"),
        (RemediationEvent("kill", "gone", T0, 42),
         "no SIGKILL needed: pid 42 had already exited"),
        (RemediationEvent("abort", "rate_limited", T0, 42, "rate limit: 3 kill(s) …"),
         "not killed: pid 42 (rate limit: 3 kill(s) …)"),
        (RemediationEvent("abort", "identity_changed", T0, 42, "pid reused"),
         "SIGABRT refused: pid 42 is another process now (pid reused)"),
    ],
    ids=["abort", "kill", "dry-run", "gone", "rate-limited", "identity-changed"],
)  # fmt: skip
def test_event_words_in_the_record_the_text_and_slack(event: RemediationEvent, text: str) -> None:
    i = replace(incident(ref(42)), remediation=(event,))
    stamp = "2023-11-14T22:13:20Z"
    record = incident_record(i)["remediation"]
    assert record == [{"action": event.action, "signal": event.signal, "result": event.result,
                       "pid": 42, "at": T0, "detail": event.detail,
                       "text": f"{text} at {stamp}"}]  # fmt: skip
    assert f"  Remediation: {text} at {stamp}" in incident_text(i).splitlines()
    payload = remediation_payload(i, event, host="web.1", public_url="https://agent.example")
    assert f"web.1, gunicorn worker 42 (master {MASTER}): {text} at {stamp}" in payload["text"]
    assert f"https://agent.example/incidents/{i.id}" in json.dumps(payload)
