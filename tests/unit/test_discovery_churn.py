"""agent/discovery.py with real processes: which children of a master are workers, whether a
worker still runs (pid, start time, zombie), per-pid tables pruned under churn, and a missing
pidfile logged once. The master here is this test process; its children are real."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from agent.discovery import Discovery, _is_worker, running
from agent.types import WorkerRef

MASTER = ("/venv/bin/python", "-m", "gunicorn", "app:app")
PYTHON = "/usr/lib/python3.11"


@pytest.mark.parametrize(
    ("cmdline", "exe", "worker"),
    [
        (MASTER, PYTHON, True),
        (("gunicorn: worker [app:app]",), PYTHON, True),
        (("gunicorn:", "worker", "[app:app]"), PYTHON, True),
        (("/venv/bin/python", "-c", "helper()"), PYTHON, True),  # Python: py-spy reads it
        (("sleep", "300"), "/usr/bin/sleep", False),
        (("node", "sidecar.js"), "/usr/bin/node", False),
        (("sleep", "300"), None, True),  # cannot read its executable: watched, py-spy says
        ((), None, False),  # a zombie
    ],
    ids=["fork", "proctitle", "proctitle-split", "python-child", "sleep", "node",
         "unknown-exe", "zombie"],
)  # fmt: skip
def test_a_worker_is_a_fork_of_the_master_or_runs_its_interpreter(
    cmdline: tuple[str, ...], exe: str | None, worker: bool
) -> None:
    assert _is_worker(cmdline, exe, MASTER, PYTHON) is worker


def me() -> WorkerRef:
    return WorkerRef(os.getpid(), psutil.Process().create_time(), 1)


def test_running_is_the_same_live_process() -> None:
    assert running(me())
    assert not running(replace(me(), create_time=me().create_time - 3600))  # pid reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ref = WorkerRef(child.pid, psutil.Process(child.pid).create_time(), 1)
    deadline = time.monotonic() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not reaped
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not running(ref)  # a zombie is gone
    child.wait()
    assert not running(ref)


@pytest.fixture
def forked() -> Iterator[int]:
    """A fork of this process (its very command line), as gunicorn forks a worker."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only sleeps
        time.sleep(30)
        os._exit(0)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_only_forks_of_the_master_are_workers_and_others_are_pruned(
    forked: int, caplog: pytest.LogCaptureFixture
) -> None:
    helper = subprocess.Popen(["sleep", "30"])
    try:
        discovery = Discovery(master_pid=os.getpid(), relist_every=1)
        with caplog.at_level(logging.INFO, logger="agent.discovery"):
            for _ in range(3):
                masters, refs = discovery.workers()
        assert masters == (os.getpid(),)
        pids = {ref.pid for ref in refs}
        assert forked in pids and helper.pid not in pids
        # (pytest's process may have other non-Python children of its own under CI.)
        assert [r.getMessage() for r in caplog.records if f"pid {helper.pid}," in r.getMessage()
                ] == [f"pid {helper.pid}, a child of gunicorn master {os.getpid()}, is no gunicorn "
                      "worker (another program); not watched"]  # fmt: skip
        assert helper.pid in discovery._others
    finally:
        helper.kill()
        helper.wait()
    discovery.workers()
    assert helper.pid not in discovery._others  # gone: nothing kept for its pid
    assert set(discovery._refs) <= {forked} | {p.pid for p in psutil.Process().children()}


def test_a_missing_pidfile_is_logged_once_not_every_cycle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pidfile = tmp_path / "gunicorn.pid"
    discovery = Discovery(pidfile=str(pidfile))
    with caplog.at_level(logging.WARNING, logger="agent.discovery"):
        for _ in range(20):
            assert discovery.workers() == ((), ())
    assert len(caplog.records) == 1, caplog.records
    assert "gunicorn may be (re)starting" in caplog.records[0].getMessage()
    pidfile.write_text(str(os.getpid()))
    masters, _ = discovery.workers()
    assert masters == (os.getpid(),)
