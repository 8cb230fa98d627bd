"""Prometheus metrics, built fresh at every scrape from the last CycleReport.

Nothing here is updated in place: dead workers vanish from the output by construction, and a
scrape never sees half a cycle. Names are a contract (alert rules, dashboards depend on them).
"""

from __future__ import annotations

import resource
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.analysis import request_capacity
from agent.remediation import COMBINATIONS as REMEDIATIONS
from agent.types import CycleReport, ThreadState, WorkerState

PREFIX = "deadlock_agent"
SAMPLE_METHODS = ("proc", "pyspy", "pyspy_native", "pyspy_nonblocking", "probe")
#: Why deadlock_agent_up is 0: no cycle finished yet, no gunicorn master found, or a worker
#: could not be sampled in the last cycle (sample_errors_total{reason} says why).
DOWN_REASONS = ("starting", "no_master", "sample_errors")


def down_reason(report: CycleReport | None) -> str | None:
    """Why the agent is not up (one of DOWN_REASONS), or None when it is."""
    if report is None:
        return "starting"
    if not report.masters:
        return "no_master"
    if not report.complete:
        return "sample_errors"
    return None


def _up_families(report: CycleReport | None) -> Iterator[Metric]:
    reason = down_reason(report)
    yield GaugeMetricFamily(
        f"{PREFIX}_up",
        "1 when the last cycle found a gunicorn master and sampled every worker it found.",
        value=0 if reason else 1,
    )
    down = GaugeMetricFamily(
        f"{PREFIX}_down_reason",
        "1 for why deadlock_agent_up is 0 (starting, no_master, sample_errors); all 0 when up.",
        labels=["reason"],
    )
    for name in DOWN_REASONS:
        down.add_metric([name], 1 if name == reason else 0)
    yield down


