"""`deadlock-agent run -- gunicorn ...`, as a Procfile's `web:` line runs on Heroku: the seed's
hang found from inside the same process tree, Heroku's shutdown (SIGTERM to every process,
twice), the child's exit status, and an agent whose failures never stop the app."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from harness import Scraper, running_app
from pgserver import PgServer

from agent.demo.run import free_port, get

pytestmark = pytest.mark.integration

STUCK_AFTER = 5.0
SIG = "libpq_ssl_with_https"


def launcher(port: int, tmp_path: Path, *extra: str) -> list[str]:
    """`deadlock-agent run [options] --`, serving its metrics on `port`."""
    return [
        sys.executable, "-m", "agent", "run",
        "--web.listen-address", f"127.0.0.1:{port}",
        "--incidents.dir", str(tmp_path / "incidents"),
        "--interval", "1", "--stuck-after", str(STUCK_AFTER),
        *extra, "--",
    ]  # fmt: skip


def session(sid: int) -> list[psutil.Process]:
    """Every live process of a session (the wrapper's: it was started as a session leader)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return found


def heroku_shutdown(sid: int, times: int = 2) -> None:
    """What Heroku's dyno manager does: SIGTERM to every process in the dyno, maybe twice."""
    for _ in range(times):
        for proc in session(sid):
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.3)


