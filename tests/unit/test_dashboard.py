"""dashboards/: the Grafana dashboard's conventions, checked against the metrics the agent really
exports (collected from AgentCollector, not a hand list), and the example Alertmanager config."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.errors import ERROR_REASONS
from agent.metrics import SAMPLE_METHODS, AgentCollector
from agent.signatures import load_catalog
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

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
DASHBOARD_FILE = DASHBOARDS / "deadlock-agent.json"
ALERTMANAGER_FILE = DASHBOARDS / "alertmanager.example.yml"
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())

DATASOURCE_REFS = {"${datasource}", "$datasource"}
METRIC = re.compile(r"deadlock_agent_[a-z_]+")
RATE_CALL = re.compile(r"\b(?:rate|irate|increase)\(")
RANGE = re.compile(r"\[([^\]]*)\]")
JOB_FILTER = 'job=~"$job"'
INSTANCE_FILTER = 'instance=~"$instance"'


# --- the dashboard, flattened ------------------------------------------------------------------


def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from walk(panel.get("panels", []))


PANELS = [p for p in walk(DASHBOARD["panels"]) if p.get("type") != "row"]
ANNOTATIONS: list[dict[str, Any]] = DASHBOARD["annotations"]["list"]
VARIABLES: dict[str, dict[str, Any]] = {v["name"]: v for v in DASHBOARD["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    """A query variable's query: a string, or the Prometheus editor's {"query": ...} object."""
    query = variable.get("query")
    return str(query["query"] if isinstance(query, dict) else query)


def target_exprs() -> list[tuple[str, str]]:
    """(id, expr) of every panel target."""
    return [(f"{p['title']}/{t.get('refId', i)}", t["expr"])
            for p in PANELS for i, t in enumerate(p.get("targets", []))]  # fmt: skip


def annotation_exprs() -> list[tuple[str, str]]:
    """(id, expr) of every Prometheus annotation (old top-level `expr` or a `target`)."""
    found = []
    for a in ANNOTATIONS:
        expr = a.get("expr") or a.get("target", {}).get("expr")
        if expr:
            found.append((f"annotation:{a['name']}", expr))
    return found


TARGET_EXPRS = target_exprs()
EXPRS = TARGET_EXPRS + annotation_exprs()
VARIABLE_QUERIES = [(f"variable:{name}", variable_query(v))
                    for name, v in VARIABLES.items() if v.get("type") == "query"]  # fmt: skip
USED_METRICS = sorted({m for _, e in EXPRS + VARIABLE_QUERIES for m in METRIC.findall(e)})


def ids(items: list[tuple[str, str]]) -> list[str]:
    return [i for i, _ in items]


def exprs_of(panel: dict[str, Any]) -> list[str]:
    return [" ".join(t["expr"].split()) for t in panel.get("targets", [])]


def call_arguments(expr: str) -> list[str]:
    """The text between the parentheses of every rate(/irate(/increase( call."""
    arguments = []
    for match in RATE_CALL.finditer(expr):
        depth, start = 1, match.end()
        for end in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[end], 0)
            if depth == 0:
                arguments.append(expr[start:end])
                break
        else:
            pytest.fail(f"unbalanced parentheses in {expr!r}")
    return arguments


def selectors(expr: str) -> list[tuple[str, str | None]]:
    """(metric, label matchers or None) for every deadlock_agent_* selector in expr."""
    return [(m.group(1), m.group(2))
            for m in re.finditer(r"(deadlock_agent_[a-z_]+)(?:\{([^}]*)\})?", expr)]  # fmt: skip


# --- what the agent exports --------------------------------------------------------------------


def _thread(tid: int, *, state: ThreadState, request: bool, stuck_for: float = 0.0) -> ThreadReport:
    return ThreadReport(tid=tid, name=None, state=state, request=request, stuck_for=stuck_for,
                        stack=None)  # fmt: skip


def _worker(pid: int, *, state: WorkerState, threads: tuple[ThreadReport, ...],
            signature: str | None = None) -> WorkerReport:  # fmt: skip
    findings = ()
    if signature:
        findings = (Finding(Signature(name=signature, summary="s", remedy="r", roles=()), ()),)
    return WorkerReport(worker=WorkerRef(pid=pid, create_time=1700000000.0, master_pid=100),
                        state=state, threads=threads, findings=findings)  # fmt: skip


def rich_report() -> CycleReport:
    """Every kind of series the agent can produce: ok, stuck and deadlocked workers, request
    threads (so the capacity ratio exists), every counter non-zero."""
    signatures = ("libpq_ssl_with_https", "libpq_ssl_lock_callback")
    running, idle, stuck = ThreadState.RUNNING, ThreadState.IDLE, ThreadState.STUCK
    return CycleReport(
        finished_at=1700000500.0, duration=0.01, masters=(100,), complete=True,
        signatures=signatures,
        workers=(
            _worker(101, state=WorkerState.OK,
                    threads=(_thread(1, state=running, request=True),
                             _thread(2, state=idle, request=True))),
            _worker(102, state=WorkerState.STUCK,
                    threads=(_thread(3, state=stuck, request=True, stuck_for=30.0),)),
            _worker(103, state=WorkerState.DEADLOCKED, signature=signatures[0],
                    threads=(_thread(4, state=stuck, request=True, stuck_for=45.0),
                             _thread(5, state=stuck, request=False, stuck_for=44.0))),
        ),
        samples=dict.fromkeys(SAMPLE_METHODS, 3),
        sample_seconds=dict.fromkeys(SAMPLE_METHODS, 0.5),
        sample_errors=dict.fromkeys((*ERROR_REASONS, "internal"), 1),
        incidents_total=dict.fromkeys(signatures, 1),
        hangs_total=dict.fromkeys(signatures, 1),
        catalog=load_catalog().signatures,
    )  # fmt: skip


def notification_counts() -> dict[tuple[str, str], int]:
    """(channel, result) -> count, as the runtime's notifier reports them."""
    return {(channel, result): 1 for channel in ("slack", "log")
            for result in ("sent", "retried", "failed", "dropped")}  # fmt: skip


def exported_names() -> set[str]:
    """Sample names the agent exports for a rich report, with every opt-in series enabled."""
    options: dict[str, Any] = {"worker_labels": True}
    # The runtime passes its notifier's counts; a collector that cannot take them does not
    # export deadlock_agent_notifications_total, and test_metric_is_exported says so.
    if "notifications" in inspect.signature(AgentCollector).parameters:
        options["notifications"] = notification_counts
    registry = CollectorRegistry()
    report = rich_report()
    registry.register(
        AgentCollector(lambda: report, version="1.2.3", py_spy_version="0.4.0", **options)
    )
    return {s.name for family in registry.collect() for s in family.samples}


EXPORTED = exported_names()


# --- dashboard identity and variables ----------------------------------------------------------


def test_identity() -> None:
    assert DASHBOARD["uid"] == "deadlock-agent"
    assert DASHBOARD["title"] == "deadlock-agent: Gunicorn deadlocks"
    assert DASHBOARD.get("id") is None  # a fixed id would clash on import
    assert 36 <= DASHBOARD["schemaVersion"] <= 41  # Grafana 10 / 11


def test_no_import_inputs() -> None:
    """A datasource variable, not `__inputs`: the file works through provisioning as is."""
    assert "__inputs" not in DASHBOARD
    assert "${DS_" not in DASHBOARD_FILE.read_text()


def test_datasource_variable() -> None:
    variable = VARIABLES["datasource"]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"


@pytest.mark.parametrize(
    ("name", "query"),
    [
        ("job", "label_values(deadlock_agent_up, job)"),
        ("instance", 'label_values(deadlock_agent_up{job=~"$job"}, instance)'),
    ],
    ids=["job", "instance"],
)
def test_query_variable(name: str, query: str) -> None:
    variable = VARIABLES[name]
    assert variable["type"] == "query"
    assert " ".join(variable_query(variable).split()) == query
    assert variable["datasource"]["uid"] in DATASOURCE_REFS
    assert variable["multi"] is True
    assert variable["includeAll"] is True
    assert variable["allValue"] == ".*"


def test_variable_order() -> None:
    """instance's query uses $job, and both use $datasource: they must come after them."""
    names = list(VARIABLES)
    assert names.index("datasource") < names.index("job") < names.index("instance")


# --- every panel -------------------------------------------------------------------------------


def test_panels_found() -> None:
    assert len(PANELS) >= 10


def test_panel_ids_are_unique() -> None:
    panel_ids = [p["id"] for p in walk(DASHBOARD["panels"])]
    assert len(panel_ids) == len(set(panel_ids))


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
def test_panel_conventions(panel: dict[str, Any]) -> None:
    assert panel["datasource"]["type"] == "prometheus"
    assert panel["datasource"]["uid"] in DATASOURCE_REFS
    targets = panel.get("targets", [])
    assert targets, "no targets"
    for target in targets:
        assert target.get("expr", "").strip(), target
        if "datasource" in target:
            assert target["datasource"]["uid"] in DATASOURCE_REFS
    assert len({t["refId"] for t in targets}) == len(targets)
    assert panel["fieldConfig"]["defaults"].get("unit"), "no fieldConfig.defaults.unit"
    grid = panel["gridPos"]
    assert grid["x"] + grid["w"] <= 24


@pytest.mark.parametrize(("where", "expr"), EXPRS, ids=ids(EXPRS))
def test_ranges_use_rate_interval(where: str, expr: str) -> None:
    for argument in call_arguments(expr):
        assert "[$__rate_interval]" in argument, f"{where}: {argument}"
    assert set(RANGE.findall(expr)) <= {"$__rate_interval"}, where


@pytest.mark.parametrize(("where", "expr"), EXPRS, ids=ids(EXPRS))
def test_expr_filters_job_and_instance(where: str, expr: str) -> None:
    found = selectors(expr)
    assert found, f"{where}: no deadlock_agent_* metric"
    for metric, matchers in found:
        assert matchers is not None, f"{where}: {metric} has no label filter"
        assert JOB_FILTER in matchers, f"{where}: {metric}{{{matchers}}}"
        assert INSTANCE_FILTER in matchers, f"{where}: {metric}{{{matchers}}}"


@pytest.mark.parametrize(("where", "expr"), TARGET_EXPRS, ids=ids(TARGET_EXPRS))
def test_panel_exprs_do_not_filter_by_value(where: str, expr: str) -> None:
    """`x > 0` would leave a panel empty exactly when all is well (0-valued series exist)."""
    outside_braces = re.sub(r"\{[^}]*\}", "", expr)
    assert not re.search(r"[<>]|==|!=", outside_braces), where


@pytest.mark.parametrize("metric", USED_METRICS, ids=USED_METRICS)
def test_metric_is_exported(metric: str) -> None:
    assert metric in EXPORTED, f"{metric} is not exported; the agent exports {sorted(EXPORTED)}"


def test_exported_names_were_collected() -> None:
    """The set above came from the collector, with the rich report and opt-in series."""
    assert {"deadlock_agent_up", "deadlock_agent_request_capacity_ratio",
            "deadlock_agent_worker_state"} <= EXPORTED  # fmt: skip


# --- the panels an operator needs --------------------------------------------------------------


@dataclass(frozen=True)
class Required:
    pattern: str  # searched in a target's expr, whitespace collapsed to single spaces
    unit: str
    by: tuple[str, ...] = ()  # labels the expr must aggregate by
    stacked: bool = False


REQUIRED = {
    "workers by state": Required(r"\bdeadlock_agent_workers\{", "short", ("state",), True),
    "deadlocked workers by signature": Required(
        r"\bdeadlock_agent_deadlocked_workers\{", "short", ("signature",)),
    "request capacity ratio": Required(r"\bdeadlock_agent_request_capacity_ratio\{", "percentunit"),
    "stuck threads": Required(r'\bdeadlock_agent_threads\{[^}]*state="stuck"', "short"),
    "oldest stuck thread age": Required(r"\bdeadlock_agent_oldest_stuck_thread_seconds\{", "s"),
    "incidents over time": Required(
        r"\bincrease\(deadlock_agent_deadlocks_detected_total\{", "short", ("signature",)),
    "agent up": Required(r"\bdeadlock_agent_up\{", "none"),
    "named hangs by signature and class": Required(
        r"\bdeadlock_agent_hang_workers\{", "short", ("signature", "class")),
    "each hang's remedy and reference": Required(
        r"\bdeadlock_agent_signature_info\{", "none",
        ("signature", "class", "reference", "remedy")),
    "sample errors by reason": Required(
        r"\brate\(deadlock_agent_sample_errors_total\{", "ops", ("reason",)),
    "sample latency by method": Required(
        r"\brate\(deadlock_agent_sample_duration_seconds_total\{.*\) / .*"
        r"\brate\(deadlock_agent_samples_total\{", "s", ("method",)),
    "cycle duration": Required(r"\bdeadlock_agent_cycle_duration_seconds\{", "s"),
    "notifications": Required(
        r"\brate\(deadlock_agent_notifications_total\{", "ops", ("channel", "result")),
    "remediations by action and result": Required(
        r"\bincrease\(deadlock_agent_remediations_total\{", "short", ("action", "result")),
    "last sample age": Required(
        r"\btime\(\) - deadlock_agent_last_sample_timestamp_seconds\{", "s"),
}  # fmt: skip


def aggregates_by(expr: str, labels: tuple[str, ...]) -> bool:
    grouped = {label.strip() for clause in re.findall(r"\bby \(([^)]*)\)", expr)
               for label in clause.split(",")}  # fmt: skip
    return set(labels) <= grouped


@pytest.mark.parametrize("need", REQUIRED.values(), ids=REQUIRED.keys())
def test_required_panel(need: Required) -> None:
    candidates = [p for p in PANELS
                  if any(re.search(need.pattern, e) and aggregates_by(e, need.by)
                         for e in exprs_of(p))]  # fmt: skip
    assert candidates, f"no panel queries {need.pattern} by {need.by}"
    fitting = [
        p for p in candidates
        if p["fieldConfig"]["defaults"]["unit"] == need.unit
        and (not need.stacked
             or p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal")
    ]  # fmt: skip
    assert fitting, [(p["title"], p["fieldConfig"]["defaults"]) for p in candidates]


def test_request_capacity_is_red_below_half() -> None:
    metric = "deadlock_agent_request_capacity_ratio"
    panels = [p for p in PANELS if any(metric in e for e in exprs_of(p))]
    assert panels
    for panel in panels:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] == "percentunit", panel["title"]
        steps = defaults["thresholds"]["steps"]
        assert steps[0]["color"] == "red", panel["title"]
        assert steps[0]["value"] is None, panel["title"]
        assert steps[1]["value"] == 0.5, panel["title"]
        assert steps[1]["color"] != "red", panel["title"]


# --- annotations -------------------------------------------------------------------------------


def test_builtin_annotations_are_kept() -> None:
    assert any(a.get("builtIn") == 1 and a.get("type") == "dashboard" for a in ANNOTATIONS)


def test_incident_annotation() -> None:
    metric = "deadlock_agent_deadlocks_detected_total"
    incidents = [a for a in ANNOTATIONS
                 if not a.get("builtIn") and metric in (a.get("expr") or "")]  # fmt: skip
    assert len(incidents) == 1
    annotation = incidents[0]
    assert annotation["enable"] is True
    assert annotation["datasource"]["type"] == "prometheus"
    assert annotation["datasource"]["uid"] in DATASOURCE_REFS


# --- the example Alertmanager config -----------------------------------------------------------


ALERTMANAGER_MUST_CONTAIN = {
    "slack receiver": "slack_configs:",
    "resolved messages": "send_resolved: true",
    "webhook from a file": "api_url_file: /etc/alertmanager/slack_webhook_url",
    "inline alternative, commented": "# api_url: https://hooks.slack.com/",
    "routing": 'alertname =~ "Gunicorn.*|DeadlockAgent.*"',
    "grouping": "group_by: [alertname, job, instance]",
    "summary": ".CommonAnnotations.summary",
    "description": ".CommonAnnotations.description",
    "runbook": ".CommonAnnotations.runbook_url",
}


@pytest.mark.parametrize("text", ALERTMANAGER_MUST_CONTAIN.values(),
                         ids=ALERTMANAGER_MUST_CONTAIN.keys())  # fmt: skip
def test_alertmanager_example_contains(text: str) -> None:
    assert text in ALERTMANAGER_FILE.read_text()


def test_alertmanager_example_passes_amtool() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool is not on PATH (Debian: apt-get install prometheus-alertmanager)")
    result = subprocess.run([amtool, "check-config", str(ALERTMANAGER_FILE)],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for alertname, receiver in [("GunicornWorkerDeadlocked", "slack-deadlock-agent"),
                                ("DeadlockAgentDown", "slack-deadlock-agent")]:  # fmt: skip
        routed = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_FILE}",
             f"alertname={alertname}", "job=gunicorn", "instance=web:19808"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert routed.stdout.split() == [receiver], routed.stdout + routed.stderr
