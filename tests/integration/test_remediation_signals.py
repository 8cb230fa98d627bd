"""agent/signaller.py against real processes: the identity check right before each signal (pid
reuse, a parent that is not a discovered master, a master itself), and a real signal when all
holds. Each test starts its own `sleep` and reaps it in `finally`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from agent.remediation import Action
from agent.signaller import Signaller
from agent.types import WorkerRef

pytestmark = pytest.mark.integration

ME = os.getpid()  # the test process plays the gunicorn master of its `sleep` child


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def worker_of(proc: subprocess.Popen[bytes], *, master: int = ME) -> WorkerRef:
    return WorkerRef(proc.pid, psutil.Process(proc.pid).create_time(), master)


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "kill"])
def test_pid_reuse_is_refused_and_the_process_lives(
    child: subprocess.Popen[bytes], use_pidfd: bool
) -> None:
    # The pid the agent judged, but another start time: the pid now holds another process.
    real = worker_of(child)
    stale = WorkerRef(child.pid, real.create_time - 120.0, ME)
    for action in Action:
        result, detail = Signaller(use_pidfd=use_pidfd).send(stale, action, masters={ME})
        assert result == "identity_changed", detail
        assert "pid reused" in detail
    assert child.poll() is None  # still alive: nothing was sent
    assert psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE


def test_a_parent_that_is_not_a_discovered_master_is_refused(
    child: subprocess.Popen[bytes],
) -> None:
    signaller = Signaller()
    # Its real parent (this process) is not among the discovered masters.
    result, detail = signaller.send(worker_of(child), Action.KILL, masters={1234567})
    assert result == "refused", detail
    assert detail.endswith("is not a discovered master")
    # It claims a discovered master, but its parent is someone else.
    liar = worker_of(child, master=os.getppid())
    result, detail = signaller.send(liar, Action.KILL, masters={os.getppid()})
    assert result == "refused", detail
    assert f"its parent is {ME}" in detail
    assert child.poll() is None


def test_a_master_is_never_signalled(child: subprocess.Popen[bytes]) -> None:
    as_master = WorkerRef(child.pid, psutil.Process(child.pid).create_time(), ME)
    result, detail = Signaller().send(as_master, Action.KILL, masters={ME, child.pid})
    assert result == "refused", detail
    assert child.poll() is None


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "kill"])
def test_the_checked_worker_is_signalled_then_found_gone(
    child: subprocess.Popen[bytes], use_pidfd: bool
) -> None:
    """The control: with every rail satisfied the signal is really sent (so the refusals above
    are the rails at work), and the exited process, zombie or reaped, is `gone`."""
    worker = worker_of(child)
    signaller = Signaller(use_pidfd=use_pidfd)
    assert signaller.send(worker, Action.ABORT, masters={ME}) == ("done", "")
    # Not reaped yet: a zombie is gone for remediation's purposes (no SIGKILL needed).
    deadline = time.monotonic() + 5
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "SIGABRT did not end the child"
        time.sleep(0.02)
    assert signaller.send(worker, Action.KILL, masters={ME}) == ("gone", "exited")
    assert child.wait(5) == -signal.SIGABRT
    assert signaller.send(worker, Action.KILL, masters={ME})[0] == "gone"
