"""Pushed metrics against a real Pushgateway (Debian's prometheus-pushgateway 1.5, which
scripts/test installs): the real agent, as dyno web.1, watching a real gunicorn, pushes its group;
SIGTERM deletes it; with the gateway down the agent keeps sampling and counts the failures."""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import AgentProcess, Metrics, parse_metrics
from promstack import require_binary

from agent.demo.run import Gunicorn, free_port

pytestmark = pytest.mark.integration

APPS = Path(__file__).resolve().parent / "apps"
PUSHGATEWAY = "prometheus-pushgateway"  # Debian's name for the pushgateway binary
GROUP = {"job": "deadlock-agent", "instance": "web.1"}
WAIT = 30.0


class Pushgateway:
    """A Pushgateway on a free loopback port, in memory only (Debian's default persists to
    /var/lib/prometheus), its log kept in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"pushgateway-{self.port}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [require_binary(PUSHGATEWAY), f"--web.listen-address=127.0.0.1:{self.port}",
             "--persistence.file=", "--log.level=info"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = WAIT) -> None:
        """Until /-/ready answers 200 (a readiness handshake, not a sleep)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pushgateway exited {self.proc.returncode}: {self.log()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"pushgateway not ready after {timeout:g}s: {self.log()}")

    def scrape(self) -> Metrics:
        """What a Prometheus with honor_labels: true would see."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            return parse_metrics(response.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """Terminate, kill if it must, wait."""
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            self._log.close()


@contextlib.contextmanager
def pushgateway(workdir: Path) -> Iterator[Pushgateway]:
    gateway = Pushgateway(workdir)
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()


@contextlib.contextmanager
def gunicorn(workdir: Path) -> Iterator[Gunicorn]:
    """One sync worker serving a trivial app: something real to watch, cheaply."""
    server = Gunicorn(
        workdir, {}, worker_class="sync", workers=1,
        extra_args=("--pythonpath", str(APPS)), app="locks_regex_app:app",
    )  # fmt: skip
    try:
        server.wait_ready(workers=1)
        yield server
    finally:
        server.stop()


def group_series(metrics: Metrics) -> dict[str, float]:
    """name{other labels} -> value of every series in the web.1 group."""
    found = {}
    for (name, labels), value in metrics.samples.items():
        as_dict = dict(labels)
        if {k: as_dict.get(k) for k in GROUP} == GROUP:
            rest = ",".join(f"{k}={v}" for k, v in sorted(labels) if k not in GROUP)
            found[f"{name}{{{rest}}}" if rest else name] = value
    return found


def wait_until(
    what: str, check: Callable[[], bool], timeout: float, describe: Callable[[], str]
) -> None:
    """Poll check() until it holds; fail with describe() when it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}:\n{describe()}")


def test_agent_pushes_its_group_and_deletes_it_on_sigterm(tmp_path: Path) -> None:
    with pushgateway(tmp_path) as gateway, gunicorn(tmp_path) as app:
        agent = AgentProcess(
            tmp_path,
            ["--master-pid", str(app.pid), "--interval", "1", "--push-gateway", gateway.url,
             "--push-interval", "1", "--push-timeout", "1"],
            env={"DYNO": "web.1"},
        )  # fmt: skip
        try:
            state: dict[str, dict[str, float]] = {"group": {}}

            def pushed() -> bool:
                state["group"] = group_series(gateway.scrape())
                g = state["group"]
                return (
                    g.get("push_time_seconds", 0) > 0
                    and g.get("deadlock_agent_up") == 1
                    and g.get("deadlock_agent_masters") == 1
                    and g.get("deadlock_agent_workers{state=ok}") == 1
                )

            wait_until("the web.1 group with a sampled worker", pushed, WAIT,
                       lambda: f"group: {state['group']}\nagent log:\n{agent.log()[-3000:]}"
                       f"\ngateway log:\n{gateway.log()}")  # fmt: skip
            group = state["group"]
            assert abs(group["push_time_seconds"] - time.time()) < 10
            assert group["push_failure_time_seconds"] == 0
            assert any(k.startswith("deadlock_agent_build_info{") for k in group), group
            # The agent counts its own pushes, and none failed (no inconsistent metric, no 400).
            own, _ = agent.wait_for(
                "a counted push",
                lambda m: (m.value("deadlock_agent_pushes_total", result="ok") or 0) >= 2,
                timeout=WAIT,
            )
            failed = {dict(labels)["result"]: v
                      for labels, v in own.series("deadlock_agent_pushes_total").items()
                      if dict(labels)["result"] != "ok"}  # fmt: skip
            assert set(failed.values()) == {0}, failed
            assert (own.value("deadlock_agent_last_push_timestamp_seconds") or 0) > 0
        finally:
            started = time.monotonic()
            code = agent.stop()
            took = time.monotonic() - started
        assert code == 0, agent.log()[-3000:]
        assert took < 5, took
        after = group_series(gateway.scrape())
        assert after == {}, (
            f"group left on the gateway ({len(after)} series, e.g. {sorted(after)[:5]})\n"
            f"{agent.log()[-2000:]}"
        )
        assert "deleted group /metrics/job/deadlock-agent/instance/web.1" in agent.log()


def test_gateway_down_agent_keeps_sampling_and_counts_failures(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    agent = AgentProcess(
        tmp_path,
        ["--interval", "0.5", "--stuck-after", "2", "--push-gateway", dead,
         "--push-interval", "0.5", "--push-timeout", "0.5"],
        env={"DYNO": "web.1"},
    )  # fmt: skip
    try:
        first, _ = agent.wait_for(
            "failed pushes counted",
            lambda m: (m.value("deadlock_agent_pushes_total", result="connection") or 0) >= 3,
            timeout=WAIT,
        )
        later, _ = agent.wait_for(
            "more failures, and sampling going on",
            lambda m: (
                (m.value("deadlock_agent_pushes_total", result="connection") or 0)
                >= (first.value("deadlock_agent_pushes_total", result="connection") or 0) + 2
                and (m.value("deadlock_agent_last_sample_timestamp_seconds") or 0)
                > (first.value("deadlock_agent_last_sample_timestamp_seconds") or 0)
            ),
            timeout=WAIT,
        )
        # (No gunicorn here: `up` is 0 with down_reason no_master; the cycles go on.)
        assert later.value("deadlock_agent_down_reason", reason="sample_errors") == 0
        assert later.value("deadlock_agent_pushes_total", result="ok") == 0
        assert later.value("deadlock_agent_last_push_timestamp_seconds") == 0
    finally:
        started = time.monotonic()
        code = agent.stop()
        took = time.monotonic() - started
    assert code == 0, agent.log()[-3000:]
    assert took < 5, took
    log = agent.log()
    # One line per cause, not one per push.
    assert log.count("failed (ConnectionRefusedError)") == 1, log[-3000:]
    assert "could not delete group /metrics/job/deadlock-agent/instance/web.1" in log
