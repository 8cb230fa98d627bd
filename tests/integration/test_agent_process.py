"""The agent as users run it: a real process, real signals, real exit codes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import AgentProcess

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_cleanly_within_two_seconds(tmp_path: Path, signum: int) -> None:
    agent = AgentProcess(tmp_path, ["--interval", "1"])
    try:
        # Up or not (there may be no gunicorn on this host): a cycle finished.
        agent.wait_for("first cycle", lambda m: m.value(
            "deadlock_agent_last_sample_timestamp_seconds") is not None, timeout=15)
        started = time.monotonic()
        agent.proc.send_signal(signum)
        code = agent.proc.wait(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        agent.stop()
    assert code == 0, agent.log()
    assert elapsed <= 2.0, f"took {elapsed:.2f}s to exit"
    assert "exiting" in agent.log()


@pytest.mark.parametrize(
    ("args", "env", "code", "needle"),
    [
        (["--interval", "0"], {}, 2, "--interval / DEADLOCK_AGENT_INTERVAL"),
        ([], {"DEADLOCK_AGENT_STUCK_AFTER": "soon"}, 2, "DEADLOCK_AGENT_STUCK_AFTER"),
        (["--py-spy", "/nonexistent/py-spy"], {}, 3, "pip install py-spy"),
        (["--web.listen-address", "nonsense"], {}, 2, "--web.listen-address"),
    ],
    ids=["bad-flag-value", "bad-env-value", "py-spy-missing", "bad-listen-address"],
)
def test_bad_setup_exits_with_one_clear_line(
    args: list[str], env: dict[str, str], code: int, needle: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "watch", *args],
        check=False, capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deadlock-agent: error:")
    assert needle in lines[0]
