"""`deadlock-agent diagnose` as a person runs it: a real subprocess against real gunicorn
workers (the seed's hang over real TLS to PostgreSQL, a healthy idle app, a native mutex
deadlock built with the system compiler), judged by its output and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import running_app
from pgserver import PgServer
from test_native_locks import scenario, start_gunicorn
from test_native_locks import scripts as scripts  # noqa: PLC0414 - the fixture, re-exported

from agent.errors import EXIT_DEADLOCKED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

pytestmark = pytest.mark.integration

SIG = "libpq_ssl_with_https"
SECONDS = 3.0


def run_diagnose(*args: str, timeout: float = 30) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds taken) of `python -m agent diagnose ARGS`."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "agent", "diagnose", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    print(f"$ deadlock-agent diagnose {' '.join(args)}  (exit {done.returncode}, {took:.1f}s)")
    print(done.stdout, done.stderr, sep="\n")
    return done.returncode, done.stdout, done.stderr, took


def test_the_seed_hang_is_deadlocked_with_its_remedy_and_version_note(
    tmp_path: Path, postgres: PgServer
) -> None:
    with running_app(tmp_path, postgres) as app:
        try:
            app.database.stall()
            app.harvest.stall()
            app.traffic(["/db"], concurrency=16)
            time.sleep(2.0)  # the harvest thread (every 1 s) and the requests reach the stall
            code, out, _, took = run_diagnose(str(app.gunicorn.pid), "--seconds", str(SECONDS))
            assert code == EXIT_DEADLOCKED == 5
            assert took <= SECONDS + 5, f"diagnose took {took:.1f}s"
            flat = " ".join(out.split())
            assert f"{SIG} (deadlock):" in out
            assert "Remedy: This is the Gunicorn \"dyno death spiral\"" in flat
            assert "[https] tid" in out and "(NR-Harvest-Thread)" in out
            assert "stuck (no progress in" in out
            assert "PQconnectdb" in out
            assert "versions: libpq 17, openssl 3" in out
            assert "this is the modern stall: a server or proxy not completing the TLS" in flat
            assert out.rstrip().endswith("verdict: deadlocked (exit 5)")
            for pid in app.gunicorn.worker_pids():
                assert f"worker {pid} (master {app.gunicorn.pid}, gthread)" in out
            # A worker pid alone, as JSON.
            worker = app.gunicorn.worker_pids()[0]
            code, out, _, _ = run_diagnose(str(worker), "--json", "--seconds", str(SECONDS))
            record = json.loads(out)
            assert [w["pid"] for w in record["workers"]] == [worker]
            assert record["verdict"] == "deadlocked" and code == record["exit_code"] == 5
            (found,) = record["workers"][0]["findings"]
            assert found["signature"] == SIG and found["remedy"]
            assert "modern stall" in record["workers"][0]["version_note"]
        finally:
            app.database.heal()
            app.harvest.heal()
            app.stop_traffic()


def test_a_healthy_idle_gunicorn_is_ok(tmp_path: Path, postgres: PgServer) -> None:
    with running_app(tmp_path, postgres) as app:
        code, out, _, took = run_diagnose(str(app.gunicorn.pid), "--seconds", "2")
        assert code == EXIT_OK
        assert out.count(": OK\n") == 2, out
        assert out.rstrip().endswith("verdict: ok (exit 0)")
        assert took <= 2 + 5
        code, out, _, _ = run_diagnose(str(app.gunicorn.pid), "--json", "--seconds", "2")
        record = json.loads(out)
        assert code == EXIT_OK and record["verdict"] == "ok"
        assert {w["verdict"] for w in record["workers"]} == {"ok"}
        assert all(t["state"] in ("idle", "running") for w in record["workers"]
                   for t in w["threads"])  # fmt: skip


def test_a_native_mutex_deadlock_prints_the_cycle_naming_both_threads(
    tmp_path: Path, scripts: Path
) -> None:
    gunicorn = start_gunicorn(tmp_path, scripts)
    try:
        pid, tids = scenario(gunicorn, "deadlocks")
        code, out, _, took = run_diagnose(str(gunicorn.pid), "--seconds", "2")
        assert code == EXIT_DEADLOCKED
        assert took <= 2 + 5
        ab, ba = tids["ab"], tids["ba"]
        low, high = (ab, "ab"), (ba, "ba")
        if ba < ab:
            low, high = high, low
        cycle = (f"CYCLE (proven deadlock): tid {low[0]} ({low[1]}) -> tid {high[0]} "
                 f"({high[1]}) -> tid {low[0]} ({low[1]})")  # fmt: skip
        assert cycle in out
        assert f"tid {ab} (ab) waits on mutex 0x" in out and f"held by tid {ba} (ba)" in out
        assert "native_mutex_cycle (deadlock):" in out
        assert f"ORPHAN (proven deadlock): tid {tids['orphan_waiter']}" in out
        assert f"worker {pid} " in out
    finally:
        gunicorn.stop()


def test_clear_one_line_errors(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    code, out, err, _ = run_diagnose(str(gone.pid))
    assert (code, out) == (EXIT_USAGE, "")
    assert err == f"deadlock-agent: error: pid {gone.pid}: no such process\n"
    code, _, err, _ = run_diagnose(str(os.getpid()))
    assert code == EXIT_USAGE
    me = os.getpid()
    assert err.startswith(f"deadlock-agent: error: pid {me}: not a gunicorn master or worker")
    assert err.count("\n") == 1
    code, _, err, _ = run_diagnose(str(os.getpid()), "--py-spy", str(tmp_path / "no-py-spy"))
    assert code == EXIT_UNAVAILABLE
    assert "was not found or is not executable (install it with `pip install py-spy`" in err
    assert err.count("\n") == 1
    code, _, err, _ = run_diagnose("--seconds", "0")
    assert code == EXIT_USAGE and "--seconds must be a number greater than 0" in err
