"""agent/metrics.py: AgentCollector in a fresh CollectorRegistry, fed hand-built CycleReports.
The README's metrics table is the contract: every name, type and label it lists is checked."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.errors import ERROR_REASONS
from agent.metrics import AgentCollector
from agent.monitor import SAMPLE_ERROR_REASONS
from agent.push import RESULTS as PUSH_RESULTS
from agent.signatures import load_catalog
from agent.slack import RESULTS
from agent.types import (
    CycleReport,
    Finding,
    Signature,
    ThreadReport,
    ThreadState,
    WorkerRef,
    WorkerReport,
    WorkerState,
)

README = Path(__file__).resolve().parents[2] / "README.md"
SIGNATURES = ("libpq_ssl_with_https", "libpq_ssl_lock_callback")


# --- builders ----------------------------------------------------------------------------------


def thread(
    tid: int, *, state: ThreadState = ThreadState.RUNNING, request: bool = False,
    stuck_for: float = 0.0, name: str | None = None,
) -> ThreadReport:
    return ThreadReport(tid=tid, name=name, state=state, request=request, stuck_for=stuck_for,
                        stack=None)  # fmt: skip


def stuck(tid: int, *, request: bool = True, stuck_for: float = 12.0) -> ThreadReport:
    return thread(tid, state=ThreadState.STUCK, request=request, stuck_for=stuck_for)


def finding(signature: str) -> Finding:
    sig = Signature(name=signature, summary="s", remedy="r", roles=())
    return Finding(signature=sig, threads=())


def worker(
    pid: int, *, state: WorkerState = WorkerState.OK, threads: Sequence[ThreadReport] = (),
    signatures: Sequence[str] = (), master_pid: int = 100,
) -> WorkerReport:
    return WorkerReport(
        worker=WorkerRef(pid=pid, create_time=1700000000.0 + pid, master_pid=master_pid),
        state=state, threads=tuple(threads), findings=tuple(finding(s) for s in signatures),
    )  # fmt: skip


def report(
    *, workers: Sequence[WorkerReport] = (), masters: Sequence[int] = (100,),
    complete: bool = True, signatures: Sequence[str] = SIGNATURES,
    incidents_total: dict[str, int] | None = None, samples: dict[str, int] | None = None,
    sample_seconds: dict[str, float] | None = None, sample_errors: dict[str, int] | None = None,
    finished_at: float = 1700000500.0, duration: float = 0.0125,
) -> CycleReport:
    return CycleReport(
        finished_at=finished_at, duration=duration, masters=tuple(masters),
        workers=tuple(workers), complete=complete, signatures=tuple(signatures),
        samples=samples or {}, sample_seconds=sample_seconds or {},
        sample_errors=sample_errors or {}, incidents_total=incidents_total or {},
        catalog=load_catalog().signatures,
    )  # fmt: skip


def registry_for(
    cycle: CycleReport | None, *, worker_labels: bool = False
) -> CollectorRegistry:
    """A fresh registry (never the global REGISTRY) exporting this report."""
    registry = CollectorRegistry()
    # Both notifier channels, as documented (a running agent has one of them).
    notifications = {(c, r): 1 for c in ("slack", "log") for r in RESULTS}
    # And a pusher's outcomes (exported only with --push-gateway).
    pushes = (dict.fromkeys(PUSH_RESULTS, 2), 1700000400.0)
    registry.register(AgentCollector(lambda: cycle, version="9.8.7", py_spy_version="0.4.3",
                                     worker_labels=worker_labels,
                                     notifications=lambda: notifications,
                                     pushes=lambda: pushes))  # fmt: skip
    return registry


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples]


def busy_report() -> CycleReport:
    """Two masters; an ok, a stuck and a deadlocked worker; every counter non-zero."""
    return report(
        masters=(100, 200),
        workers=[
            worker(101, threads=[thread(1, request=True), thread(2, state=ThreadState.IDLE)]),
            worker(102, state=WorkerState.STUCK,
                   threads=[stuck(3, stuck_for=30.0), thread(4, request=True)]),
            worker(201, state=WorkerState.DEADLOCKED, master_pid=200,
                   threads=[stuck(5, stuck_for=45.5), stuck(6, request=False, stuck_for=44.0),
                            thread(7, state=ThreadState.IDLE)],
                   signatures=["libpq_ssl_with_https"]),
        ],
        incidents_total={"libpq_ssl_with_https": 3},
        samples={"proc": 120, "pyspy": 7, "pyspy_native": 2},
        sample_seconds={"proc": 0.02, "pyspy": 0.5, "pyspy_native": 0.25},
        sample_errors={**dict.fromkeys((*ERROR_REASONS, "internal"), 0), "timeout": 2},
    )  # fmt: skip


# --- the README table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Documented:
    name: str
    kind: str  # gauge | counter
    labels: dict[str, tuple[str, ...] | None]  # label -> documented values (None: any)


def documented_metrics() -> list[Documented]:
    """Rows of README's metrics table: | `name{label="a\\|b",other}` | type | meaning |."""
    rows = []
    for line in README.read_text().splitlines():
        match = re.match(r"\| `(deadlock_agent_\w+)(?:\{(.*?)\})?` \| (\w+) \|", line)
        if not match:
            continue
        name, label_text, kind = match.groups()
        labels: dict[str, tuple[str, ...] | None] = {}
        for part in filter(None, (label_text or "").split(",")):
            label, _, values = part.partition("=")
            labels[label] = tuple(values.strip('"').split("\\|")) if values else None
        rows.append(Documented(name, kind, labels))
    return rows


