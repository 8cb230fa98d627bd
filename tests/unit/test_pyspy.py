"""agent/pyspy.py: parsing `py-spy dump --json`, classifying py-spy's errors, the argv it runs,
the timeout/stop handling of run_with_timeout, and one real dump of a real child process."""

from __future__ import annotations

import importlib.metadata
import json
import os
import select
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
from packaging.requirements import Requirement

from agent.errors import (
    NotPython,
    ProcessVanished,
    PtraceDenied,
    PySpyBadOutput,
    PySpyFailed,
    PySpyMissing,
    PySpyStopped,
    PySpyTimeout,
)
from agent.pyspy import PySpy, classify_failure, interpreter_dirs, parse_dump, run_with_timeout
from agent.types import Frame, WorkerRef

WORKER = WorkerRef(pid=4242, create_time=1700000000.0, master_pid=4200)
ROOT = Path(__file__).resolve().parents[2]


def py_frame(name: str, short: str, line: int) -> dict[str, Any]:
    """A Python frame as py-spy 0.4.3 prints it."""
    return {"name": name, "filename": f"/venv/lib/python3.11/{short}", "module": None,
            "short_filename": short, "line": line, "locals": None, "is_entry": False}  # fmt: skip


def native_frame(name: str, module: str) -> dict[str, Any]:
    """A native frame (`--native`) as py-spy 0.4.3 prints it."""
    return {"name": name, "filename": "", "module": module, "short_filename": None, "line": 0,
            "locals": None, "is_entry": False}  # fmt: skip


