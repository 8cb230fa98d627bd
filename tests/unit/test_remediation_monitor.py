"""Remediation wired into Monitor.cycle, with injected sources and a recording signaller: the
evidence is on disk before the first signal, each outcome lands in the incident (also after it
resolved), in the store, the log, the listeners and the report's counts."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import pytest

from agent.analysis import IncidentBook
from agent.incidents import IncidentStore
from agent.monitor import Monitor
from agent.remediation import Action, Mode, RemediationSettings, Remediator
from agent.signaller import Signaller
from agent.signatures import load_catalog
from agent.types import (
    Finding,
    Incident,
    ProcSample,
    RemediationEvent,
    Signature,
    StackSnapshot,
    WorkerRef,
    WorkerReport,
    WorkerState,
)

MASTER = 10
WORKER = WorkerRef(pid=11, create_time=1000.0, master_pid=MASTER)
DEADLOCK = Signature(name="libpq_ssl_with_https", summary="s", remedy="r", roles=())


class Workers:
    def __init__(self) -> None:
        self.refs: tuple[WorkerRef, ...] = (WORKER,)

    def workers(self) -> tuple[tuple[int, ...], tuple[WorkerRef, ...]]:
        return (MASTER,), self.refs

    def forget(self, pid: int) -> None:
        pass


class Scanner:
    precise = True

    def scan(self, worker: WorkerRef, *, now: float) -> ProcSample:
        return ProcSample(worker=worker, taken_at=now, threads=())

    def retain(self, workers: Iterable[WorkerRef]) -> None:
        pass

    def forget(self, worker: WorkerRef) -> None:
        pass


class Stacks:
    def dump(self, worker: WorkerRef, *, native: bool) -> StackSnapshot:
        return StackSnapshot(worker=worker, taken_at=0.0, native=native, threads=())


class Tracker:
    """Only what the Monitor asks of it; `judge` says what the test wants."""

    catalog = load_catalog()
    deferred = 0

    def __init__(self) -> None:
        self.reports: tuple[WorkerReport, ...] = ()

    def judge(self, now: float) -> tuple[WorkerReport, ...]:
        return self.reports

    def plan(self, now: float) -> list[Any]:
        return []

    def lock_suspects(self) -> list[WorkerRef]:
        return []

    def native_allowed(self, worker: WorkerRef) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:  # retain, forget, observe_*: nothing to do
        return lambda *args, **kwargs: None


class RecordingSignaller(Signaller):
    """Records each signal and what the incident store held at that moment."""

    def __init__(self, store: IncidentStore, results: list[str]) -> None:
        super().__init__()
        self.store = store
        self.results = results
        self.calls: list[tuple[Action, int, list[str]]] = []

    def send(self, worker: WorkerRef, action: Action, masters: Collection[int]) -> tuple[str, str]:
        on_disk = [p.name for p in self.store.directory.glob("*.json")]
        self.calls.append((action, worker.pid, on_disk))
        return self.results.pop(0), ""


def deadlocked() -> WorkerReport:
    return WorkerReport(worker=WORKER, state=WorkerState.DEADLOCKED, threads=(),
                        findings=(Finding(DEADLOCK, ()),))  # fmt: skip


@pytest.mark.parametrize("mode", [Mode.KILL, Mode.DRY_RUN], ids=["kill", "dry-run"])
def test_evidence_first_then_abort_then_kill_recorded_everywhere(
    tmp_path: Path, mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [0.0]
    store = IncidentStore(str(tmp_path / "incidents"))
    tracker = Tracker()
    workers = Workers()
    told: list[tuple[Incident, RemediationEvent]] = []
    signaller = RecordingSignaller(store, ["done", "gone"])
    monitor = Monitor(
        workers=workers, stacks=Stacks(), tracker=tracker, clock=lambda: clock[0],
        listeners=[], incidents=IncidentBook(), store=store,
        remediator=Remediator(RemediationSettings(mode=mode, grace=30, abort_wait=5)),
        signaller=signaller, remediation_listeners=[lambda i, e: told.append((i, e))],
    )  # fmt: skip
    monitor.scanner = Scanner()
    caplog.set_level(logging.WARNING, logger="agent.monitor")

    tracker.reports = (deadlocked(),)
    for second in (0, 10, 30):  # opened at 0; not past the grace yet at 30
        clock[0] = float(second)
        monitor.cycle()
    assert signaller.calls == [] and told == []
    (incident,) = monitor.incidents.open
    path = store.directory / f"{incident.id}.json"

    clock[0] = 31.0
    report = monitor.cycle()
    if mode is Mode.KILL:
        assert signaller.calls == [(Action.ABORT, WORKER.pid, [path.name])]  # stored first
        assert report.remediations[("abort", "done")] == 1
        assert "remediation: sent SIGABRT to pid 11 (create_time 1000.00" in caplog.text
    else:
        assert signaller.calls == []
        assert report.remediations[("abort", "dry_run")] == 1
        assert "remediation dry-run: would send SIGABRT to pid 11 (create_time 1000.00, " \
               "master 10, signature libpq_ssl_with_https" in caplog.text  # fmt: skip
    record = json.loads(path.read_text())
    assert [e["signal"] for e in record["remediation"]] == ["SIGABRT"]
    assert record["dump"] is not None  # the rewrite keeps the evidence
    assert "Remediation: " in (store.get_text(incident.id) or "")
    assert [e.action for _, e in told] == ["abort"]

    # The worker goes (SIGABRT was enough): the incident resolves; the follow-up still runs.
    clock[0] = 33.0
    tracker.reports, workers.refs = (), ()
    monitor.cycle()
    assert monitor.incidents.open == ()
    clock[0] = 36.0
    report = monitor.cycle()
    record = json.loads(path.read_text())
    assert record["resolved_at"] is not None
    expected = ("gone", "SIGKILL") if mode is Mode.KILL else ("dry_run", "SIGKILL")
    assert (record["remediation"][-1]["result"], record["remediation"][-1]["signal"]) == expected
    assert [e.action for _, e in told] == ["abort", "kill"]
    assert told[-1][0].resolved_at is not None
    assert report.remediations[("kill", expected[0])] == 1
    if mode is Mode.KILL:
        assert [c[0] for c in signaller.calls] == [Action.ABORT, Action.KILL]
        assert "no SIGKILL needed" in caplog.text
    else:
        assert signaller.calls == []
        assert "would send SIGKILL to pid 11" in caplog.text
    # Nothing more, however long it runs.
    for second in (40, 100):
        clock[0] = float(second)
        assert (
            monitor.cycle().remediations[("abort", "done" if mode is Mode.KILL else "dry_run")] == 1
        )
    assert len(told) == 2


def test_off_reports_zero_counts_and_never_signals(tmp_path: Path) -> None:
    tracker = Tracker()
    tracker.reports = (deadlocked(),)
    store = IncidentStore(str(tmp_path / "incidents"))
    signaller = RecordingSignaller(store, [])
    monitor = Monitor(
        workers=Workers(), stacks=Stacks(), tracker=tracker,
        clock=lambda: 1000.0, listeners=[], store=store, signaller=signaller,
    )  # fmt: skip
    monitor.scanner = Scanner()
    assert monitor.cycle().remediations == {}
    assert signaller.calls == []