DOCUMENTED = documented_metrics()


def test_readme_table_was_found() -> None:
    names = [d.name for d in DOCUMENTED]
    assert len(names) == 27
    assert "deadlock_agent_up" in names
    assert "deadlock_agent_deadlocks_detected_total" in names


@pytest.mark.parametrize("doc", DOCUMENTED, ids=[d.name for d in DOCUMENTED])
def test_every_documented_metric_is_exported(doc: Documented) -> None:
    registry = registry_for(busy_report(), worker_labels=True)
    families = {m.name: m for m in registry.collect()}
    family_name = doc.name.removesuffix("_total") if doc.kind == "counter" else doc.name
    assert family_name in families, sorted(families)
    family = families[family_name]
    assert family.type == doc.kind
    series = [s for s in family.samples if s.name == doc.name]
    assert series, f"no {doc.name} sample"
    for s in series:
        assert set(s.labels) == set(doc.labels)
    for label, values in doc.labels.items():
        if values is not None:
            assert {s.labels[label] for s in series} == set(values)


def test_nothing_undocumented_is_exported() -> None:
    registry = registry_for(busy_report(), worker_labels=True)
    exported = {name for name, _, _ in samples(registry)}
    assert exported == {d.name for d in DOCUMENTED}


def test_documented_error_reasons_are_the_monitors() -> None:
    row = next(line for line in README.read_text().splitlines()
               if line.startswith("| `deadlock_agent_sample_errors_total"))  # fmt: skip
    documented = set(re.findall(r"`(\w+)`", row.split("|")[3]))
    assert documented == set(SAMPLE_ERROR_REASONS)


# --- values ------------------------------------------------------------------------------------