def py_thread(
    *, pid: int = 4242, tid: int | None = 4243, ident: int = 139830992165760,
    name: str | None = "ThreadPoolExecutor-0_0", frames: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A thread entry of `py-spy dump --json`; tid None prints os_thread_id as null."""
    return {"pid": pid, "thread_id": ident, "thread_name": name, "os_thread_id": tid,
            "active": False, "owns_gil": False, "frames": list(frames),
            "process_info": None}  # fmt: skip


def dump_json(*threads: dict[str, Any]) -> str:
    return json.dumps(list(threads), indent=2)


# --- parse_dump --------------------------------------------------------------------------------


def test_parse_dump_threads_and_frames() -> None:
    text = dump_json(
        py_thread(tid=4243, name="ThreadPoolExecutor-0_0", frames=[
            py_frame("_worker", "concurrent/futures/thread.py", 81),
            py_frame("run", "threading.py", 975),
        ]),
        py_thread(tid=4242, name="MainThread", frames=[]),
    )  # fmt: skip
    snapshot = parse_dump(text, worker=WORKER, taken_at=12.5, native=False)
    assert snapshot.worker == WORKER
    assert snapshot.taken_at == 12.5
    assert snapshot.native is False
    assert [(t.tid, t.name) for t in snapshot.threads] == [
        (4243, "ThreadPoolExecutor-0_0"), (4242, "MainThread"),
    ]  # fmt: skip
    assert snapshot.threads[0].frames == (
        Frame("_worker", "concurrent/futures/thread.py", 81, None),
        Frame("run", "threading.py", 975, None),
    )
    assert snapshot.threads[1].frames == ()


def test_parse_dump_drops_threads_of_another_pid() -> None:
    text = dump_json(py_thread(pid=4242, tid=4242), py_thread(pid=9999, tid=9999),
                     py_thread(pid=4242, tid=4250))  # fmt: skip
    snapshot = parse_dump(text, worker=WORKER, taken_at=0.0, native=False)
    assert [t.tid for t in snapshot.threads] == [4242, 4250]


def test_parse_dump_null_os_thread_id_falls_back_to_thread_id() -> None:
    text = dump_json(py_thread(tid=None, ident=140001))
    assert parse_dump(text, worker=WORKER, taken_at=0.0, native=False).threads[0].tid == 140001


def test_parse_dump_native_flag_and_native_frames() -> None:
    text = dump_json(py_thread(frames=[
        native_frame("__lll_lock_wait", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
        native_frame("0x7f00beef", "/venv/lib/python3.11/site-packages/psycopg2/libpq-a1.so.5"),
        py_frame("connect", "psycopg2/__init__.py", 122),
    ]))  # fmt: skip
    snapshot = parse_dump(text, worker=WORKER, taken_at=0.0, native=True)
    assert snapshot.native is True
    assert all(t.native for t in snapshot.threads)
    frames = snapshot.threads[0].frames
    assert [f.native for f in frames] == [True, True, False]
    assert frames[0] == Frame("__lll_lock_wait", "?", 0, "/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert frames[2] == Frame("connect", "psycopg2/__init__.py", 122, None)
    python_only = parse_dump(dump_json(py_thread()), worker=WORKER, taken_at=0.0, native=False)
    assert not any(t.native for t in python_only.threads)


def test_parse_dump_missing_names_and_lines() -> None:
    text = dump_json(py_thread(name=None, frames=[{"name": None, "filename": "/x/app.py",
                                                   "line": None}]))  # fmt: skip
    thread = parse_dump(text, worker=WORKER, taken_at=0.0, native=False).threads[0]
    assert thread.name is None
    assert thread.frames == (Frame("?", "/x/app.py", 0, None),)


def test_parse_dump_empty_list() -> None:
    assert parse_dump("[]", worker=WORKER, taken_at=0.0, native=False).threads == ()


GARBAGE = {
    "not json": "Error: something went wrong",
    "empty": "",
    "truncated": dump_json(py_thread())[:-20],
    "null": "null",
    "no thread ids": json.dumps([{"pid": 4242, "frames": []}]),
    "non-numeric tid": json.dumps([py_thread(tid="abc")]),  # type: ignore[arg-type]
    # Valid JSON of the wrong shape: py-spy changing its output must not escape as a crash.
    "object instead of list": json.dumps({"pid": 4242, "threads": []}),
    "list of numbers": "[1, 2]",
    "string": '"oops"',
    "frame that is not an object": json.dumps([py_thread(frames=["main.py:1"])]),  # type: ignore[list-item]
}


@pytest.mark.parametrize("text", GARBAGE.values(), ids=GARBAGE.keys())
def test_parse_dump_garbage_is_bad_output(text: str) -> None:
    with pytest.raises(PySpyBadOutput) as caught:
        parse_dump(text, worker=WORKER, taken_at=0.0, native=False)
    assert caught.value.pid == WORKER.pid
    assert caught.value.reason == "bad_output"


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pyspy"
CAPTURES = sorted(FIXTURES.glob("*.json"))


@pytest.mark.parametrize("path", CAPTURES, ids=[p.name for p in CAPTURES])
def test_parse_dump_real_captures(path: Path) -> None:
    """Every checked-in capture (see tests/fixtures/pyspy/README.md) parses, thread for thread."""
    raw = json.loads(path.read_text())
    pid = raw[0]["pid"]
    native = path.name.endswith(".native.json")
    ref = WorkerRef(pid=pid, create_time=1.0, master_pid=1)
    snapshot = parse_dump(path.read_text(), worker=ref, taken_at=5.0, native=native)
    assert [(t.tid, t.name) for t in snapshot.threads] == [
        (r["os_thread_id"], r["thread_name"]) for r in raw
    ]
    assert all(len(t.frames) == len(r["frames"]) for t, r in zip(snapshot.threads, raw,
                                                                  strict=True))  # fmt: skip
    has_native = any(f.native for t in snapshot.threads for f in t.frames)
    assert has_native is native
    other = WorkerRef(pid=pid + 1, create_time=1.0, master_pid=1)
    assert parse_dump(path.read_text(), worker=other, taken_at=5.0, native=native).threads == ()


def test_parse_dump_real_libpq_and_openssl_frames() -> None:
    path = FIXTURES / "libpq_ssl_with_https.native.json"
    ref = WorkerRef(pid=json.loads(path.read_text())[0]["pid"], create_time=1.0, master_pid=1)
    threads = parse_dump(path.read_text(), worker=ref, taken_at=0.0, native=True).threads
    modules = {t.name: {f.module for f in t.frames if f.native} for t in threads}
    assert any("libpq" in m for m in modules["ThreadPoolExecutor-0_0"] if m)
    assert any("libssl" in m or "libcrypto" in m for m in modules["NR-Harvest-Thread"] if m)
    harvest = next(t for t in threads if t.name == "NR-Harvest-Thread")
    assert any(not f.native and f.file.endswith("ssl.py") for f in harvest.frames)


# --- classify_failure: py-spy 0.4.3's real messages --------------------------------------------

PERMISSION = (
    "Permission Denied: Try running again with elevated permissions by going "
    "'sudo env \"PATH=$PATH\" !!'\n"
)
VANISHED = (
    "Error: Failed to get process executable name. Check that the process is running.\n\n"
    "Caused by:\n    0: No such file or directory (os error 2)\n"
    "    1: No such file or directory (os error 2)\n\n"
    "Stack backtrace:\n   0: <E as anyhow::context::ext::StdError>::ext_context\n"
    "   1: py_spy::python_process_info::PythonProcessInfo::new\n"
)
NOT_PYTHON = (
    "Error: Failed to find python version from target process\n\n"
    "Stack backtrace:\n   0: anyhow::error::<impl anyhow::Error>::msg\n"
    "   1: py_spy::python_process_info::get_python_version\n"
)

FAILURES = [
    (PERMISSION, PtraceDenied, "permission"),
    ("Error: Operation not permitted (os error 1)\n", PtraceDenied, "permission"),
    ("Error: Failed to get process executable name. Check that the process is running.\n",
     ProcessVanished, "vanished"),
    (VANISHED, ProcessVanished, "vanished"),
    ("Error: No such process (os error 3)\n", ProcessVanished, "vanished"),
    ("Error: Failed to find python version from target process\n", NotPython, "not_python"),
    (NOT_PYTHON, NotPython, "not_python"),
    ("", PySpyFailed, "pyspy_failed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stderr", "kind", "reason"),
    FAILURES,
    ids=["permission-denied", "eperm", "not-running", "not-running-with-backtrace", "esrch",
         "not-python", "not-python-with-backtrace", "silent"],
)  # fmt: skip
def test_classify_failure(stderr: str, kind: type[Exception], reason: str) -> None:
    error = classify_failure(stderr, pid=77)
    assert type(error) is kind
    assert error.reason == reason  # type: ignore[attr-defined]
    assert error.pid == 77  # type: ignore[attr-defined]
    text = str(error)
    assert text.startswith("pid 77: ")
    assert "\n" not in text
    assert "Stack backtrace" not in text
    assert "anyhow" not in text


def test_permission_denied_carries_the_fix() -> None:
    text = str(classify_failure(PERMISSION, pid=77))
    assert "CAP_SYS_PTRACE" in text
    assert "ptrace_scope" in text


def test_failed_message_keeps_py_spy_words() -> None:
    assert "Failed to find python version" in str(classify_failure(NOT_PYTHON, pid=1))
    assert "no output" in str(classify_failure("  \n", pid=1))


# --- PySpy with an injected runner -------------------------------------------------------------


class FakeRunner:
    """Records every argv and answers with a canned (returncode, stdout, stderr)."""

    def __init__(self, *, code: int = 0, out: str = "[]", err: str = "") -> None:
        self.result = (code, out, err)
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float) -> tuple[int, str, str]:
        self.calls.append((list(argv), timeout))
        return self.result


@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
def test_dump_argv(native: bool) -> None:
    runner = FakeRunner()
    PySpy("/opt/py-spy", timeout=2.5, runner=runner).dump(WORKER, native=native)
    [(argv, timeout)] = runner.calls
    expected = ["/opt/py-spy", "dump", "--json", "--pid", "4242"]
    assert argv == ([*expected, "--native"] if native else expected)
    assert "--locals" not in argv
    assert "-l" not in argv
    assert timeout == 2.5


def test_dump_parses_stdout_with_the_injected_clock() -> None:
    runner = FakeRunner(out=dump_json(py_thread(tid=4250, name="harvest")))
    snapshot = PySpy(runner=runner, clock=lambda: 99.0).dump(WORKER, native=True)
    assert snapshot.taken_at == 99.0
    assert snapshot.native is True
    assert [(t.tid, t.name) for t in snapshot.threads] == [(4250, "harvest")]


@pytest.mark.parametrize(
    ("err", "out", "kind"),
    [(PERMISSION, "", PtraceDenied), (VANISHED, "", ProcessVanished),
     (NOT_PYTHON, "", PySpyFailed), ("", "Error: No such process\n", ProcessVanished)],
    ids=["permission", "vanished", "not-python", "message-on-stdout"],
)  # fmt: skip
def test_dump_failure_is_classified(err: str, out: str, kind: type[Exception]) -> None:
    runner = FakeRunner(code=1, out=out, err=err)
    with pytest.raises(kind) as caught:
        PySpy(runner=runner).dump(WORKER, native=False)
    assert caught.value.pid == WORKER.pid  # type: ignore[attr-defined]


def test_check_returns_the_version() -> None:
    runner = FakeRunner(out="py-spy 0.4.3\n")
    assert PySpy(sys.executable, runner=runner).check() == "0.4.3"
    assert runner.calls[0][0] == [sys.executable, "--version"]


def test_check_missing_executable_says_how_to_fix(tmp_path: Path) -> None:
    missing = str(tmp_path / "py-spy")
    with pytest.raises(PySpyMissing) as caught:
        PySpy(missing, runner=FakeRunner()).check()
    assert missing in str(caught.value)
    assert "pip install py-spy" in str(caught.value)


def test_check_failing_version_is_missing() -> None:
    runner = FakeRunner(code=1, err="error while loading shared libraries\n")
    with pytest.raises(PySpyMissing, match="shared libraries"):
        PySpy(sys.executable, runner=runner).check()


def test_check_real_py_spy_is_in_the_declared_range() -> None:
    """The py-spy pip installed beside this Python is found, and pyproject's bound holds for it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    [declared] = [
        Requirement(dep) for dep in project["project"]["dependencies"]
        if Requirement(dep).name == "py-spy"
    ]  # fmt: skip
    version = PySpy().check()
    assert version == importlib.metadata.version("py-spy")
    assert declared.specifier.contains(version), (version, str(declared))


