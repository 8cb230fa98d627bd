"""Alerting end to end, with nothing faked but Slack.

Real gunicorn gthread workers are driven into the libpq-SSL hang (as in test_deadlock.py) while
`deadlock-agent watch` watches them with SLACK_WEBHOOK_URL pointing at a fake Slack; a real
Prometheus (Debian's 2.42) scrapes the agent every second and evaluates dashboards/alerts.yaml;
a real Alertmanager (0.25) posts to the same fake Slack on another path. The scenario runs once
(the `run` fixture) and each test below judges one part of what it recorded:
GunicornWorkerDeadlocked fires and reaches Alertmanager's Slack receiver, every PromQL query of
dashboards/deadlock-agent.json returns series, the agent's own notifier posts exactly one
message per incident and one per resolution, and everything resolves after recovery.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import AgentProcess, App, Metrics, running_app
from pgserver import PgServer
from promstack import FakeSlack, Post, Prom, running_alertmanager, running_prometheus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "alerts.yaml"
DASHBOARD = ROOT / "dashboards" / "deadlock-agent.json"

STUCK_AFTER = 5.0
SIG = "libpq_ssl_with_https"
ALERT = "GunicornWorkerDeadlocked"
JOB = "deadlock-agent"
AGENT_PATH = "/agent"
ALERTMANAGER_PATH = "/alertmanager"
# The agent notifier's contract: a Slack payload whose top-level "text" starts with these.
INCIDENT_PREFIX = ":rotating_light:"
RESOLVED_PREFIX = ":white_check_mark:"
HEALTHY_SECONDS = 6.0
# Grafana's built-in variables, at values a 5-minute dashboard with 1 s scrapes would get.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}

Json = dict[str, Any]


# --- the dashboard's queries, found generically ---------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    """One PromQL expression of the dashboard and how Grafana runs it."""

    where: str
    expr: str
    instant: bool  # an instant query (table/stat "Instant"), else a range query


@dataclass(frozen=True)
class QueryOutcome:
    """A dashboard query, interpolated for one variable setting, and what Prometheus said."""

    query: DashboardQuery
    variant: str
    promql: str
    series: int
    error: str | None = None


def dashboard_queries(dashboard: Json) -> list[DashboardQuery]:
    """Every targets[].expr of every panel (rows' nested panels too) and every annotation's."""

    def panels(items: list[Json]) -> Iterator[Json]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels") or [])

    tops = list(dashboard.get("panels") or [])
    tops += [p for row in dashboard.get("rows") or [] for p in row.get("panels") or []]
    found = []
    for panel in panels(tops):
        for i, target in enumerate(panel.get("targets") or []):
            if target.get("expr"):
                instant = bool(target.get("instant")) and not target.get("range")
                where = f"panel {panel.get('title')!r} target {target.get('refId', i)}"
                found.append(DashboardQuery(where, str(target["expr"]), instant))
    for annotation in (dashboard.get("annotations") or {}).get("list") or []:
        expr = annotation.get("expr") or (annotation.get("target") or {}).get("expr")
        if expr:
            found.append(DashboardQuery(f"annotation {annotation.get('name')!r}", expr, False))
    return found


VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+),\s*)?(\w+)\s*\)\s*$", re.DOTALL)


def interpolate(text: str, values: Mapping[str, str]) -> str:
    """Replace $var, ${var}, ${var:fmt} and [[var]]; an undefined variable is an error."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name in values:
            return values[name]
        if name.isdigit():  # "$1" in a label_replace() replacement
            return match.group(0)
        raise KeyError(f"${name} is not a dashboard variable (in {text!r})")

    return VARIABLE.sub(replace, text)


def _regex_literal(value: str) -> str:
    """A label value as a regex inside a PromQL string, as Grafana escapes multi-values."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def variable_settings(dashboard: Json, prom: Prom) -> dict[str, dict[str, str]]:
    """Two settings of the templating variables: "All" (what the dashboard opens with) and
    "one" (the first real value of each, as a user would pick it)."""
    settings: dict[str, dict[str, str]] = {}
    for variant in ("all", "one"):
        values = dict(GRAFANA_BUILTINS)
        for var in (dashboard.get("templating") or {}).get("list") or []:
            name, kind = var["name"], var.get("type", "query")
            current = (var.get("current") or {}).get("value")
            if isinstance(current, list):
                current = current[0] if current else None
            if kind == "datasource":
                values[name] = "prometheus"
                continue
            if kind in ("constant", "textbox", "interval"):
                values[name] = str(current or var.get("query") or "")
                continue
            options = _variable_options(var, values, prom)
            if not options:
                raise AssertionError(f"dashboard variable ${name} has no values: {var}")
            multi = bool(var.get("multi") or var.get("includeAll"))
            if variant == "all" and var.get("includeAll"):
                values[name] = var.get("allValue") or (
                    "(" + "|".join(_regex_literal(o) for o in options) + ")"
                )
            else:
                values[name] = _regex_literal(options[0]) if multi else options[0]
        settings[variant] = values
    return settings


def _variable_options(var: Json, values: Mapping[str, str], prom: Prom) -> list[str]:
    query = var.get("query")
    query = str(query.get("query", "") if isinstance(query, dict) else query or "")
    if var.get("type") == "custom":
        return [o.strip() for o in query.split(",") if o.strip()]
    match = LABEL_VALUES.match(query)
    if match is None:
        raise AssertionError(f"unsupported variable query for ${var['name']}: {query!r}")
    selector, label = match.group(1), match.group(2)
    selector = interpolate(selector, values) if selector else None
    return sorted(prom.label_values(label, selector))


def evaluate_dashboard(prom: Prom, started: float) -> list[QueryOutcome]:
    """Run every dashboard query, for each variable setting, as Grafana would run it."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    if not queries:
        raise AssertionError(f"no PromQL expressions found in {DASHBOARD}")
    outcomes = []
    end = time.time()
    for variant, values in variable_settings(dashboard, prom).items():
        for query in queries:
            promql = interpolate(query.expr, values)
            try:
                if query.instant:
                    result = prom.query(promql)
                else:
                    result = prom.query_range(promql, start=started, end=end, step=1)
            except RuntimeError as err:
                outcomes.append(QueryOutcome(query, variant, promql, 0, str(err)))
            else:
                outcomes.append(QueryOutcome(query, variant, promql, len(result)))
    return outcomes


# --- the scenario, run once -----------------------------------------------------------------


@dataclass
class Run:
    """What the scenario saw, for the tests to judge."""

    slack: FakeSlack
    agent_instance: str = ""
    healthy_alerts: list[Json] = field(default_factory=list)
    posts_before_fault: list[Post] = field(default_factory=list)
    fault_to_firing: float = 0.0
    firing: list[Json] = field(default_factory=list)
    alertmanager_firing: list[Post] = field(default_factory=list)
    deadlocked_pids: set[str] = field(default_factory=set)
    incidents_total: float = 0.0
    dashboard: list[QueryOutcome] = field(default_factory=list)
    dashboard_error: str | None = None
    rule_errors: list[str] = field(default_factory=list)
    healed_at: float = 0.0  # time.time(), to tell resolutions from flapping during the fault
    still_firing_after_recovery: list[Json] = field(default_factory=list)
    alertmanager_resolved: list[Post] = field(default_factory=list)
    final: Metrics | None = None
    timings: dict[str, float] = field(default_factory=dict)


def worker_states(m: Metrics) -> dict[str, str]:
    """pid -> state, from the opt-in per-worker series."""
    return {
        dict(labels)["pid"]: dict(labels)["state"]
        for labels, value in m.series("deadlock_agent_worker_state").items()
        if value == 1
    }


def agent_posts(slack: FakeSlack, prefix: str) -> list[Post]:
    """The agent notifier's messages of one kind, by their text's prefix."""
    return [p for p in slack.posts_to(AGENT_PATH) if p.text.startswith(prefix)]


def is_alertmanager_post(post: Post, status: str, after: float = 0.0) -> bool:
    """An Alertmanager Slack post about ALERT with status FIRING or RESOLVED (its default
    title reads "[FIRING:1] GunicornWorkerDeadlocked ...")."""
    body = post.body.decode(errors="replace")
    return (
        post.path == ALERTMANAGER_PATH
        and ALERT in body
        and f"[{status}" in body
        and post.received_at >= after
    )


def alertmanager_posts(slack: FakeSlack, status: str, after: float = 0.0) -> list[Post]:
    """Alertmanager's Slack posts about ALERT with that status, received after `after`."""
    return [p for p in slack.posts_to(ALERTMANAGER_PATH) if is_alertmanager_post(p, status, after)]


def wait_until(check: Callable[[], bool], timeout: float, every: float = 0.25) -> bool:
    """Poll check() until it holds; False (not an error) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, postgres: PgServer) -> Run:
    workdir = tmp_path_factory.mktemp("prometheus-e2e")
    t0 = time.monotonic()
    with FakeSlack() as slack, running_app(workdir, postgres) as app:
        agent = AgentProcess(
            workdir,
            [
                "--master-pid", str(app.gunicorn.pid),
                "--stuck-after", str(STUCK_AFTER),
                "--web.worker-labels",  # per-worker series: which workers deadlocked
            ],
            env={"SLACK_WEBHOOK_URL": slack.url_for(AGENT_PATH)},
        )  # fmt: skip
        try:
            agent.wait_for(
                "first cycle with both workers",
                lambda m: m.value("deadlock_agent_workers", state="ok") == 2,
                timeout=20,
            )
            with (
                running_alertmanager(
                    workdir / "alertmanager", slack_url=slack.url_for(ALERTMANAGER_PATH)
                ) as am,
                running_prometheus(
                    workdir / "prometheus",
                    scrape_targets=[agent.url],
                    rule_files=[RULES],
                    alertmanager_url=am.url,
                    job=JOB,
                ) as prom,
            ):
                result = _scenario(Run(slack), app, agent, prom, t0)
        finally:
            app.stop_traffic()
            agent.stop()
    result.timings["total"] = time.monotonic() - t0
    print("timings (s):", {k: round(v, 1) for k, v in result.timings.items()})
    print(
        f"deadlocked workers {sorted(result.deadlocked_pids)}, "
        f"{len(result.dashboard)} dashboard queries evaluated, fake Slack got:\n"
        + result.slack.describe()
    )
    return result


def _scenario(run: Run, app: App, agent: AgentProcess, prom: Prom, t0: float) -> Run:
    slack = run.slack
    started = time.time()
    targets = prom.wait_for_targets_up(timeout=15)
    run.agent_instance = targets[0]["labels"]["instance"]
    run.timings["servers up"] = time.monotonic() - t0

    # Healthy: fresh TLS connections per request and the HTTPS harvest thread, no alert.
    app.traffic(["/db", "/slow?seconds=1", "/"], concurrency=4)
    healthy_until = time.monotonic() + HEALTHY_SECONDS
    while time.monotonic() < healthy_until:
        # Nothing fires, and nothing about gunicorn is even pending. (A stray py-spy error
        # may make DeadlockAgentSampleErrors pending: that is what its `for:` is for.)
        run.healthy_alerts += [
            a
            for a in prom.alerts()
            if a["state"] == "firing" or a["labels"]["alertname"].startswith("Gunicorn")
        ]
        time.sleep(0.5)
    app.stop_traffic()
    run.posts_before_fault = list(slack.posts)

    # The fault, as in test_deadlock.py: PostgreSQL TLS handshakes and the harvest HTTPS stall.
    app.database.stall()
    app.harvest.stall()
    fault_at = time.monotonic()
    app.traffic(["/db"], concurrency=16)
    run.firing = prom.wait_for_alert(ALERT, state="firing", timeout=STUCK_AFTER + 25)
    run.fault_to_firing = time.monotonic() - fault_at
    run.timings["fault -> firing"] = run.fault_to_firing
    # Raises with every post received: without this one, nothing later means much.
    run.alertmanager_firing = slack.wait_for(
        lambda p: is_alertmanager_post(p, "FIRING"), timeout=20
    )
    run.timings["fault -> alertmanager post"] = time.monotonic() - fault_at

    # Hold the hang a little: which workers deadlocked, and the agent's incident messages.
    hold_until = time.monotonic() + 3
    give_up = hold_until + 5  # the notifier is late or absent: its test will say so
    while True:
        states = worker_states(agent.scrape())
        run.deadlocked_pids |= {pid for pid, state in states.items() if state == "deadlocked"}
        now = time.monotonic()
        told = len(agent_posts(slack, INCIDENT_PREFIX)) >= len(run.deadlocked_pids)
        if (now >= hold_until and told) or now >= give_up:
            break
        time.sleep(0.5)

    # Every dashboard query, while there is something to show.
    begun = time.monotonic()
    try:
        run.dashboard = evaluate_dashboard(prom, started)
    except (OSError, ValueError, KeyError, AssertionError) as err:
        run.dashboard_error = f"{type(err).__name__}: {err}"
    run.timings["dashboard queries"] = time.monotonic() - begun
    run.rule_errors = [
        f"{rule['name']}: {rule.get('lastError')}"
        for group in prom.rule_groups()
        for rule in group["rules"]
        if rule.get("health") != "ok"
    ]

    # Recovery: unstall; the hung threads fail and the workers are ok again.
    states = worker_states(agent.scrape())
    run.deadlocked_pids |= {pid for pid, state in states.items() if state == "deadlocked"}
    run.healed_at = time.time()
    healed = time.monotonic()
    app.database.heal()
    app.harvest.heal()
    app.stop_traffic()
    agent.wait_for(
        "recovery", lambda m: m.value("deadlock_agent_workers", state="ok") == 2, timeout=25
    )
    wait_until(lambda: not prom.firing(ALERT), timeout=15)
    run.still_firing_after_recovery = prom.firing(ALERT)
    run.timings["heal -> alert cleared"] = time.monotonic() - healed
    wait_until(lambda: bool(alertmanager_posts(slack, "RESOLVED", run.healed_at)), timeout=20)
    run.alertmanager_resolved = alertmanager_posts(slack, "RESOLVED", run.healed_at)
    run.timings["heal -> alertmanager resolved"] = time.monotonic() - healed
    wait_until(
        lambda: (
            0 < len(agent_posts(slack, INCIDENT_PREFIX)) <= len(agent_posts(slack, RESOLVED_PREFIX))
        ),
        timeout=10,
    )
    time.sleep(2)  # a duplicate would come within the notifier's 1 message/s pace
    run.final = agent.scrape()
    run.incidents_total = (
        run.final.value("deadlock_agent_deadlocks_detected_total", signature=SIG) or 0.0
    )
    return run


# --- the judgements -------------------------------------------------------------------------


def test_gunicorn_worker_deadlocked_fires_and_reaches_alertmanager(run: Run) -> None:
    assert run.healthy_alerts == [], f"alerts active while healthy: {run.healthy_alerts}"
    assert run.posts_before_fault == [], run.slack.describe()
    assert run.rule_errors == [], run.rule_errors
    alert = run.firing[0]
    assert alert["labels"] == {
        "alertname": ALERT,
        "severity": "critical",
        "job": JOB,
        "instance": run.agent_instance,
        "signature": SIG,
    }, alert
    assert alert["annotations"]["runbook_url"].endswith("#runbook-gunicornworkerdeadlocked")
    assert run.agent_instance in alert["annotations"]["summary"]
    # The agent needs stuck-after (+2 s of cycles, test_deadlock.py); Prometheus adds a scrape
    # and an evaluation (1 s each) and `for: 0s` adds nothing.
    assert run.fault_to_firing <= STUCK_AFTER + 8, f"fired {run.fault_to_firing:.1f}s after"
    post = run.alertmanager_firing[0]
    body = post.json
    assert isinstance(body, dict) and body.get("attachments"), post.body
    assert ALERT in body["attachments"][0]["title"], body


def test_every_dashboard_query_returns_series(run: Run) -> None:
    assert run.dashboard_error is None, run.dashboard_error
    failures = [
        f"{o.query.where} [{o.variant}]: {o.error or 'no series'}\n    {o.promql}"
        for o in run.dashboard
        if o.error or o.series < 1
    ]
    assert not failures, f"{len(failures)} of {len(run.dashboard)} queries:\n" + "\n".join(failures)


def _pid(post: Post) -> str:
    match = re.search(r"\bworker (\d+)\b", post.text)
    assert match, f"no worker pid in the message text: {post.text!r}"
    return match.group(1)


def test_agent_notifier_posts_once_per_incident_and_once_per_resolution(run: Run) -> None:
    assert run.deadlocked_pids, "no worker was reported deadlocked per worker"
    # Each deadlocked worker is one incident, counted once (test_deadlock.py shows it).
    assert run.incidents_total == len(run.deadlocked_pids), (run.incidents_total, run.final)
    posts = run.slack.posts_to(AGENT_PATH)
    incidents = [p for p in posts if p.text.startswith(INCIDENT_PREFIX)]
    resolved = [p for p in posts if p.text.startswith(RESOLVED_PREFIX)]
    listing = run.slack.describe()
    assert len(incidents) == len(run.deadlocked_pids), listing
    assert len(resolved) == len(incidents), listing
    assert len(posts) == len(incidents) + len(resolved), f"other messages:\n{listing}"
    assert sorted(_pid(p) for p in incidents) == sorted(run.deadlocked_pids), listing
    assert sorted(_pid(p) for p in resolved) == sorted(run.deadlocked_pids), listing
    assert all(SIG in p.text for p in incidents + resolved), listing
    # A resolution never overtakes its incident.
    for pid in run.deadlocked_pids:
        opened = min(p.received_at for p in incidents if _pid(p) == pid)
        closed = min(p.received_at for p in resolved if _pid(p) == pid)
        assert opened < closed, (pid, listing)
    assert run.final is not None
    sent = run.final.value("deadlock_agent_notifications_total", channel="slack", result="sent")
    assert sent == len(posts), run.final.series("deadlock_agent_notifications_total")


def test_alerts_resolve_after_recovery(run: Run) -> None:
    assert run.still_firing_after_recovery == [], run.still_firing_after_recovery
    assert run.alertmanager_resolved, (
        f"Alertmanager sent no resolved notification for {ALERT} after recovery:\n"
        + run.slack.describe()
    )