def wait_until(what: str, check: Callable[[], bool], timeout: float, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{log[-3000:]}")


def test_seed_hang_detected_then_heroku_shutdown_ends_with_gunicorns_status(
    tmp_path: Path, postgres: PgServer
) -> None:
    port = free_port()
    with running_app(tmp_path, postgres, launcher=launcher(port, tmp_path)) as app:
        wrapper = app.gunicorn.proc
        log = app.gunicorn.log_path.read_text
        agent = Scraper(f"http://127.0.0.1:{port}", log=log)
        agent.wait_for(
            "both workers watched",
            lambda m: m.value("deadlock_agent_up") == 1
            and (m.value("deadlock_agent_workers", state="ok") or 0) >= 2,
            timeout=30,
        )
        assert psutil.Process(app.gunicorn.pid).ppid() == wrapper.pid  # the wrapper's child

        app.database.stall()
        app.harvest.stall()
        fault_at = time.monotonic()
        app.traffic(["/db"], concurrency=16)
        m, _ = agent.wait_for(
            SIG,
            lambda m: (m.value("deadlock_agent_deadlocked_workers", signature=SIG) or 0) >= 1,
            timeout=STUCK_AFTER + 20,
        )
        print(f"{SIG} detected under `run` {time.monotonic() - fault_at:.1f}s after the fault")
        assert (m.value("deadlock_agent_deadlocks_detected_total", signature=SIG) or 0) >= 1
        assert list((tmp_path / "incidents").glob("*.json")), "no incident evidence kept"

        app._stop.set()  # no new requests; the hung ones end with the shutdown
        before = {p.pid for p in session(wrapper.pid)}
        assert len(before) >= 3, before  # wrapper, master, workers (py-spy maybe)
        heroku_shutdown(wrapper.pid, times=2)
        code = wrapper.wait(timeout=25)
        text = log()
        assert code == 0, f"exit {code}\n{text[-3000:]}"  # gunicorn's own status after TERM
        assert "stopped sampling; waited for the app without signalling it" in text, text[-2000:]
        assert "the app exited with status 0" in text
        wait_until("no process of the dyno left", lambda: not session(wrapper.pid), 5, text)


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    print("child", "handles SIGTERM", flush=True)
    time.sleep(60)
    """
)


def start_wrapper(
    tmp_path: Path, port: int, *extra: str, child: str = CHILD
) -> subprocess.Popen[str]:
    log = (tmp_path / "wrapper.log").open("w")
    return subprocess.Popen(
        [*launcher(port, tmp_path, *extra), sys.executable, "-c", child],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def child_of(wrapper: subprocess.Popen[str]) -> psutil.Process:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = psutil.Process(wrapper.pid).children()
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise AssertionError("the wrapper started no child")


@pytest.mark.parametrize(
    ("how", "status"),
    [("sigterm-twice", 3), ("sigkill-child", 128 + signal.SIGKILL)],
)
def test_exit_status_is_the_childs(tmp_path: Path, how: str, status: int) -> None:
    wrapper = start_wrapper(tmp_path, free_port())
    try:
        child = child_of(wrapper)
        wait_until(
            "the child's handler",
            lambda: "child handles SIGTERM" in (tmp_path / "wrapper.log").read_text(),
            10,
        )
        if how == "sigterm-twice":
            heroku_shutdown(wrapper.pid, times=2)
        else:
            child.kill()
        code = wrapper.wait(timeout=15)
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait(5)
    assert code == status, (tmp_path / "wrapper.log").read_text()
    assert not session(wrapper.pid)


def test_agent_that_cannot_start_leaves_the_app_running(tmp_path: Path) -> None:
    """The agent's port is taken: it says it is not watching, and the app runs on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        wrapper = start_wrapper(tmp_path, taken.getsockname()[1])
        try:
            child = child_of(wrapper)
            log = tmp_path / "wrapper.log"
            wait_until("the agent's complaint and the child's handler", lambda: all(
                needle in log.read_text()
                for needle in ("is not watching this app", "child handles SIGTERM")
            ), 15)  # fmt: skip
            assert child.is_running() and wrapper.poll() is None
            heroku_shutdown(wrapper.pid)
            assert wrapper.wait(timeout=15) == 3, log.read_text()
        finally:
            if wrapper.poll() is None:
                os.killpg(wrapper.pid, signal.SIGKILL)


FAKE_PY_SPY = textwrap.dedent(
    """\
    #!{python}
    # A py-spy gone wrong: its first dump hangs (the test kills it), the second prints
    # truncated JSON, every later one fails.
    import pathlib, sys, time
    if "--version" in sys.argv:
        print("py-spy 0.4.3")
        sys.exit(0)
    calls = pathlib.Path({calls!r})
    with calls.open("a") as f:
        f.write("x")
    n = len(calls.read_text())
    if n == 1:
        time.sleep(120)
    if n == 2:
        print("[{{\\"thread_id\\": ")
        sys.exit(0)
    print("Error: something broke", file=sys.stderr)
    sys.exit(1)
    """
)


def test_sampler_killed_or_failing_never_stops_the_app(
    tmp_path: Path, postgres: PgServer
) -> None:
    calls = tmp_path / "py-spy-calls"
    fake = tmp_path / "py-spy"
    fake.write_text(FAKE_PY_SPY.format(python=sys.executable, calls=str(calls)))
    fake.chmod(0o755)
    port = free_port()
    args = launcher(port, tmp_path, "--py-spy", str(fake), "--py-spy-timeout", "60",
                    "--sampler", "py-spy")  # fmt: skip
    with running_app(tmp_path, postgres, launcher=args) as app:
        agent = Scraper(f"http://127.0.0.1:{port}", log=app.gunicorn.log_path.read_text)

        def hanging_py_spy() -> list[psutil.Process]:
            found = []
            for proc in session(app.gunicorn.proc.pid):
                with contextlib.suppress(psutil.NoSuchProcess):
                    argv = proc.cmdline()
                    if str(fake) in argv and "dump" in argv:  # not the wrapper's --py-spy
                        found.append(proc)
            return found

        # The sampler hangs inside py-spy: kill it, as an OOM killer or an operator might.
        # (Killed only once it is inside the hang: a kill before it counted its call would
        # make the next run the hanging one.)
        wait_until("a py-spy run hanging", lambda: calls.exists() and calls.read_text() == "x"
                   and bool(hanging_py_spy()), 20)  # fmt: skip
        for proc in hanging_py_spy():
            proc.kill()
        m, _ = agent.wait_for(
            "the killed run and the garbage counted",
            lambda m: (m.value("deadlock_agent_sample_errors_total", reason="pyspy_failed")
                       or 0) >= 1
            and (m.value("deadlock_agent_sample_errors_total", reason="bad_output") or 0) >= 1,
            timeout=30,
        )  # fmt: skip
        # The loop goes on (its cycles keep finishing), and so does the app.
        first = m.value("deadlock_agent_last_sample_timestamp_seconds") or 0
        agent.wait_for("later cycles", lambda m: (
            m.value("deadlock_agent_last_sample_timestamp_seconds") or 0) > first + 1, 10)
        for _ in range(20):
            assert get(app.gunicorn.url + "/", timeout=5) == 200
        assert app.gunicorn.proc.poll() is None
        assert psutil.Process(app.gunicorn.pid).is_running()
        text = app.gunicorn.log_tail(200)
        assert "unreadable py-spy JSON" in text, text