def own_cpu() -> dict[str, float]:
    """CPU seconds used since start, read at scrape time: this process, and its py-spy
    children (the only children it has, reaped after each dump)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"agent": me.ru_utime + me.ru_stime, "pyspy": kids.ru_utime + kids.ru_stime}


class AgentCollector(Collector):
    """Exports the last cycle's report; `report` is called once per scrape."""

    def __init__(
        self,
        report: Callable[[], CycleReport | None],
        *,
        version: str,
        py_spy_version: str,
        worker_labels: bool = False,
        notifications: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        pushes: Callable[[], tuple[Mapping[str, int], float | None]] | None = None,
    ) -> None:
        self._report = report
        self._notifications = notifications
        self._pushes = pushes
        self._version = version
        self._py_spy_version = py_spy_version
        self._worker_labels = worker_labels

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: registering must not run a collection (the report may be None)."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family from the current report."""
        info = GaugeMetricFamily(
            f"{PREFIX}_build_info",
            "Agent build information; always 1.",
            labels=["version", "py_spy_version"],
        )
        info.add_metric([self._version, self._py_spy_version], 1)
        yield info
        if self._notifications is not None:
            sent = CounterMetricFamily(
                f"{PREFIX}_notifications",
                "Incident notifications by channel (slack, log) and result "
                "(sent, retried, failed, dropped).",
                labels=["channel", "result"],
            )
            for (channel, result), count in sorted(self._notifications().items()):
                sent.add_metric([channel, result], count)
            yield sent
        if self._pushes is not None:
            yield from self._push_families(*self._pushes())
        report = self._report()
        yield from _up_families(report)
        if report is None:
            return
        yield from self._from_report(report)

    def _push_families(self, results: Mapping[str, int], last_ok: float | None) -> Iterator[Metric]:
        pushes = CounterMetricFamily(
            f"{PREFIX}_pushes",
            "Pushes to the Pushgateway by result (ok, timeout, connection, rejected, "
            "server_error, error).",
            labels=["result"],
        )
        for result, count in sorted(results.items()):
            pushes.add_metric([result], count)
        yield pushes
        yield GaugeMetricFamily(
            f"{PREFIX}_last_push_timestamp_seconds",
            "Unix time of the last successful push to the Pushgateway (0 before the first).",
            value=last_ok or 0.0,
        )

    def _from_report(self, r: CycleReport) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{PREFIX}_masters", "Gunicorn masters being watched.", value=len(r.masters)
        )

        workers = GaugeMetricFamily(
            f"{PREFIX}_workers", "Gunicorn workers by verdict.", labels=["state"]
        )
        by_state = Counter(w.state for w in r.workers)
        for state in WorkerState:
            workers.add_metric([state.value], by_state[state])
        yield workers

        threads = GaugeMetricFamily(
            f"{PREFIX}_threads", "Threads of all workers by state.", labels=["state"]
        )
        thread_states = Counter(t.state for w in r.workers for t in w.threads)
        for tstate in ThreadState:
            threads.add_metric([tstate.value], thread_states[tstate])
        yield threads

        matched = Counter(f.signature.name for w in r.workers for f in w.findings)
        classes = {sig.name: sig.hang_class.value for sig in r.catalog}
        deadlocks = [n for n in r.signatures if classes.get(n, "deadlock") == "deadlock"]
        deadlocked = GaugeMetricFamily(
            f"{PREFIX}_deadlocked_workers",
            "Workers matching a known deadlock signature (or a proven lock cycle).",
            labels=["signature"],
        )
        for name in deadlocks:
            deadlocked.add_metric([name], matched[name])
        yield deadlocked

        detected = CounterMetricFamily(
            f"{PREFIX}_deadlocks_detected",
            "Deadlock incidents detected, each counted once.",
            labels=["signature"],
        )
        for name in deadlocks:
            detected.add_metric([name], r.incidents_total.get(name, 0))
        yield detected

        hang = GaugeMetricFamily(
            f"{PREFIX}_hang_workers",
            "Workers with a named hang, by signature and class (deadlock, stall, "
            "bounded_stall, spin).",
            labels=["signature", "class"],
        )
        hangs = CounterMetricFamily(
            f"{PREFIX}_hangs_detected",
            "Incidents of every named hang, each counted once, by signature and class.",
            labels=["signature", "class"],
        )
        info = GaugeMetricFamily(
            f"{PREFIX}_signature_info",
            "Every known hang: its class, its first reference link and its remedy; always 1.",
            labels=["signature", "class", "reference", "remedy"],
        )
        for sig in r.catalog:
            labels = [sig.name, sig.hang_class.value]
            hang.add_metric(labels, matched[sig.name])
            hangs.add_metric(labels, r.hangs_total.get(sig.name, 0))
            info.add_metric([*labels, sig.references[0] if sig.references else "", sig.remedy], 1)
        yield hang
        yield hangs
        yield info

        stuck = [t.stuck_for for w in r.workers for t in w.threads if t.state is ThreadState.STUCK]
        yield GaugeMetricFamily(
            f"{PREFIX}_oldest_stuck_thread_seconds",
            "How long the longest-stuck thread has made no progress (0 when none).",
            value=max(stuck, default=0.0),
        )

        capacity = request_capacity(r.workers)
        if capacity is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_request_capacity_ratio",
                "Request threads not stuck / request threads: the death-spiral gauge.",
                value=capacity,
            )

        samples = CounterMetricFamily(
            f"{PREFIX}_samples", "Samples taken, by method.", labels=["method"]
        )
        seconds = CounterMetricFamily(
            f"{PREFIX}_sample_duration_seconds",
            "Time spent sampling, by method.",
            labels=["method"],
        )
        for method in SAMPLE_METHODS:
            samples.add_metric([method], r.samples.get(method, 0))
            seconds.add_metric([method], r.sample_seconds.get(method, 0.0))
        yield samples
        yield seconds

        errors = CounterMetricFamily(
            f"{PREFIX}_sample_errors", "Sampling errors, by reason.", labels=["reason"]
        )
        for reason, count in sorted(r.sample_errors.items()):
            errors.add_metric([reason], count)
        yield errors

        yield GaugeMetricFamily(
            f"{PREFIX}_last_sample_timestamp_seconds",
            "Unix time the last cycle finished.",
            value=r.finished_at,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_cycle_cpu_seconds",
            "CPU time the last sampling cycle used (the /proc scan, analysis and any dumps' "
            "bookkeeping; py-spy's own CPU is in cpu_seconds_total{part=\"pyspy\"}).",
            value=r.cycle_cpu,
        )
        cpu = CounterMetricFamily(
            f"{PREFIX}_cpu_seconds",
            "CPU time the agent has used since start: its own process, and its py-spy runs.",
            labels=["part"],
        )
        for part, used in own_cpu().items():
            cpu.add_metric([part], used)
        yield cpu
        yield CounterMetricFamily(
            f"{PREFIX}_dumps_deferred",
            "py-spy dumps put off to a later cycle by --max-dumps-per-minute.",
            value=r.dumps_deferred,
        )
        remediations = CounterMetricFamily(
            f"{PREFIX}_remediations",
            "Remediation of deadlocked workers (--remediate), by action (abort: SIGABRT, kill: "
            "SIGKILL) and result (done, dry_run, rate_limited, gone, identity_changed, refused, "
            "failed).",
            labels=["action", "result"],
        )
        for action, result in REMEDIATIONS:
            remediations.add_metric([action, result], r.remediations.get((action, result), 0))
        yield remediations
        yield GaugeMetricFamily(
            f"{PREFIX}_progress_resolution_seconds",
            "How finely thread progress (on-CPU time) is measured: 1e-09 with schedstat, one "
            "clock tick (0.01) on kernels without it, where busy threads may look stuck.",
            value=r.progress_resolution_ns / 1e9,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_cycle_duration_seconds",
            "Wall time of the last sampling cycle.",
            value=r.duration,
        )

        if self._worker_labels:
            per_worker = GaugeMetricFamily(
                f"{PREFIX}_worker_state",
                "1 for each worker's current verdict (only with --web.worker-labels).",
                labels=["master_pid", "pid", "state"],
            )
            for w in r.workers:
                per_worker.add_metric(
                    [str(w.worker.master_pid), str(w.worker.pid), w.state.value], 1
                )
            yield per_worker
