"""agent/discovery.py against a real gunicorn (sync worker, 2 workers): by command line, by
--master-pid and by gunicorn's own --pid file."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from agent.discovery import Discovery
from agent.types import WorkerRef

pytestmark = pytest.mark.integration

WORKERS = 2
APP = '''\
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"tiny"]
'''


@dataclass
class RealGunicorn:
    """A running gunicorn master, its pidfile and its log."""

    proc: subprocess.Popen[bytes]
    pidfile: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> set[WorkerRef]:
        """The master's children as psutil sees them right now."""
        return {
            WorkerRef(kid.pid, kid.create_time(), self.pid)
            for kid in psutil.Process(self.pid).children()
        }


def wait_ready(g: RealGunicorn, timeout: float = 30.0) -> None:
    """Until the pidfile is written, both workers exist and one answers HTTP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if g.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {g.proc.returncode}: {g.log.read_text()}")
        text = g.log.read_text(errors="replace")
        port = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
        if port and g.pidfile.exists() and len(g.workers()) == WORKERS:
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{port.group(1)}/"
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
        time.sleep(0.05)
    raise RuntimeError(f"gunicorn not ready after {timeout:g}s: {g.log.read_text()}")


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[RealGunicorn]:
    (tmp_path / "tinyapp.py").write_text(APP)
    pidfile, log = tmp_path / "gunicorn.pid", tmp_path / "gunicorn.log"
    argv = [
        sys.executable, "-m", "gunicorn",
        "--control-socket", str(tmp_path / "ctl.sock"),
        "--bind", "127.0.0.1:0",
        "--worker-class", "sync",
        "--workers", str(WORKERS),
        "--chdir", str(tmp_path),
        "--pid", str(pidfile),
        "--graceful-timeout", "2",
        "tinyapp:app",
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    g = RealGunicorn(proc, pidfile, log)
    kids: list[psutil.Process] = []
    try:
        wait_ready(g)
        kids = psutil.Process(g.pid).children()
        yield g
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            kids = kids or psutil.Process(g.pid).children()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for kid in kids:
            with contextlib.suppress(psutil.NoSuchProcess):
                kid.kill()


def test_found_by_command_line(gunicorn: RealGunicorn) -> None:
    masters, refs = Discovery().workers()
    # Other gunicorns may be running on this machine (other tests): look only at ours.
    assert gunicorn.pid in masters
    ours = {ref for ref in refs if ref.master_pid == gunicorn.pid}
    assert ours == gunicorn.workers()
    assert len(ours) == WORKERS
    for ref in ours:
        assert ref.create_time == psutil.Process(ref.pid).create_time()
        assert ref.create_time >= psutil.Process(gunicorn.pid).create_time()
    assert not {ref.pid for ref in refs} & set(masters)  # a master is never its own worker


def test_pinned_by_master_pid(gunicorn: RealGunicorn) -> None:
    discovery = Discovery(master_pid=gunicorn.pid)
    masters, refs = discovery.workers()
    assert masters == (gunicorn.pid,)
    assert set(refs) == gunicorn.workers()
    assert list(refs) == sorted(refs)
    assert discovery.workers() == (masters, refs)  # stable across cycles


def test_pinned_by_pidfile(gunicorn: RealGunicorn) -> None:
    assert int(gunicorn.pidfile.read_text()) == gunicorn.pid
    masters, refs = Discovery(pidfile=str(gunicorn.pidfile)).workers()
    assert masters == (gunicorn.pid,)
    assert set(refs) == gunicorn.workers()


def test_missing_pidfile_finds_nothing_but_does_not_raise(tmp_path: Path) -> None:
    assert Discovery(pidfile=str(tmp_path / "absent.pid")).workers() == ((), ())


def test_pinned_master_that_is_gone_finds_nothing() -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(10)
    assert Discovery(master_pid=done.pid).workers() == ((), ())
