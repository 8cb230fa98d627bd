"""agent/probe: the request/reply protocol on both sides. The worker side's answers are made by a
real Probe (in this process, no thread); the client is run against a real probe in a child
Python, a stale socket file, a peer that answers garbage, and a peer that never answers."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ProbeBadReply, ProbeMissing, ProbeSilent, ProcessVanished
from agent.probe import PROBE_VERSION, THREAD_COMM, THREAD_NAME, socket_path
from agent.probe.client import ProbeClient, decode_reply, parse_dump, parse_scan
from agent.probe.worker import Probe
from agent.types import WorkerRef

ROOT = Path(__file__).resolve().parents[2]
WORKER = WorkerRef(pid=4242, create_time=1700000000.0, master_pid=4200)


def ask(probe: Probe, request: object) -> dict[str, Any]:
    raw = request if isinstance(request, bytes) else json.dumps(request).encode()
    reply = json.loads(probe.answer(raw))
    assert isinstance(reply, dict)
    return reply


# --- the worker side, in this process ---------------------------------------------------------


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[Probe]:
    p = Probe(str(tmp_path))
    yield p
    p.release_fds()


@pytest.mark.parametrize(
    ("request_line", "error"),
    [
        (b"not json", "JSONDecodeError"),
        (b"[1, 2]", "unknown op None"),
        (b'{"op": "locals"}', "unknown op 'locals'"),
        (b'{"no": "op"}', "unknown op None"),
        (b"\xff\xfe", "Error: "),
    ],
    ids=["garbage", "list", "unknown-op", "no-op", "bad-utf8"],
)
def test_bad_requests_get_an_error_not_an_exception(
    probe: Probe, request_line: bytes, error: str
) -> None:
    reply = ask(probe, request_line)
    assert set(reply) == {"error"}
    assert error in reply["error"]


def test_hello_says_what_it_cannot_see(probe: Probe) -> None:
    reply = ask(probe, {"op": "hello"})
    assert reply["pid"] == os.getpid()
    assert reply["probe"] == PROBE_VERSION
    assert reply["native_frames"] is False
    assert reply["python"] == ".".join(map(str, sys.version_info[:3]))


def parked() -> None:
    """A function this test's helper thread waits in, by name."""
    threading.Event().wait(30)


def test_dump_round_trip_shows_this_thread_and_a_waiting_one(probe: Probe) -> None:
    ready = threading.Event()
    stop = threading.Event()

    def helper() -> None:
        ready.set()
        stop.wait(30)

    thread = threading.Thread(target=helper, name="helper-thread", daemon=True)
    thread.start()
    ready.wait(5)
    try:
        reply = ask(probe, {"op": "dump"})
    finally:
        stop.set()
        thread.join(5)
    snapshot, names = parse_dump(reply, worker=WORKER, taken_at=5.0)
    assert not snapshot.native
    by_name = {t.name: t for t in snapshot.threads}
    waiting = by_name["helper-thread"]
    assert waiting.tid == thread.native_id
    # Innermost first, qualified names and py-spy's short file names.
    functions = [(f.function, f.file) for f in waiting.frames]
    assert functions[:2] == [("Condition.wait", "threading.py"), ("Event.wait", "threading.py")]
    assert functions[-1] == ("Thread._bootstrap", "threading.py")
    this = next(t for t in snapshot.threads if t.tid == threading.get_native_id())
    top = this.frames[0]
    assert (top.function, top.file) == ("Probe.dump", "agent/probe/worker.py")
    assert any(f.function == test_dump_round_trip_shows_this_thread_and_a_waiting_one.__name__
               and f.file == "test_probe_protocol.py" for f in this.frames)  # fmt: skip
    assert names[threading.get_ident()][0] == threading.get_native_id()
    assert all(not hasattr(f, "locals") for t in snapshot.threads for f in t.frames)