def test_values_of_a_busy_cycle() -> None:
    r = busy_report()
    get = registry_for(r).get_sample_value
    assert get("deadlock_agent_up") == 1
    assert get("deadlock_agent_masters") == 2
    assert get("deadlock_agent_workers", {"state": "ok"}) == 1
    assert get("deadlock_agent_workers", {"state": "stuck"}) == 1
    assert get("deadlock_agent_workers", {"state": "deadlocked"}) == 1
    assert get("deadlock_agent_threads", {"state": "running"}) == 2
    assert get("deadlock_agent_threads", {"state": "idle"}) == 2
    assert get("deadlock_agent_threads", {"state": "stuck"}) == 3
    assert get("deadlock_agent_oldest_stuck_thread_seconds") == 45.5
    # request threads: 1 running, 3 stuck, 4 running, 5 stuck -> 2 of 4 not stuck
    assert get("deadlock_agent_request_capacity_ratio") == 0.5
    assert get("deadlock_agent_samples_total", {"method": "pyspy"}) == 7
    assert get("deadlock_agent_sample_duration_seconds_total", {"method": "pyspy_native"}) == 0.25
    assert get("deadlock_agent_sample_errors_total", {"reason": "timeout"}) == 2
    assert get("deadlock_agent_sample_errors_total", {"reason": "permission"}) == 0
    assert get("deadlock_agent_last_sample_timestamp_seconds") == r.finished_at
    assert get("deadlock_agent_cycle_duration_seconds") == r.duration
    assert get("deadlock_agent_build_info", {"version": "9.8.7", "py_spy_version": "0.4.3"}) == 1


def test_zero_series_for_every_signature() -> None:
    get = registry_for(report(signatures=(*SIGNATURES, "future_sig"))).get_sample_value
    for name in (*SIGNATURES, "future_sig"):
        assert get("deadlock_agent_deadlocked_workers", {"signature": name}) == 0
        assert get("deadlock_agent_deadlocks_detected_total", {"signature": name}) == 0


def test_deadlocked_workers_and_incidents_per_signature() -> None:
    r = report(
        workers=[
            worker(101, state=WorkerState.DEADLOCKED, signatures=["libpq_ssl_with_https"]),
            worker(102, state=WorkerState.DEADLOCKED, signatures=["libpq_ssl_with_https"]),
            worker(103, state=WorkerState.DEADLOCKED,
                   signatures=["libpq_ssl_with_https", "libpq_ssl_lock_callback"]),
        ],
        incidents_total={"libpq_ssl_with_https": 5, "libpq_ssl_lock_callback": 1},
    )  # fmt: skip
    get = registry_for(r).get_sample_value
    assert get("deadlock_agent_deadlocked_workers", {"signature": "libpq_ssl_with_https"}) == 3
    assert get("deadlock_agent_deadlocked_workers", {"signature": "libpq_ssl_lock_callback"}) == 1
    assert get("deadlock_agent_deadlocks_detected_total",
               {"signature": "libpq_ssl_with_https"}) == 5  # fmt: skip
    assert get("deadlock_agent_workers", {"state": "deadlocked"}) == 3
    assert get("deadlock_agent_workers", {"state": "ok"}) == 0


def test_empty_cycle_has_zero_valued_series() -> None:
    get = registry_for(report(masters=())).get_sample_value
    assert get("deadlock_agent_up") == 0  # watching nothing is not up
    assert get("deadlock_agent_down_reason", {"reason": "no_master"}) == 1
    assert get("deadlock_agent_masters") == 0
    for state in ("ok", "stuck", "deadlocked"):
        assert get("deadlock_agent_workers", {"state": state}) == 0
    for state in ("running", "idle", "stuck"):
        assert get("deadlock_agent_threads", {"state": state}) == 0
    for method in ("proc", "pyspy", "pyspy_native"):
        assert get("deadlock_agent_samples_total", {"method": method}) == 0
        assert get("deadlock_agent_sample_duration_seconds_total", {"method": method}) == 0
    assert get("deadlock_agent_oldest_stuck_thread_seconds") == 0


CAPACITY = {
    "no threads at all": ([], None),
    "only non-request threads": ([worker(101, threads=[thread(1), stuck(2, request=False)])],
                                 None),
    "all request threads running": ([worker(101, threads=[thread(1, request=True),
                                                          thread(2, request=True)])], 1.0),
    "one of four stuck": ([worker(101, threads=[stuck(1), thread(2, request=True)]),
                           worker(102, threads=[thread(3, request=True),
                                                thread(4, state=ThreadState.IDLE,
                                                       request=True)])], 0.75),
    "stuck non-request thread does not count": (
        [worker(101, threads=[thread(1, request=True), stuck(2, request=False)])], 1.0),
    "all stuck": ([worker(101, threads=[stuck(1), stuck(2)])], 0.0),
}  # fmt: skip


