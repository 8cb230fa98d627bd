"""dashboards/alerts.yaml: promtool accepts it and its unit tests pass (Debian's prometheus 2.42,
as CI installs it), every alert carries what an on-call engineer needs, and every metric and
label value the rules use is one the agent exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.monitor import SAMPLE_ERROR_REASONS
from agent.remediation import RESULTS as REMEDIATION_RESULTS
from agent.remediation import Action
from agent.types import ThreadState, WorkerState

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "alerts.yaml"
RULE_TESTS = DASHBOARDS / "alerts_test.yaml"
README = ROOT / "README.md"
RUNBOOK_BASE = "https://github.com/deadlock-agent/deadlock-agent"

# The list; each must exist under this name (dashboards, runbooks and silences use it).
REQUIRED_ALERTS = {
    "GunicornWorkerDeadlocked",
    "GunicornRequestCapacityExhausted",
    "GunicornThreadsStuck",
    "DeadlockAgentDown",
    "DeadlockAgentStale",
    "DeadlockAgentSampleErrors",
}
SEVERITIES = {"critical", "warning"}

# Sample names the agent exports (README "Endpoints and metrics"; the worker_state series is
# opt-in, so no rule may depend on it) ...
EXPORTED = {
    "deadlock_agent_up",
    "deadlock_agent_masters",
    "deadlock_agent_workers",
    "deadlock_agent_threads",
    "deadlock_agent_deadlocked_workers",
    "deadlock_agent_deadlocks_detected_total",
    "deadlock_agent_oldest_stuck_thread_seconds",
    "deadlock_agent_request_capacity_ratio",
    "deadlock_agent_samples_total",
    "deadlock_agent_sample_duration_seconds_total",
    "deadlock_agent_sample_errors_total",
    "deadlock_agent_last_sample_timestamp_seconds",
    "deadlock_agent_cycle_duration_seconds",
    "deadlock_agent_build_info",
    "deadlock_agent_notifications_total",
    "deadlock_agent_remediations_total",
}
# ... plus what Prometheus itself records for every target, and the Pushgateway for every group.
SYNTHETIC = {"up", "push_time_seconds"}
# Label values the agent exports, for the labels rules filter on.
LABEL_VALUES = {
    "state": {*(s.value for s in WorkerState), *(s.value for s in ThreadState)},
    "method": {"proc", "pyspy", "pyspy_native"},
    "channel": {"slack", "log"},
    "result": {"sent", "retried", "failed", "dropped", *REMEDIATION_RESULTS},
    "action": {a.value for a in Action},
    "reason": set(SAMPLE_ERROR_REASONS),
}  # fmt: skip

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def promtool() -> str:
    """promtool's path; a missing promtool fails the test (CI must never skip these)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run scripts/test as root, or "
            "`apt-get install -y --no-install-recommends prometheus` (Debian's 2.42)"
        )
    return path


def load_rules() -> list[dict[str, Any]]:
    """Every rule of every group in alerts.yaml."""
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


ALERTS = [rule for rule in load_rules() if "alert" in rule]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords or labels)."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = LABEL_LIST.sub(" ", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        follows = text[match.end() :].lstrip()
        if match.group() not in PROMQL_KEYWORDS and not follows.startswith("("):
            names.add(match.group())
    return names


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_rules() -> None:
    result = run([promtool(), "check", "rules", str(RULES)], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_promtool_unit_tests_pass() -> None:
    # rule_files in the test file are relative to it: run from dashboards/.
    result = run([promtool(), "test", "rules", RULE_TESTS.name], cwd=DASHBOARDS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_required_alerts_exist() -> None:
    names = [rule["alert"] for rule in ALERTS]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    assert set(names) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(names)


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    document = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in document["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in ALERTS}
    assert names <= fires, f"never shown firing: {names - fires}"
    assert names <= quiet, f"never shown staying quiet: {names - quiet}"


@pytest.mark.parametrize("rule", ALERTS, ids=[rule["alert"] for rule in ALERTS])
def test_alert_has_for_severity_and_annotations(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert re.fullmatch(r"(\d+[smh])+", str(rule.get("for", ""))), f"{name}: for: {rule}"
    assert rule.get("labels", {}).get("severity") in SEVERITIES, rule
    annotations = rule.get("annotations", {})
    assert annotations.get("summary", "").strip(), rule
    assert annotations.get("description", "").strip(), rule
    assert "$labels.instance" in annotations["summary"] + annotations["description"], rule
    assert annotations.get("runbook_url") == f"{RUNBOOK_BASE}#runbook-{name.lower()}", rule


@pytest.mark.parametrize("rule", ALERTS, ids=[rule["alert"] for rule in ALERTS])
def test_alert_uses_only_exported_metrics_and_label_values(rule: dict[str, Any]) -> None:
    expr = rule["expr"]
    names = metric_names(expr)
    assert names, f"no metric found in {expr!r}"
    assert names <= EXPORTED | SYNTHETIC, f"not exported by the agent: {names - EXPORTED}"
    for label, _, value in MATCHER.findall(expr):
        if label in LABEL_VALUES:
            values = set(value.split("|"))
            assert values <= LABEL_VALUES[label], f"{label}: {values - LABEL_VALUES[label]}"
    # A job name would tie the rules to one scrape config.
    assert not re.search(r"\bjob\s*(=|!=|=~|!~)", expr), expr


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up == 0", {"up"}),
        ('sum by (job) (rate(a_total{reason!="x"}[5m])) > 0', {"a_total"}),
        ("time() - b > 60 or on (job, instance) (c == 0 unless on (job) d)", {"b", "c", "d"}),
        ('increase(e{result=~"failed|dropped"}[15m]) > 1e3', {"e"}),
        ("last_over_time(f[1d]) offset 5m", {"f"}),
    ],
    ids=["comparison", "aggregation", "set-operators", "regex-and-exponent", "offset"],
)
def test_metric_names_extractor(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_runbook_sections_exist_in_readme() -> None:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", README.read_text(), flags=re.MULTILINE)
    anchors = {github_anchor(h) for h in headings}
    missing = [r["alert"] for r in ALERTS if f"runbook-{r['alert'].lower()}" not in anchors]
    assert not missing, f"README has no runbook section (### Runbook <AlertName>) for {missing}"