def test_scan_reports_every_thread_then_only_those_that_ran(probe: Probe) -> None:
    first = parse_scan(ask(probe, {"op": "scan"}), worker=WORKER, taken_at=1.0)
    live = {int(task.name) for task in Path("/proc/self/task").iterdir()}
    assert first.tids == frozenset(live)
    assert {t.tid for t in first.threads} == live
    assert first.worker == WORKER
    assert first.taken_at == 1.0
    assert first.resolution_ns == 1
    again = parse_scan(ask(probe, {"op": "scan"}), worker=WORKER, taken_at=2.0)
    # Only this (running) thread can have run in between.
    assert {t.tid for t in again.threads} <= {threading.get_native_id()}


# --- reply validation (pure) -----------------------------------------------------------------

GOOD_THREAD = [7, 100, "python", "S", 5, 2, 7, None, "0x1 0x2 0x3 0x4 0x5", False, "poll"]


@pytest.mark.parametrize(
    "reply",
    [
        {"resolution_ns": "1", "tids": [], "threads": []},
        {"resolution_ns": 0, "tids": [], "threads": []},
        {"resolution_ns": 1, "tids": "7", "threads": []},
        {"resolution_ns": 1, "tids": [True], "threads": []},
        {"resolution_ns": 1, "tids": [7], "threads": {}},
        {"resolution_ns": 1, "tids": [7], "threads": [GOOD_THREAD[:10]]},
        {"resolution_ns": 1, "tids": [7], "threads": [[*GOOD_THREAD[:4], 5.5, *GOOD_THREAD[5:]]]},
        {"resolution_ns": 1, "tids": [7], "threads": [[*GOOD_THREAD[:9], "no", "poll"]]},
        {"resolution_ns": 1, "tids": [7], "threads": [[*GOOD_THREAD[:10], 3]]},
    ],
    ids=[
        "resolution-str",
        "resolution-0",
        "tids-str",
        "tids-bool",
        "threads-dict",
        "short-thread",
        "float-cpu",
        "timed-not-bool",
        "name-not-str",
    ],
)
def test_bad_scan_replies_are_bad_output(reply: dict[str, Any]) -> None:
    with pytest.raises(ProbeBadReply) as caught:
        parse_scan(reply, worker=WORKER, taken_at=0.0)
    assert caught.value.reason == "bad_output"
    assert caught.value.pid == WORKER.pid


def test_good_scan_reply_is_a_proc_sample() -> None:
    sample = parse_scan({"resolution_ns": 1, "tids": [7, 8], "threads": [GOOD_THREAD]},
                        worker=WORKER, taken_at=3.0)  # fmt: skip
    assert sample.tids == frozenset({7, 8})
    (thread,) = sample.threads
    assert (thread.tid, thread.syscall_name, thread.blocked_at) == (7, "poll", GOOD_THREAD[8])


@pytest.mark.parametrize(
    "reply",
    [
        {"threads": None},
        {"threads": [[]]},
        {"threads": [{"tid": 1, "ident": 2, "name": None, "frames": [["f", "x.py"]]}]},
        {"threads": [{"tid": 1, "ident": 2, "name": None, "frames": [["f", 3, 1]]}]},
        {"threads": [{"tid": "1", "ident": 2, "name": None, "frames": []}]},
        {"threads": [{"tid": 1, "ident": 2, "name": 5, "frames": []}]},
        {"threads": [{"tid": 1, "ident": 2, "name": None, "frames": [["f", "x.py", "1"]]}]},
    ],
    ids=["no-threads", "thread-list", "short-frame", "file-int", "tid-str", "name-int", "line-str"],
)
def test_bad_dump_replies_are_bad_output(reply: dict[str, Any]) -> None:
    with pytest.raises(ProbeBadReply):
        parse_dump(reply, worker=WORKER, taken_at=0.0)


@pytest.mark.parametrize(
    ("line", "message"),
    [(b"{", "not JSON"), (b"[]", "not a JSON object"), (b'{"error": "busy"}', "refused")],
    ids=["truncated", "list", "error-reply"],
)
def test_decode_reply_rejects(line: bytes, message: str) -> None:
    with pytest.raises(ProbeBadReply, match=message):
        decode_reply(line, op="scan", pid=1)


