"""agent/probe: reading back what faulthandler's watchdog writes when the probe falls silent.
The text is real faulthandler output, captured from child Pythons; the last test holds the GIL
in a child with a probe and checks that the client still gets its stacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.errors import ProbeSilent
from agent.probe import STACKS_HEADER, THREAD_COMM, stacks_path
from agent.probe.client import ProbeClient, parse_faulthandler
from agent.types import WorkerRef

ROOT = Path(__file__).resolve().parents[2]
WORKER = WorkerRef(pid=4242, create_time=1700000000.0, master_pid=4200)

# Two threads in known functions; the watchdog fires twice (repeat) while the main thread
# sleeps, then prints the idents: a real dump, appended after a probe-style header line.
WATCHED = """
import faulthandler, json, sys, threading, time
def parked_in_event():
    threading.Event().wait()
def main_sleeps():
    time.sleep(1.0)
t = threading.Thread(target=parked_in_event, name="parked", daemon=True)
t.start()
with open(sys.argv[1], "a") as f:
    f.write(sys.argv[2] + json.dumps({"threads": {str(t.ident): [t.native_id, "parked"]},
                                      "probe_ident": None}) + "\\n")
    f.flush()
    faulthandler.dump_traceback_later(0.4, repeat=True, file=f)
    main_sleeps()
    faulthandler.cancel_dump_traceback_later()
print(json.dumps({"main": threading.get_ident(), "parked": t.ident, "parked_tid": t.native_id}))
"""


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, int]]:
    path = tmp_path_factory.mktemp("fh") / "stacks"
    out = subprocess.run([sys.executable, "-c", WATCHED, str(path), STACKS_HEADER],
                         capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return path.read_text(), json.loads(out.stdout)


def test_the_capture_is_faulthandler_text_with_two_dumps(
    captured: tuple[str, dict[str, int]],
) -> None:
    text, _ = captured
    assert text.count("Timeout (0:00:00.400000)!") == 2, text
    assert "(most recent call first):" in text


def test_last_dump_parsed_innermost_first_with_tids_from_the_header(
    captured: tuple[str, dict[str, int]],
) -> None:
    text, ids = captured
    snapshot = parse_faulthandler(text, worker=WORKER, taken_at=9.0, names={}, probe_ident=None)
    assert snapshot.worker == WORKER
    assert snapshot.taken_at == 9.0
    assert not snapshot.native
    assert len(snapshot.threads) == 2  # the last dump only, not both
    by_tid = {t.tid: t for t in snapshot.threads}
    parked = by_tid[ids["parked_tid"]]
    assert parked.name == "parked"
    # faulthandler gives code names (py-spy would say Condition.wait) and full paths, which
    # are shortened the way py-spy shortens them.
    assert [(f.function, f.file) for f in parked.frames[:3]] == [
        ("wait", "threading.py"), ("wait", "threading.py"), ("parked_in_event", "<string>"),
    ]  # fmt: skip
    assert parked.frames[2].line == 4
    assert parked.frames[-1].function == "_bootstrap"
    main = by_tid[ids["main"]]  # not in the header: its ident stands in for the tid
    assert [f.function for f in main.frames] == ["main_sleeps", "<module>"]
    assert main.frames[0].line == 6


def test_names_from_the_last_dump_and_the_probe_left_out(
    captured: tuple[str, dict[str, int]],
) -> None:
    text, ids = captured
    snapshot = parse_faulthandler(
        text, worker=WORKER, taken_at=0.0, names={ids["main"]: (4242, "MainThread")},
        probe_ident=ids["parked"],
    )  # fmt: skip
    (only,) = snapshot.threads
    assert (only.tid, only.name) == (4242, "MainThread")


@pytest.mark.parametrize(
    "text",
    ["", "garbage\nmore garbage\n", STACKS_HEADER + "{not json\n", '  File "x.py", line 1 in f\n'],
    ids=["empty", "garbage", "bad-header", "frame-without-thread"],
)
def test_nothing_to_parse_is_an_empty_snapshot(text: str) -> None:
    snapshot = parse_faulthandler(text, worker=WORKER, taken_at=0.0, names={}, probe_ident=None)
    assert snapshot.threads == ()


def test_unknown_line_and_truncation_markers() -> None:
    text = (
        "Timeout (0:00:10)!\n"
        "Thread 0x00007f0000000001 (most recent call first):\n"
        '  File "???", line ??? in ???\n'
        "  ...\n"
        "\n"
        "Current thread 0x00007f0000000002 (most recent call first):\n"
        "  <no Python frame>\n"
    )
    snapshot = parse_faulthandler(text, worker=WORKER, taken_at=0.0, names={}, probe_ident=None)
    first, second = snapshot.threads
    assert [(f.function, f.file, f.line) for f in first.frames] == [("???", "???", 0)]
    assert (second.tid, second.frames) == (0x7F0000000002, ())


# A probe in a child whose main thread then spins in _sre (which never releases the GIL).
HOGGED = """
import re, sys
from agent.probe import worker
worker.start(sys.argv[1], {"DEADLOCK_AGENT_PROBE_WATCHDOG": "0.6"})
def validate(text):
    return re.match(r"(a+)+$", text)
