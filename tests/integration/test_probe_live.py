"""The in-process probe in real gunicorn workers (gthread and gevent), started by the bootstrap
through probe_environ, asked by ProbeClient, and compared with what py-spy prints for the same
frames; then a worker whose GIL is held by a regular expression: silent, yet its stacks come
from faulthandler's watchdog."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from harness import py_spy_dump

from agent.demo.run import Gunicorn, get
from agent.errors import ProbeSilent
from agent.probe import THREAD_COMM, THREAD_NAME, probe_environ, socket_path, stacks_path
from agent.probe.client import ProbeClient
from agent.procfs import parse_syscall, syscall_name
from agent.pyspy import parse_dump
from agent.signatures import load_catalog
from agent.types import StackSnapshot, ThreadStack, WorkerRef

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
APPS = Path(__file__).resolve().parent / "apps"


@dataclass
class Served:
    """gunicorn serving apps/probe_app.py with the probe, one worker."""

    gunicorn: Gunicorn
    probes: Path
    worker: WorkerRef
    silent: socket.socket  # accepts TCP connections (backlog) and never answers
    held: list[socket.socket] = field(default_factory=list)  # requests left hanging

    def hang(self, path: str) -> None:
        """Send a request that never completes and keep its connection open."""
        conn = socket.create_connection(("127.0.0.1", self.gunicorn.port), timeout=5)
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        self.held.append(conn)


@contextlib.contextmanager
def serve(tmp_path: Path, worker_class: str, threads: int = 4) -> Iterator[Served]:
    # Sockets go in a short directory: a socket path holds at most 107 bytes.
    probes = Path(tempfile.mkdtemp(prefix="da-probes-", dir="/tmp"))
    silent = socket.create_server(("127.0.0.1", 0))
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = probe_environ({**os.environ, "PYTHONPATH": pythonpath}, str(probes))
    env["DEADLOCK_AGENT_PROBE_WATCHDOG"] = "1.5"
    env["PROBE_APP_SILENT_PORT"] = str(silent.getsockname()[1])
    gunicorn = Gunicorn(
        tmp_path, env, worker_class=worker_class, workers=1, threads=threads,
        # --graceful-timeout 1: a worker left spinning in _sre ignores SIGTERM; do not wait 3 s.
        extra_args=("--pythonpath", str(APPS), "--timeout", "120", "--graceful-timeout", "1"),
        app="probe_app:app",
    )  # fmt: skip
    served = None
    try:
        gunicorn.wait_ready(workers=1)
        (pid,) = gunicorn.worker_pids()
        worker = WorkerRef(pid, psutil.Process(pid).create_time(), gunicorn.pid)
        served = Served(gunicorn, probes, worker, silent)
        yield served
    finally:
        for conn in served.held if served else ():
            conn.close()
        gunicorn.stop()
        silent.close()
        shutil.rmtree(probes, ignore_errors=True)


@pytest.fixture(scope="module")
def gthread(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("probe-gthread"), "gthread") as served:
        yield served


def thread_in(snapshot: StackSnapshot, function: str) -> ThreadStack:
    found = [t for t in snapshot.threads if any(f.function == function for f in t.frames)]
    assert len(found) == 1, [(t.name, [str(f) for f in t.frames[:3]]) for t in snapshot.threads]
    return found[0]


def blocked_in(pid: int, tid: int) -> str | None:
    """The syscall a thread blocks in, from /proc (None while it runs)."""
    try:
        text = Path(f"/proc/{pid}/task/{tid}/syscall").read_text()
    except OSError:
        return None
    return syscall_name(parse_syscall(text)[0])


def tids_of(pid: int) -> set[int]:
    """A process's live threads."""
    return {int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()}


def own_threads(pid: int) -> set[int]:
    """The probe's thread and faulthandler's watchdog: /proc comm says so."""
    own = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().strip() == THREAD_COMM:
                own.add(int(task.name))
    return own