# --- the client against real peers -------------------------------------------------------------

CHILD = """
import sys, threading, time
from agent.probe import worker
probe = worker.start(sys.argv[1], {})
def blocked_forever():
    threading.Event().wait()
threading.Thread(target=blocked_forever, name="blocked", daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], WorkerRef]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        yield proc, WorkerRef(proc.pid, 0.0, os.getpid())
    finally:
        proc.kill()
        proc.wait(5)


def test_client_scans_and_dumps_a_real_probe(
    tmp_path: Path, child: tuple[subprocess.Popen[str], WorkerRef]
) -> None:
    proc, worker = child
    client = ProbeClient(str(tmp_path), timeout=2.0, clock=lambda: 42.0)
    try:
        assert client.available(worker.pid)
        assert not client.available(worker.pid + 100000)
        assert (Path(socket_path(str(tmp_path), worker.pid)).stat().st_mode & 0o777) == 0o600
        first = client.scan(worker, now=1.0)
        assert client.precise
        deadline = time.monotonic() + 5  # the watchdog is armed just after the answer
        while True:
            comms = {int(task.name): (task / "comm").read_text().strip()
                     for task in Path(f"/proc/{worker.pid}/task").iterdir()}  # fmt: skip
            if list(comms.values()).count(THREAD_COMM) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        probe_tid = client._connections[worker].hello["probe_tid"]
        # The probe's own thread and faulthandler's watchdog (armed while connected) carry
        # the probe's comm, and the probe leaves both out.
        own = {tid for tid, comm in comms.items() if comm == THREAD_COMM}
        assert probe_tid in own
        assert len(own) == 2
        live = set(comms) - own
        assert first.tids == frozenset(live)
        assert {t.tid for t in first.threads} == live
        blocked = next(t for t in first.threads if t.tid != worker.pid)
        assert blocked.syscall_name == "futex"
        assert not blocked.timed_wait
        time.sleep(0.05)
        again = client.scan(worker, now=2.0)
        assert {t.tid for t in again.threads} <= {worker.pid}  # the blocked thread did not run
        snapshot = client.dump(worker, native=True)
        assert snapshot.taken_at == 42.0
        assert not snapshot.native
        names = {t.name for t in snapshot.threads}
        assert names == {"MainThread", "blocked"}
        assert THREAD_NAME not in names
        by_name = {t.name: t for t in snapshot.threads}
        assert by_name["MainThread"].tid == worker.pid
        assert by_name["blocked"].frames[2].function == "blocked_forever"
        assert by_name["blocked"].frames[2].file == "<string>"
    finally:
        client.close()
    # A new connection starts the scan over: every thread again.
    client = ProbeClient(str(tmp_path), timeout=2.0)
    try:
        assert len(client.scan(worker, now=3.0).threads) == len(first.threads)
    finally:
        client.close()
    proc.kill()
    proc.wait(5)
    with pytest.raises(ProcessVanished):
        ProbeClient(str(tmp_path)).scan(worker, now=4.0)


def test_a_second_agent_is_told_the_probe_is_busy(
    tmp_path: Path, child: tuple[subprocess.Popen[str], WorkerRef]
) -> None:
    _, worker = child
    # Generous timeouts: under load a slow reply must not read as silence. The probe answers
    # the second agent "busy" and closes; a client whose hello is sent after that close sees
    # the closed connection instead. Either way it is refused, and the first is still served.
    first, second = ProbeClient(str(tmp_path), timeout=10), ProbeClient(str(tmp_path), timeout=10)
    try:
        first.scan(worker, now=0.0)
        with pytest.raises((ProbeBadReply, ProbeMissing), match=r"busy|closed the connection"):
            second.scan(worker, now=0.0)
        first.scan(worker, now=0.0)  # the first agent is still served
    finally:
        first.close()
        second.close()


def test_no_socket_for_a_live_pid_is_probe_missing(tmp_path: Path) -> None:
    me = WorkerRef(os.getpid(), 0.0, os.getppid())
    with pytest.raises(ProbeMissing) as caught:
        ProbeClient(str(tmp_path)).scan(me, now=0.0)
    assert caught.value.reason == "probe_missing"
    assert "deadlock-agent run" in str(caught.value)


def test_stale_socket_file_is_probe_missing(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(socket_path(str(tmp_path), os.getpid()))
    stale.close()  # the file stays; nobody listens: connection refused
    me = WorkerRef(os.getpid(), 0.0, os.getppid())
    with pytest.raises(ProbeMissing):
        ProbeClient(str(tmp_path)).dump(me, native=False)


@contextlib.contextmanager
def peer(tmp_path: Path, answer: bytes | None) -> Iterator[WorkerRef]:
    """A listener on this pid's probe socket that answers every line with `answer` (None:
    never answers)."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(socket_path(str(tmp_path), os.getpid()))
    server.listen(4)
    done = threading.Event()
    hello = json.dumps({"pid": os.getpid(), "probe": PROBE_VERSION}).encode() + b"\n"

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(100)
            conn.sendall(hello)
            while not done.is_set():
                data = conn.recv(100)
                if not data:
                    return
                if answer is not None:
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield WorkerRef(os.getpid(), 0.0, os.getppid())
    finally:
        done.set()
        server.close()


