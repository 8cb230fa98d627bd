"""The live benchmarks still run: each script with --smoke, as a real subprocess, end to end
(real PostgreSQL, gunicorn and agent), printing its table. Their figures are the benchmarks'
business; here only that they run and report (about 2.5 minutes for all seven)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_smoke(script: str, tmp_path: Path) -> str:
    """Run a benchmark with --smoke; return its stdout after checking it exited 0."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke"],
        check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-3000:]}"
    assert result.stderr.strip(), "no progress lines on stderr"
    return result.stdout


def test_false_positive_soak_smoke(tmp_path: Path) -> None:
    out = run_smoke("false_positive_soak.py", tmp_path)
    for line in (
        "false-positive soak: 0.2 min (12 s)",
        "requests sent",
        'max deadlock_agent_threads{state="stuck"}',
        "scrapes with a stuck request thread (capacity < 1.0)",
        'scrapes with workers{state="stuck"} > 0',
        'scrapes with workers{state="deadlocked"} > 0',
        "deadlocks_detected_total at the end",
        "incidents at /incidents at the end",
        "goal: stuck and deadlocked verdicts = 0 -> ",
    ):
        assert line in out, f"{line!r} missing from:\n{out}"
    scrapes = re.search(r"^scrapes \(every 0\.5 s\)\s+(\d+)$", out, re.MULTILINE)
    assert scrapes and int(scrapes[1]) >= 12, out  # 12 s at 0.5 s, allowing for slow scrapes
    for phase in ("back-to-back-2s-queries", "fast-keepalive", "slow-streams",
                  "slow-https-collector"):  # fmt: skip
        assert re.search(rf"^{phase}\s+1\s+\d+", out, re.MULTILINE), f"{phase}:\n{out}"


def test_detection_latency_smoke(tmp_path: Path) -> None:
    out = run_smoke("detection_latency.py", tmp_path)
    assert "detection latency: 1 seed hangs under busy traffic" in out, out
    assert re.search(r"^\s+1\s+[\d.]+\s+\d+\s+(?:[\d.]+|missed)\s+", out, re.MULTILINE), out
    for line in ("detected ", "latency p50 / p95 / max", "deadlocks_detected_total",
                 "goal: p95 <= stuck-after + 2 s = 5 + 2 = 7 s -> "):  # fmt: skip
        assert line in out, f"{line!r} missing from:\n{out}"


def test_cost_ratio_smoke(tmp_path: Path) -> None:
    out = run_smoke("cost_ratio.py", tmp_path)
    for mode in ("idle", "keep-alive", "new-connection"):
        assert re.search(rf"^{mode}\s+[\d.]+\s+[\d.]+\s+[\d.]+", out, re.MULTILINE), out
        assert f"goal: {mode}: naive/agent >= 50 -> " in out, out
    assert "goal: seed hang detected <= stuck-after + 2 s" in out, out


def test_app_overhead_smoke(tmp_path: Path) -> None:
    out = run_smoke("app_overhead.py", tmp_path)
    assert re.search(r"^\s+1\s+off\s+[\d.]+", out, re.MULTILINE), out
    assert re.search(r"^\s+2\s+on\s+[\d.]+", out, re.MULTILINE), out
    assert "goal: throughput on/off >= 0.99 -> " in out, out
    assert "goal: p99 within 2 % -> " in out, out


def test_scale_smoke(tmp_path: Path) -> None:
    out = run_smoke("scale.py", tmp_path)
    for line in ("cycle CPU p50 / p95 / max (ms)", "agent VmRSS max (MB)", "py-spy runs / min",
                 "goal (idle): cycle CPU p95 <= 10.0 ms -> ",
                 "goal (idle): agent VmRSS <= 60 MB -> "):  # fmt: skip
        assert line in out, f"{line!r} missing from:\n{out}"
    assert re.search(r"^\S+: detected 1/1", out, re.MULTILINE), out


def test_cycle_profile_smoke(tmp_path: Path) -> None:
    out = run_smoke("cycle_profile.py", tmp_path)
    assert "cycle profile: 2 workers, " in out, out
    for stage in ("discovery", "scan (/proc)", "observe_proc", "plan", "judge", "incidents",
                  "the rest (loop, report)", "cycle total p50 / p95", "idle wake-up, sleep",
                  "idle wake-up, queue"):  # fmt: skip
        assert re.search(rf"^{re.escape(stage)}\s+[\d.]+", out, re.MULTILINE), f"{stage}:\n{out}"


def test_probe_overhead_smoke(tmp_path: Path) -> None:
    out = run_smoke("probe_overhead.py", tmp_path)
    assert re.search(r"^\s+1\s+off\s+[\d.]+", out, re.MULTILINE), out
    on = re.search(r"^\s+2\s+on\s+[\d.]+(?:\s+[\d.]+){4}\s+(\d+)\s+(\d+)\s", out, re.MULTILINE)
    assert on and int(on[1]) >= 2 and int(on[2]) >= 1, out  # scans and a dump
    for line in ("throughput with/without", "probe thread CPU per request",
                 "client round trip p50", "goal: throughput with/without >= 0.99 -> ",
                 "goal: worker CPU per request with/without <= 1.01 -> "):  # fmt: skip
        assert line in out, f"{line!r} missing from:\n{out}"


def test_soak_smoke(tmp_path: Path) -> None:
    out = run_smoke("soak.py", tmp_path)
    assert "soak: 0.3 min (20 s), gunicorn gthread 2x4 --max-requests 3" in out, out
    # t, RSS, d RSS, workers seen, respawn/s, CPU %, incidents, stale
    row = r"^\s+(\d+)\s+([\d.]+)\s+-?\d+\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+(\d+)\s"
    rows = re.findall(row, out, re.MULTILINE)
    assert len(rows) >= 3, out  # a line every 5 s
    assert int(rows[-1][2]) > 10, out  # workers seen: the churn happened
    assert all(stale == "0" for *_, stale in rows), out  # no dead worker's series kept
    assert re.search(r"hangs injected: 1; incidents: [1-9]", out), out  # caught under churn
    for line in ("respawns: ", "internal errors: 0",
                 "stale worker_state series at the end: 0", "RSS: ",
                 "agent CPU (% of one core): ", "verdict: RSS "):  # fmt: skip
        assert line in out, f"{line!r} missing from:\n{out}"
