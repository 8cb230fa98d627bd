"""The agent keeps working, and says what went wrong, under faults: worker churn, py-spy failing
in each of its ways, SIGTERM with py-spy in flight, gunicorn's own life (HUP, a restarted
master, several masters, no gunicorn yet) and a non-Python child of the master. Real gunicorn
and the real agent process throughout; fake py-spy executables only for py-spy's own failures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from harness import AgentProcess, Metrics, running_app
from pgserver import PgServer

from agent.demo.run import Gunicorn

pytestmark = pytest.mark.integration

SIG = "libpq_ssl_with_https"
STUCK_AFTER = 3.0


def errors(m: Metrics, reason: str) -> float:
    return m.value("deadlock_agent_sample_errors_total", reason=reason) or 0.0


def worker_pids(m: Metrics, master: int | None = None) -> set[int]:
    """Pids in deadlock_agent_worker_state (of one master)."""
    found = set()
    for labels in m.series("deadlock_agent_worker_state"):
        label = dict(labels)
        if master is None or int(label["master_pid"]) == master:
            found.add(int(label["pid"]))
    return found


def wait_until(what: str, check: Callable[[], bool], timeout: float, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{log[-3000:]}")


@contextlib.contextmanager
def agent_process(workdir: Path, *args: str) -> Iterator[AgentProcess]:
    workdir.mkdir(exist_ok=True)
    agent = AgentProcess(workdir, ["--interval", "0.5", "--stuck-after", f"{STUCK_AFTER:g}",
                                   "--web.worker-labels", *args])  # fmt: skip
    try:
        yield agent
    finally:
        agent.stop()


# --- 1. worker churn ---------------------------------------------------------------------------


def test_churn_leaves_no_dead_worker_behind_and_the_seed_hang_is_still_caught(
    tmp_path: Path, postgres: PgServer
) -> None:
    extra = ("--max-requests", "3", "--max-requests-jitter", "0")
    with running_app(tmp_path, postgres, extra_args=extra) as app:
        master = app.gunicorn.pid
        with agent_process(tmp_path, "--master-pid", str(master)) as agent:
            agent.wait_for("workers watched", lambda m: len(worker_pids(m)) == 2, 20)
            seen: set[int] = set()
            app.traffic(["/"], concurrency=4)
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                seen |= set(app.gunicorn.worker_pids())
                time.sleep(0.05)
            app.stop_traffic()
            # Settled: only live workers are reported, every dead one is gone from the series.
            m, _ = agent.wait_for(
                "the series to follow the respawns",
                lambda m: worker_pids(m, master) == set(app.gunicorn.worker_pids()), 10)
            dead = seen - set(app.gunicorn.worker_pids())
            assert len(dead) >= 10, f"too little churn: {len(seen)} workers seen"
            assert not worker_pids(m) & dead
            assert errors(m, "internal") == 0
            assert errors(m, "vanished") >= 1  # a worker exiting under the scan: counted
            assert agent.proc.poll() is None

            app.traffic(["/"], concurrency=2)  # churn goes on meanwhile
            app.database.stall()
            app.harvest.stall()
            app.traffic(["/db"], concurrency=16)
            m, took = agent.wait_for(
                SIG,
                lambda m: (m.value("deadlock_agent_deadlocked_workers", signature=SIG) or 0) >= 1,
                timeout=STUCK_AFTER + 25,
            )
            print(f"seed hang caught under churn after {took:.1f}s ({len(seen)} workers seen)")
            assert (m.value("deadlock_agent_deadlocks_detected_total", signature=SIG) or 0) >= 1
            assert errors(m, "internal") == 0


# --- 2 and 4. py-spy failing in each of its ways; SIGTERM with py-spy in flight ----------------

FAKE_PY_SPY = textwrap.dedent(
    """\
    #!{python}
    # py-spy gone wrong, in the way the file {mode!r} names.
    import os, pathlib, signal, sys, time
    if "--version" in sys.argv:
        print("py-spy 0.4.3")
        sys.exit(0)
    mode = pathlib.Path({mode!r}).read_text().strip()
    pid = int(sys.argv[sys.argv.index("--pid") + 1])
    if mode == "hang":
        time.sleep(120)
    elif mode == "garbage":
        print("this is not JSON")
    elif mode == "truncated":
        print('[{{"pid": %d, "thread_id": 1, "os_thread_id": ' % pid)
    elif mode == "denied":
        print("Permission Denied: Try running again with elevated permissions by going "
              "'sudo env \\"PATH=$PATH\\" !!'", file=sys.stderr)
        sys.exit(1)
    elif mode == "exit-mid-dump":  # the target exits while py-spy reads it
        os.kill(pid, signal.SIGKILL)
        print("Error: Failed to get process executable name. Check that the process is "
              "running.\\n\\nCaused by:\\n    0: No such file or directory (os error 2)",
              file=sys.stderr)
        sys.exit(1)
    elif mode == "not-python":
        print("Error: Failed to find python version from target process", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
    """
)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """A plain gunicorn (the demo app's /, one worker) shared by the py-spy failure tests."""
    gunicorn = Gunicorn(tmp_path_factory.mktemp("one-worker"), {}, workers=1, threads=2)
    try:
        gunicorn.wait_ready(workers=1)
        yield gunicorn
    finally:
        gunicorn.stop()


def fake_py_spy(tmp_path: Path, mode: str) -> tuple[Path, Path]:
    """A fake py-spy script and the file that says how it fails."""
    mode_file = tmp_path / "py-spy-mode"
    mode_file.write_text(mode)
    fake = tmp_path / "py-spy"
    fake.write_text(FAKE_PY_SPY.format(python=sys.executable, mode=str(mode_file)))
    fake.chmod(0o755)
    return fake, mode_file


def fakes_running(fake: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            argv = proc.cmdline()
            if str(fake) in argv and "dump" in argv:
                found.append(proc)
    return found


def test_each_py_spy_failure_is_counted_under_its_reason_and_logged_once(
    tmp_path: Path, one_worker: Gunicorn
) -> None:
    fake, mode = fake_py_spy(tmp_path, "garbage")
    with agent_process(
        tmp_path, "--master-pid", str(one_worker.pid), "--sampler", "py-spy",
        "--py-spy", str(fake), "--py-spy-timeout", "1", "--max-dumps-per-minute", "600",
    ) as agent:  # fmt: skip
        agent.wait_for("bad output counted", lambda m: errors(m, "bad_output") >= 1, 15)
        # Each way py-spy fails, in turn: its reason counted (twice: the loop goes on).
        for how, reason in [
            ("garbage", "bad_output"),
            ("truncated", "bad_output"),
            ("hang", "timeout"),
            ("denied", "permission"),
        ]:
            mode.write_text(how)
            before = errors(agent.scrape(), reason)
            agent.wait_for(f"{how}: {reason} counted",
                           lambda m, r=reason, b=before: errors(m, r) >= b + 2, 15)  # fmt: skip
        # The executable gone, then not executable: py-spy missing, both times.
        mode.write_text("garbage")
        hidden = fake.with_name("py-spy.hidden")
        fake.rename(hidden)
        agent.wait_for("missing", lambda m: errors(m, "pyspy_missing") >= 2, 10)
        hidden.rename(fake)
        fake.chmod(0o644)
        before = errors(agent.scrape(), "pyspy_missing")
        agent.wait_for("not executable", lambda m: errors(m, "pyspy_missing") >= before + 2, 10)
        fake.chmod(0o755)
        # The target exits mid-dump: counted as vanished, forgotten, its respawn watched.
        victim = one_worker.worker_pids()
        mode.write_text("exit-mid-dump")
        agent.wait_for("vanished", lambda m: errors(m, "vanished") >= 1, 10)
        mode.write_text("not-python")
        wait_until("a respawned worker", lambda: bool(one_worker.worker_pids())
                   and one_worker.worker_pids() != victim, 10)  # fmt: skip
        m, _ = agent.wait_for("not_python counted, the new worker listed", lambda m:
                              errors(m, "not_python") >= 1
                              and worker_pids(m) == set(one_worker.worker_pids()), 10)  # fmt: skip
        assert not worker_pids(m) & set(victim)
        assert errors(m, "internal") == 0
        assert agent.proc.poll() is None
        log = agent.log()
        for line, reason in [("unreadable py-spy JSON", "bad_output"),
                             ("did not finish within 1s", "timeout"),
                             ("py-spy was denied access", "permission"),
                             ("cannot run", "pyspy_missing"),
                             ("Failed to find python version", "not_python")]:  # fmt: skip
            logged = [x for x in log.splitlines()
                      if line in x and ("WARNING" in x or "ERROR" in x)]  # fmt: skip
            assert len(logged) == 1, (reason, logged)
            assert f'reason="{reason}"' in logged[0]
    assert not fakes_running(fake)


def test_sigterm_with_py_spy_in_flight_exits_at_once_and_leaves_no_py_spy(
    tmp_path: Path, one_worker: Gunicorn
) -> None:
    fake, _ = fake_py_spy(tmp_path, "hang")
    agent = AgentProcess(tmp_path, [
        "--master-pid", str(one_worker.pid), "--sampler", "py-spy", "--py-spy", str(fake),
        "--py-spy-timeout", "60", "--interval", "0.5",
    ])  # fmt: skip
    try:
        wait_until("a py-spy run in flight", lambda: bool(fakes_running(fake)), 15, agent.log())
        in_flight = fakes_running(fake)
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.proc.wait(timeout=10)
        took = time.monotonic() - started
    finally:
        agent.stop()
    assert code == 0, agent.log()
    assert took < 3.0, f"took {took:.1f}s to exit"
    _, alive = psutil.wait_procs(in_flight, timeout=1)
    assert not alive and not fakes_running(fake), "an orphaned py-spy is left"
    assert "received SIGTERM; exiting" in agent.log()


# --- 5. gunicorn's own life ---------------------------------------------------------------------

SLEEPER_CONFIG = textwrap.dedent(
    """\
    import subprocess

    def when_ready(server):
        # A non-Python child of the master, beside its workers.
        server.sleeper = subprocess.Popen(["sleep", "300"])
        with open({path!r}, "w") as f:
            f.write(str(server.sleeper.pid))

    def on_exit(server):
        server.sleeper.kill()
    """
)


def test_gunicorn_starting_late_reloading_restarting_and_two_masters(tmp_path: Path) -> None:
    pidfile = tmp_path / "gunicorn.pid"
    sleeper = tmp_path / "sleeper.pid"
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(SLEEPER_CONFIG.format(path=str(sleeper)))
    started: list[Gunicorn] = []

    def gunicorn(name: str, *extra: str, workers: int = 2) -> Gunicorn:
        workdir = tmp_path / name
        workdir.mkdir()
        g = Gunicorn(workdir, {}, workers=workers, threads=1, extra_args=extra)
        started.append(g)
        g.wait_ready(workers=workers)
        return g

    def listed(agent: AgentProcess, g: Gunicorn, what: str, timeout: float = 15) -> Metrics:
        m, _ = agent.wait_for(what, lambda m: (live := set(g.worker_pids()) - sleeper_pids())
                              and worker_pids(m, g.pid) == live, timeout)  # fmt: skip
        return m

    def sleeper_pids() -> set[int]:
        return {int(sleeper.read_text())} if sleeper.exists() else set()

    clock = time.monotonic()

    def phase(name: str) -> None:
        nonlocal clock
        print(f"{name}: {time.monotonic() - clock:.1f}s")
        clock = time.monotonic()

    with (
        agent_process(tmp_path / "a", "--pidfile", str(pidfile)) as by_pidfile,
        contextlib.ExitStack() as later,
    ):
        # Not running yet: up 0, and why.
        m, _ = by_pidfile.wait_for("a first cycle", lambda m: m.value(
            "deadlock_agent_last_sample_timestamp_seconds") is not None, 15)  # fmt: skip
        assert m.value("deadlock_agent_up") == 0
        assert m.value("deadlock_agent_down_reason", reason="no_master") == 1
        assert m.value("deadlock_agent_masters") == 0
        # It starts (with a non-Python child of its master): both agents attach.
        first = gunicorn("first", "--pid", str(pidfile), "-c", str(config))
        m = listed(by_pidfile, first, "attached by pidfile")
        assert m.value("deadlock_agent_up") == 1
        assert m.value("deadlock_agent_down_reason", reason="no_master") == 0
        assert sleeper_pids() and not worker_pids(m) & sleeper_pids()  # `sleep` is no worker
        phase("attached by pidfile")
        # A second master on the host: found by command line, each worker under its master.
        second = gunicorn("second", workers=1)
        by_cmdline = later.enter_context(agent_process(tmp_path / "b"))
        listed(by_cmdline, first, "the first master's workers by command line")
        m = listed(by_cmdline, second, "the second master's worker")
        phase("two masters by command line")
        assert worker_pids(m, first.pid) == set(first.worker_pids()) - sleeper_pids()
        assert (m.value("deadlock_agent_masters") or 0) >= 2
        # kill -HUP: new workers replace the old; no old pid stays.
        old = set(first.worker_pids()) - sleeper_pids()
        os.kill(first.pid, signal.SIGHUP)
        wait_until("new workers after HUP, the old ones gone", lambda: len(
            set(first.worker_pids()) - sleeper_pids() - old) == 2
            and not set(first.worker_pids()) & old, 15)  # fmt: skip
        for agent in (by_pidfile, by_cmdline):
            m = listed(agent, first, "the reloaded workers")
            assert not worker_pids(m) & old
        phase("HUP")
        # The master restarts: a new pid on the same port and pidfile.
        first.stop()
        wait_until("the old master gone", lambda: not pidfile.exists(), 10)
        sleeper.unlink(missing_ok=True)
        again = gunicorn("again", "--pid", str(pidfile), "--bind", f"127.0.0.1:{first.port}",
                         "-c", str(config))  # fmt: skip
        assert again.pid != first.pid
        for agent in (by_pidfile, by_cmdline):
            m = listed(agent, again, "the restarted master")
            assert not worker_pids(m, first.pid)
            assert errors(m, "internal") == 0
        phase("restart")
        log = by_pidfile.log()
        assert "is no gunicorn worker" in log
        assert log.count("gunicorn may be (re)starting") <= 2, log  # not once a cycle
        for g in started:
            g.stop()