# --- finding py-spy: beside this interpreter first, then PATH ----------------------------------


def fake_py_spy(directory: Path, version: str, *, name: str = "py-spy", mode: int = 0o755) -> Path:
    """A real executable that answers `--version` like py-spy does."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f'#!/bin/sh\necho "py-spy {version}"\n')
    path.chmod(mode)
    return path


def test_found_beside_the_interpreter_before_path(tmp_path: Path) -> None:
    venv_bin = fake_py_spy(tmp_path / "venv" / "bin", "1.0.0").parent
    on_path = fake_py_spy(tmp_path / "usr" / "bin", "2.0.0").parent
    pyspy = PySpy(search_dirs=[str(venv_bin)], path=str(on_path))
    assert pyspy.check() == "1.0.0"
    assert pyspy.executable == str(venv_bin / "py-spy")


def test_found_on_path_when_not_beside_the_interpreter(tmp_path: Path) -> None:
    empty = tmp_path / "venv" / "bin"
    empty.mkdir(parents=True)
    on_path = fake_py_spy(tmp_path / "usr" / "bin", "2.0.0").parent
    pyspy = PySpy(search_dirs=[str(empty)], path=f"{tmp_path / 'nowhere'}:{on_path}")
    assert pyspy.check() == "2.0.0"
    assert pyspy.executable == str(on_path / "py-spy")


def test_a_non_executable_file_beside_the_interpreter_is_passed_over(tmp_path: Path) -> None:
    venv_bin = fake_py_spy(tmp_path / "venv" / "bin", "1.0.0", mode=0o644).parent
    on_path = fake_py_spy(tmp_path / "usr" / "bin", "2.0.0").parent
    assert PySpy(search_dirs=[str(venv_bin)], path=str(on_path)).check() == "2.0.0"


def test_dumps_run_the_executable_found(tmp_path: Path) -> None:
    venv_bin = fake_py_spy(tmp_path / "venv" / "bin", "1.0.0").parent
    runner = FakeRunner(out="py-spy 1.0.0\n")
    pyspy = PySpy(runner=runner, search_dirs=[str(venv_bin)], path="")
    pyspy.check()
    runner.result = (0, "[]", "")
    pyspy.dump(WORKER, native=False)
    found = str(venv_bin / "py-spy")
    assert [argv[0] for argv, _ in runner.calls] == [found, found]


def test_an_explicit_path_is_used_as_given_and_not_searched(tmp_path: Path) -> None:
    venv_bin = fake_py_spy(tmp_path / "venv" / "bin", "1.0.0").parent
    chosen = fake_py_spy(tmp_path / "opt", "3.0.0", name="my-py-spy")
    pyspy = PySpy(str(chosen), search_dirs=[str(venv_bin)], path=str(venv_bin))
    assert pyspy.check() == "3.0.0"
    assert pyspy.executable == str(chosen)
    missing = str(tmp_path / "opt" / "py-spy")  # a venv/bin/py-spy exists: not a fallback
    with pytest.raises(PySpyMissing, match="not found or is not executable"):
        PySpy(missing, search_dirs=[str(venv_bin)], path=str(venv_bin)).check()


def test_an_explicit_name_is_looked_for_like_the_default(tmp_path: Path) -> None:
    venv_bin = fake_py_spy(tmp_path / "venv" / "bin", "1.0.0", name="py-spy-0.4").parent
    pyspy = PySpy("py-spy-0.4", search_dirs=[str(venv_bin)], path="")
    assert pyspy.check() == "1.0.0"
    assert pyspy.executable == str(venv_bin / "py-spy-0.4")


def test_not_found_anywhere_names_where_it_looked(tmp_path: Path) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    with pytest.raises(PySpyMissing) as caught:
        PySpy(search_dirs=[str(venv_bin)], path=str(tmp_path / "usr" / "bin")).check()
    text = str(caught.value)
    assert str(venv_bin) in text
    assert "PATH" in text
    assert "pip install py-spy" in text


def test_interpreter_dirs_keep_a_venv_symlink_unresolved(tmp_path: Path) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)  # what `python -m venv` makes on Linux
    dirs = interpreter_dirs(scripts=str(tmp_path / "scripts"), executable=str(venv_bin / "python"))
    assert dirs == (str(tmp_path / "scripts"), str(venv_bin))
    assert str(Path(sys.executable).resolve().parent) not in dirs


@pytest.mark.parametrize(
    ("scripts", "executable", "expected"),
    [("/venv/bin", "/venv/bin/python", ("/venv/bin",)),
     ("", "/usr/bin/python3", ("/usr/bin",)),
     ("/venv/bin", "", ("/venv/bin",))],
    ids=["same-dir-once", "no-scripts-dir", "no-executable"],
)  # fmt: skip
def test_interpreter_dirs(scripts: str, executable: str, expected: tuple[str, ...]) -> None:
    assert interpreter_dirs(scripts=scripts, executable=executable) == expected


def test_interpreter_dirs_default_to_this_interpreter() -> None:
    dirs = interpreter_dirs()
    assert dirs[0] == sysconfig.get_path("scripts")
    assert str(Path(sys.executable).parent) in dirs


# --- run_with_timeout --------------------------------------------------------------------------


def new_children(before: set[int]) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def my_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_run_with_timeout_returns_code_and_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUST_BACKTRACE", "1")
    code = "import os, sys; print(os.environ['RUST_BACKTRACE']); sys.stderr.write('e'); sys.exit(3)"
    result = run_with_timeout([sys.executable, "-c", code], timeout=30)
    assert result == (3, "0\n", "e")  # py-spy is always run without Rust backtraces


def test_run_with_timeout_kills_past_the_timeout() -> None:
    before = my_children()
    started = time.monotonic()
    with pytest.raises(PySpyTimeout, match=r"within 0\.3s"):
        run_with_timeout(["sleep", "30"], timeout=0.3)
    assert time.monotonic() - started < 2.0
    assert new_children(before) == []


def test_run_with_timeout_stop_already_set() -> None:
    before = my_children()
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    with pytest.raises(PySpyStopped, match="not started"):
        run_with_timeout(["sleep", "30"], timeout=30, stop=stop)
    assert time.monotonic() - started < 2.0
    assert new_children(before) == []


def test_run_with_timeout_stop_set_while_running() -> None:
    before = my_children()
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(PySpyStopped, match="cut short") as caught:
            run_with_timeout(["sleep", "30"], timeout=30, stop=stop)
        assert caught.value.reason == "stopped"
    finally:
        timer.cancel()
    assert 0.15 < time.monotonic() - started < 2.0
    assert new_children(before) == []


def test_run_with_timeout_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "py-spy"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(PySpyMissing, match="ermission denied") as caught:
        run_with_timeout([str(script), "dump"], timeout=5)
    assert caught.value.reason == "pyspy_missing"
    (tmp_path / "no-shebang").write_bytes(b"\x7fELFgarbage")
    (tmp_path / "no-shebang").chmod(0o755)
    with pytest.raises(PySpyFailed, match="cannot run"):
        run_with_timeout([str(tmp_path / "no-shebang"), "dump"], timeout=5)


def test_run_with_timeout_missing_executable(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-py-spy")
    with pytest.raises(PySpyMissing) as caught:
        run_with_timeout([missing, "dump"], timeout=5)
    assert missing in str(caught.value)
    assert "pip install py-spy" in str(caught.value)


# --- one real dump -----------------------------------------------------------------------------

TARGET = textwrap.dedent('''\
    import sys, threading
    release = threading.Event()

    def park_alpha():
        release.wait()

    def park_beta():
        release.wait()

    threading.Thread(target=park_alpha, name="alpha-parked", daemon=True).start()
    threading.Thread(target=park_beta, name="beta-parked", daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
''')


@pytest.fixture
def python_child() -> Iterator[subprocess.Popen[str]]:
    """A Python process with two named, parked threads; yields once they exist."""
    child = subprocess.Popen([sys.executable, "-c", TARGET], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None
        readable, _, _ = select.select([child.stdout], [], [], 20)
        assert readable, "the child did not start in 20 s"
        assert child.stdout.readline() == "ready\n"
        yield child
    finally:
        child.kill()
        child.wait(10)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.integration
def test_real_dump_of_a_python_child(python_child: subprocess.Popen[str]) -> None:
    ref = WorkerRef(python_child.pid, psutil.Process(python_child.pid).create_time(), os.getpid())
    snapshot = PySpy(timeout=10).dump(ref, native=False)

    assert snapshot.worker == ref
    assert snapshot.native is False
    by_name = {t.name: t for t in snapshot.threads}
    assert {"MainThread", "alpha-parked", "beta-parked"} <= set(by_name)
    tids = {int(task.name) for task in Path(f"/proc/{python_child.pid}/task").iterdir()}
    assert {t.tid for t in snapshot.threads} <= tids  # os thread ids, as /proc knows them
    for name, function in (("alpha-parked", "park_alpha"), ("beta-parked", "park_beta")):
        frames = by_name[name].frames
        assert frames, name
        assert not any(f.native for f in frames)
        assert any(function in f.function and f.line > 0 for f in frames), frames
        assert any(f.file.endswith("threading.py") for f in frames), frames