@pytest.mark.parametrize(
    "answer",
    [b"oops\n", b'{"resolution_ns": 1, "tids": [1], "threads": [["x"]]}\n', b"[1]\n"],
    ids=["not-json", "wrong-shape", "not-object"],
)
def test_garbage_from_the_peer_is_bad_output(tmp_path: Path, answer: bytes) -> None:
    with peer(tmp_path, answer) as me:
        client = ProbeClient(str(tmp_path))
        with pytest.raises(ProbeBadReply):
            client.scan(me, now=0.0)
        assert me not in client._connections  # out of step: dropped
        client.close()


def test_silent_peer_is_probe_silent_within_the_timeout(tmp_path: Path) -> None:
    with peer(tmp_path, None) as me:
        client = ProbeClient(str(tmp_path), timeout=0.3)
        started = time.monotonic()
        with pytest.raises(ProbeSilent) as caught:
            client.scan(me, now=0.0)
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 0.6, elapsed
        assert caught.value.reason == "probe_silent"
        assert "GIL" in str(caught.value)
        # Still no answer to that request: silent again at once, not after another timeout.
        started = time.monotonic()
        with pytest.raises(ProbeSilent):
            client.scan(me, now=0.0)
        # No stacks file written since: dump is silent too, not an empty snapshot.
        with pytest.raises(ProbeSilent):
            client.dump(me, native=False)
        assert time.monotonic() - started < 0.1
        client.close()


def test_a_late_reply_is_dropped_and_the_next_request_answered(tmp_path: Path) -> None:
    # A peer that answers the first scan late: the client times out, then reads past that
    # reply and gets its next answer, not the stale one.
    server = socket.socket(socket.AF_UNIX)
    server.bind(socket_path(str(tmp_path), os.getpid()))
    server.listen(1)
    hello = json.dumps({"pid": os.getpid(), "probe": PROBE_VERSION}).encode() + b"\n"
    late = json.dumps({"resolution_ns": 1, "tids": [1], "threads": []}).encode() + b"\n"
    fresh = json.dumps({"resolution_ns": 1, "tids": [2], "threads": []}).encode() + b"\n"
    go = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(100)
            conn.sendall(hello)
            conn.recv(100)
            go.wait(5)
            conn.sendall(late)
            conn.recv(100)
            conn.sendall(fresh)
            conn.recv(100)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    me = WorkerRef(os.getpid(), 0.0, os.getppid())
    client = ProbeClient(str(tmp_path), timeout=0.3)
    try:
        with pytest.raises(ProbeSilent):
            client.scan(me, now=0.0)
        go.set()
        time.sleep(0.1)
        assert client.scan(me, now=1.0).tids == frozenset({2})
    finally:
        client.close()
        server.close()