def test_gthread_worker_probe_matches_procfs_and_py_spy(gthread: Served) -> None:
    worker = gthread.worker
    path = Path(socket_path(str(gthread.probes), worker.pid))
    assert path.stat().st_mode & 0o777 == 0o600
    assert not Path(socket_path(str(gthread.probes), gthread.gunicorn.pid)).exists()  # master
    gthread.hang("/wait")
    gthread.hang("/recv")
    client = ProbeClient(str(gthread.probes), timeout=2.0)
    try:
        deadline = time.monotonic() + 10
        while True:  # a readiness handshake: until both requests are inside the app
            snapshot = client.dump(worker, native=False)
            functions = {f.function for t in snapshot.threads for f in t.frames}
            if {"wait_forever", "recv_forever"} <= functions or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        waiting = thread_in(snapshot, "wait_forever")
        reading = thread_in(snapshot, "recv_forever")
        # ...and until both block in their syscalls (read from outside: the test runs as root).
        while time.monotonic() < deadline and (
            blocked_in(worker.pid, waiting.tid) != "futex"
            or blocked_in(worker.pid, reading.tid) != "recvfrom"
        ):
            time.sleep(0.05)
        snapshot = client.dump(worker, native=False)  # now they stay where they are
        waiting = thread_in(snapshot, "wait_forever")
        reading = thread_in(snapshot, "recv_forever")
        hello = client._connections[worker].hello
        assert hello["native_frames"] is False
        assert THREAD_NAME not in {t.name for t in snapshot.threads}
        assert hello["probe_tid"] not in {t.tid for t in snapshot.threads}
        main = next(t for t in snapshot.threads if t.name == "MainThread")
        assert main.tid == worker.pid

        # A new connection: the first scan has every thread but the probe's own.
        client.close()
        sample = client.scan(worker, now=time.time())
        live = tids_of(worker.pid)
        assert sample.tids == frozenset(live - own_threads(worker.pid))
        by_tid = {t.tid: t for t in sample.threads}
        assert set(by_tid) == set(sample.tids)
        assert by_tid[waiting.tid].syscall_name == "futex"
        assert by_tid[reading.tid].syscall_name == "recvfrom"
        assert by_tid[worker.pid].syscall_name in ("epoll_wait", "epoll_pwait", "poll")
        assert not by_tid[reading.tid].timed_wait

        # py-spy prints the same function, file and line for every frame of these threads.
        spied = parse_dump(py_spy_dump(worker.pid, native=False), worker=worker, taken_at=0.0,
                           native=False)  # fmt: skip
        spied_by_tid = {t.tid: t for t in spied.threads}
        assert spied_by_tid[main.tid].name == "MainThread"  # (it moves: its loop wakes each 1 s)
        for ours in (waiting, reading):
            theirs = spied_by_tid[ours.tid]
            assert [(f.function, f.file, f.line) for f in ours.frames] == [
                (f.function, f.file, f.line) for f in theirs.frames
            ], ours.name
            assert ours.name == theirs.name
        assert (waiting.frames[2].function, waiting.frames[2].file) == (
            "wait_forever", "probe_app.py",
        )  # fmt: skip
        assert reading.frames[0].function == "recv_forever"
        # py-spy sees the probe's thread under its name, idle in agent/probe/worker.py.
        probe_thread = spied_by_tid[hello["probe_tid"]]
        assert probe_thread.name == THREAD_NAME
        assert probe_thread.frames[0].file == "agent/probe/worker.py"
        rule = load_catalog().idle_rule(probe_thread)  # never called stuck by the analysis
        assert rule is not None and "probe" in rule.name

        # No AF_INET socket of the probe's: only gunicorn's listener, its clients, and the
        # app's own connection to the silent server.
        gport, sport = gthread.gunicorn.port, gthread.silent.getsockname()[1]
        for conn in psutil.Process(worker.pid).net_connections(kind="inet"):
            assert conn.laddr.port == gport or (conn.raddr and conn.raddr.port == sport), conn

        # A worker's own fork gets no probe.
        with socket.create_connection(("127.0.0.1", gthread.gunicorn.port), timeout=10) as c:
            c.sendall(b"GET /fork HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := c.recv(4096):
                reply += chunk
        assert b"socket=0" in reply, reply
        client.scan(worker, now=time.time())  # and the probe still answers
    finally:
        client.close()


def test_gil_held_by_a_regex_is_silent_but_the_watchdog_has_the_stacks(gthread: Served) -> None:
    """Last on this app: the worker spins in _sre for hours; teardown kills it."""
    worker = gthread.worker
    client = ProbeClient(str(gthread.probes), timeout=1.0)
    try:
        client.dump(worker, native=False)  # a good answer: arms the watchdog, learns the threads
        gthread.hang("/regex?n=40")
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(ProbeSilent) as caught:
            client.scan(worker, now=time.time())
        assert time.monotonic() - started < 1.5
        assert "GIL" in str(caught.value)
        stacks = Path(stacks_path(str(gthread.probes), worker.pid))
        deadline = time.monotonic() + 5
        while "Timeout (" not in stacks.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        started = time.monotonic()
        snapshot = client.dump(worker, native=False)
        assert time.monotonic() - started < 1.5
        assert not snapshot.native
        spinning = thread_in(snapshot, "validate")
        assert [(f.function, f.file) for f in spinning.frames[:2]] == [
            ("match", "re/__init__.py"), ("validate", "probe_app.py"),
        ]  # fmt: skip
        assert spinning.name is not None and spinning.name.startswith("ThreadPoolExecutor")
        assert spinning.tid in tids_of(worker.pid)
    finally:
        client.close()


def test_gevent_worker_probe_is_a_real_thread_that_answers(tmp_path: Path) -> None:
    with serve(tmp_path, "gevent", threads=1) as served:
        worker = served.worker
        client = ProbeClient(str(served.probes), timeout=2.0)
        try:
            for _ in range(3):  # after gevent's patch_all, with requests in between
                assert get(served.gunicorn.url + "/", timeout=5) == 200
                sample = client.scan(worker, now=time.time())
                snapshot = client.dump(worker, native=False)
            assert worker.pid in sample.tids
            main = next(t for t in snapshot.threads if t.tid == worker.pid)
            assert any(f.file.startswith("gevent/") for f in main.frames), main
            probe_tid = client._connections[worker].hello["probe_tid"]
            assert probe_tid != worker.pid
            assert probe_tid in tids_of(worker.pid)
            sock = Path(socket_path(str(served.probes), worker.pid))
            assert sock.exists()
        finally:
            client.close()
        log = served.gunicorn.log_path
    # The worker exited normally (no request was hanging): atexit removed its files.
    deadline = time.monotonic() + 5
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sock.exists()
    assert not Path(stacks_path(str(served.probes), worker.pid)).exists()
    text = log.read_text()
    assert "MonkeyPatchWarning" not in text
    assert "deadlock-agent probe" not in text, text