@pytest.mark.parametrize(("workers", "ratio"), CAPACITY.values(), ids=CAPACITY.keys())
def test_request_capacity_ratio(workers: list[WorkerReport], ratio: float | None) -> None:
    value = registry_for(report(workers=workers)).get_sample_value(
        "deadlock_agent_request_capacity_ratio"
    )
    assert value == ratio


def test_up_is_0_without_a_report() -> None:
    registry = registry_for(None)
    assert registry.get_sample_value("deadlock_agent_up") == 0
    assert registry.get_sample_value(
        "deadlock_agent_build_info", {"version": "9.8.7", "py_spy_version": "0.4.3"}
    ) == 1
    # Notification and push counts exist from the start: neither waits for a cycle.
    assert {name for name, _, _ in samples(registry)} == {
        "deadlock_agent_up", "deadlock_agent_down_reason", "deadlock_agent_build_info",
        "deadlock_agent_notifications_total",
        "deadlock_agent_pushes_total", "deadlock_agent_last_push_timestamp_seconds",
    }  # fmt: skip


def test_up_is_0_when_the_cycle_was_incomplete() -> None:
    get = registry_for(report(complete=False, workers=[worker(101)])).get_sample_value
    assert get("deadlock_agent_up") == 0
    assert get("deadlock_agent_down_reason", {"reason": "sample_errors"}) == 1
    assert get("deadlock_agent_down_reason", {"reason": "no_master"}) == 0
    assert get("deadlock_agent_workers", {"state": "ok"}) == 1  # what was sampled still counts


# --- pid labels --------------------------------------------------------------------------------


def test_no_pid_label_by_default() -> None:
    for name, labels, _ in samples(registry_for(busy_report())):
        assert "pid" not in labels, name
        assert "master_pid" not in labels, name


def test_worker_state_only_with_worker_labels() -> None:
    registry = registry_for(busy_report(), worker_labels=True)
    get = registry.get_sample_value
    labels = {"master_pid": "100", "pid": "102", "state": "stuck"}
    assert get("deadlock_agent_worker_state", labels) == 1
    assert get("deadlock_agent_worker_state", {**labels, "state": "ok"}) is None
    assert get("deadlock_agent_worker_state",
               {"master_pid": "200", "pid": "201", "state": "deadlocked"}) == 1  # fmt: skip
    with_pid = {name for name, labels, _ in samples(registry) if "pid" in labels}
    assert with_pid == {"deadlock_agent_worker_state"}


def test_each_scrape_reads_the_current_report() -> None:
    """Built fresh per scrape: a worker that is gone is gone from the output."""
    current = [report(workers=[worker(101), worker(102, state=WorkerState.STUCK)])]
    registry = CollectorRegistry()
    registry.register(AgentCollector(lambda: current[0], version="1", py_spy_version="2",
                                     worker_labels=True))  # fmt: skip
    get = registry.get_sample_value
    assert get("deadlock_agent_worker_state",
               {"master_pid": "100", "pid": "102", "state": "stuck"}) == 1  # fmt: skip
    current[0] = report(workers=[worker(101)])
    assert get("deadlock_agent_worker_state",
               {"master_pid": "100", "pid": "102", "state": "stuck"}) is None  # fmt: skip
    assert get("deadlock_agent_workers", {"state": "stuck"}) == 0


def test_registering_does_not_call_the_report() -> None:
    calls: list[int] = []

    def counting() -> CycleReport | None:
        calls.append(1)
        return None

    CollectorRegistry().register(AgentCollector(counting, version="1", py_spy_version="2"))
    assert calls == []
