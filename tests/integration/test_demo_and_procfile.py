"""The two ways a new user first meets the agent: `deadlock-agent demo` and `honcho start`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from harness import Metrics, parse_metrics

from agent.demo.run import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_demo_detects_the_deadlock_and_exits_zero(tmp_path: Path) -> None:
    """The README's demo command; Ctrl-C once it has said DETECTED (it would keep /metrics up
    until --duration), which it takes as a normal end."""
    log = tmp_path / "demo.log"  # a file, not a pipe nobody drains while stdout is read
    with log.open("w") as stderr:
        demo = subprocess.Popen(
            [sys.executable, "-m", "agent", "demo", "--duration", "40",
             "--web.listen-address", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True,
            cwd=tmp_path,
        )  # fmt: skip
    lines = []
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("[demo] DETECTED"):
                demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(5)
    out = "".join(lines)
    assert code == 0, f"{out}\n{log.read_text()[-3000:]}"
    assert "DEADLOCK libpq_ssl_with_https in gunicorn worker" in out
    assert "[libpq] thread ThreadPoolExecutor" in out and "PQconnectdb" in out
    assert "[https] thread NR-Harvest-Thread" in out and "SSLSocket.do_handshake" in out
    assert "[demo] DETECTED" in out
    assert "Remedy:" in out


def test_honcho_start_runs_web_and_monitor(tmp_path: Path) -> None:
    honcho = shutil.which("honcho")
    assert honcho, "honcho is a test dependency: pip install -e '.[test]'"
    port = free_port()
    web_port = free_port()
    env = {
        **os.environ,
        "PORT": str(web_port),
        "TMPDIR": str(tmp_path),
        "DEADLOCK_AGENT_WEB_LISTEN_ADDRESS": f"127.0.0.1:{port}",
        "DEADLOCK_AGENT_WEB_WORKER_LABELS": "true",
    }

    def ours(metrics: Metrics) -> list[str]:
        """The states of the Procfile web's workers (other gunicorns on this machine, such as
        a benchmark's, are found by command line too, and watched alongside)."""
        states = []
        for labels, value in metrics.series("deadlock_agent_worker_state").items():
            labels_ = dict(labels)
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(psutil.Process(int(labels_["master_pid"])).cmdline())
                if value == 1 and f"127.0.0.1:{web_port}" in cmdline:
                    states.append(labels_["state"])
        return states

    log = (tmp_path / "honcho.log").open("wb")
    proc = subprocess.Popen(
        [honcho, "start", "-f", str(ROOT / "Procfile"), "-d", str(ROOT)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        metrics = None
        while time.monotonic() < deadline:
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    metrics = parse_metrics(r.read().decode())
                if ours(metrics) == ["ok", "ok"]:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        text = (tmp_path / "honcho.log").read_text(errors="replace")
        assert metrics is not None, text
        assert (metrics.value("deadlock_agent_masters") or 0) >= 1, text
        assert ours(metrics) == ["ok", "ok"], text
        assert metrics.value("deadlock_agent_up") == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