print("ready", flush=True)
sys.stdin.readline()
validate("a" * 40 + "b")
"""


def test_silent_probe_dump_comes_from_the_watchdog(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOGGED, str(tmp_path)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    client = ProbeClient(str(tmp_path), timeout=0.5)
    worker = WorkerRef(proc.pid, 0.0, os.getpid())
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        before = client.dump(worker, native=False)  # learns the threads' idents
        assert [t.name for t in before.threads] == ["MainThread"]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(0.3)  # into the regex
        started = time.monotonic()
        with pytest.raises(ProbeSilent):
            client.scan(worker, now=0.0)
        assert time.monotonic() - started < 0.8
        time.sleep(0.8)  # the watchdog fires 0.3-0.6 s after the last re-arm, then every 0.6 s
        assert Path(stacks_path(str(tmp_path), proc.pid)).stat().st_size > 0
        started = time.monotonic()
        snapshot = client.dump(worker, native=False)
        assert time.monotonic() - started < 0.8
        assert not snapshot.native
        (main,) = snapshot.threads  # the probe's own thread is left out
        assert main.tid == proc.pid
        assert main.name == "MainThread"
        assert [(f.function, f.file) for f in main.frames[:3]] == [
            ("match", "re/__init__.py"), ("validate", "<string>"), ("<module>", "<string>"),
        ]  # fmt: skip
    finally:
        client.close()
        proc.kill()
        proc.wait(5)


# A probed process with the watchdog armed forks; the child exits the normal way.
FORKS = """
import os, sys, time
from agent.probe import worker
worker.start(sys.argv[1], {})
print("ready", flush=True)
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    sys.exit(0)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print(f"child exited {status}", flush=True)
        break
    time.sleep(0.02)
else:
    os.kill(pid, 9)
    print("child hung", flush=True)
sys.stdin.readline()
"""


def test_fork_while_the_watchdog_is_armed_does_not_hang_the_child(tmp_path: Path) -> None:
    # Without the probe's before-fork disarm, faulthandler's "running" lock is copied held
    # and the child hangs in Py_Finalize forever (CPython 3.11.7, measured).
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKS, str(tmp_path)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    client = ProbeClient(str(tmp_path), timeout=2.0)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        worker = WorkerRef(proc.pid, 0.0, os.getpid())
        client.scan(worker, now=0.0)  # connected and answered: the watchdog is armed
        deadline = time.monotonic() + 5  # the probe arms it just after sending its answer
        while time.monotonic() < deadline:
            comms = [(task / "comm").read_text().strip()
                     for task in Path(f"/proc/{proc.pid}/task").iterdir()]  # fmt: skip
            if comms.count(THREAD_COMM) == 2:  # the probe and faulthandler's watchdog
                break
            time.sleep(0.01)
        assert comms.count(THREAD_COMM) == 2, comms
        proc.stdin.write("fork\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "child exited 0\n"
        client.scan(worker, now=1.0)  # re-armed in the parent, still answering
    finally:
        client.close()
        proc.kill()
        proc.wait(5)
