"""The py-spy wrapper: the only module that runs py-spy or knows its JSON field names."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.errors import (
    NativeUnwindFailed,
    NotPython,
    ProcessVanished,
    PtraceDenied,
    PySpyBadOutput,
    PySpyFailed,
    PySpyMissing,
    PySpyStopped,
    PySpyTimeout,
)
from agent.types import Frame, StackSnapshot, ThreadStack, WorkerRef

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0

# What py-spy prints to stderr for the failures a user can act on (py-spy 0.3 and 0.4).
# Matched case-insensitively: py-spy 0.4.3 says "Permission Denied: Try running again ...".
_PERMISSION_MARKERS = ("permission denied", "operation not permitted", "eperm", "eacces")
_VANISHED_MARKERS = (
    "no such process",
    "no such file or directory",
    "esrch",
    "check that the process is running",
)


class Runner(Protocol):
    """Runs argv with a timeout; returns (returncode, stdout, stderr). Injected in tests."""

    def __call__(self, argv: Sequence[str], *, timeout: float) -> tuple[int, str, str]: ...


def run_with_timeout(
    argv: Sequence[str], *, timeout: float, stop: threading.Event | None = None
) -> tuple[int, str, str]:
    """Run argv, killing it past `timeout` (py-spy can hang in waitpid) or when `stop` is set
    (PySpyStopped: the agent is stopping; nothing is started once it is set)."""
    if stop is not None and stop.is_set():
        raise PySpyStopped("the agent is stopping; py-spy not started")
    try:
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Without this py-spy appends a Rust backtrace to every error when the
            # environment sets RUST_BACKTRACE=1.
            env={**os.environ, "RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0"},
        )
    except FileNotFoundError as err:
        raise PySpyMissing(f"cannot run {argv[0]!r}: not found") from err
    except PermissionError as err:  # not executable (any more), or a directory in its way
        raise PySpyMissing(f"cannot run {argv[0]!r}: {err.strerror}") from err
    except OSError as err:  # ENOEXEC (no #! line), ENOMEM, EAGAIN: nothing a retry will not tell
        raise PySpyFailed(f"cannot run {argv[0]!r}: {err.strerror}") from err
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if stop is not None and stop.is_set():
                raise PySpyStopped("the agent is stopping; py-spy cut short")
            if remaining <= 0:
                raise PySpyTimeout(f"py-spy did not finish within {timeout:g}s; killed")
            try:
                out, err_text = child.communicate(timeout=min(remaining, 0.1))
                return child.returncode, out, err_text
            except subprocess.TimeoutExpired:
                continue
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


def interpreter_dirs(
    *, scripts: str | None = None, executable: str | None = None
) -> tuple[str, ...]:
    """Where pip put this interpreter's scripts: sysconfig's scripts dir, then sys.executable's."""
    scripts = sysconfig.get_path("scripts") if scripts is None else scripts
    executable = sys.executable if executable is None else executable
    # Not resolved: a venv's bin/python is a symlink to the base interpreter, whose directory
    # does not hold the venv's py-spy.
    found: list[str] = []
    for directory in (scripts, str(Path(executable).parent) if executable else ""):
        if directory and directory not in found:
            found.append(directory)
    return tuple(found)


def find_executable(
    name: str, *, search_dirs: Sequence[str] | None = None, path: str | None = None
) -> str | None:
    """A name with a slash as given; a bare name in `search_dirs` (this interpreter's), then PATH.

    A service started as /venv/bin/deadlock-agent (systemd, a Dockerfile CMD) often has a PATH
    without /venv/bin, although pip installed py-spy right there. `path` None means $PATH.
    """
    if os.sep in name:
        return shutil.which(name)  # checks that it is an executable file, searches nothing
    dirs = interpreter_dirs() if search_dirs is None else search_dirs
    if dirs and (found := shutil.which(name, path=os.pathsep.join(dirs))):
        return found
    return shutil.which(name, path=path)


class PySpy:
    """Takes stack dumps of one worker at a time with `py-spy dump --json`."""

    def __init__(
        self,
        executable: str = "py-spy",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        runner: Runner | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        search_dirs: Sequence[str] | None = None,
        path: str | None = None,
    ) -> None:
        self.executable = executable
        self.timeout = timeout
        self._stop = stop
        self._runner: Runner = runner or self._default_runner
        self._clock = clock
        self._search_dirs = search_dirs  # None: this interpreter's (interpreter_dirs())
        self._path = path  # None: $PATH

    def _default_runner(self, argv: Sequence[str], *, timeout: float) -> tuple[int, str, str]:
        return run_with_timeout(argv, timeout=timeout, stop=self._stop)

    def check(self) -> str:
        """Find py-spy (see find_executable), which dumps then run; return its version."""
        dirs = interpreter_dirs() if self._search_dirs is None else tuple(self._search_dirs)
        found = find_executable(self.executable, search_dirs=dirs, path=self._path)
        if found is None:
            if os.sep in self.executable:
                raise PySpyMissing(f"{self.executable!r} was not found or is not executable")
            where = ", ".join(dirs) if dirs else "no interpreter directory"
            raise PySpyMissing(
                f"{self.executable!r} was not found beside this Python ({where}) nor on PATH"
            )
        self.executable = found
        code, out, err = self._runner([self.executable, "--version"], timeout=self.timeout)
        if code != 0:
            raise PySpyMissing(f"{self.executable} --version failed: {err.strip() or out.strip()}")
        return out.strip().rsplit(" ", 1)[-1]

    def dump(self, worker: WorkerRef, *, native: bool, nonblocking: bool = False) -> StackSnapshot:
        """Dump every thread of the worker; never with --locals (locals can hold secrets).

        `nonblocking` reads the worker's memory without stopping it (no ptrace attach, so it
        works where only attaching is forbidden); py-spy refuses it with --native."""
        argv = [self.executable, "dump", "--json", "--pid", str(worker.pid)]
        if nonblocking:
            argv.append("--nonblocking")
            native = False
        if native:
            argv.append("--native")
        code, out, err = self._runner(argv, timeout=self.timeout)
        taken_at = self._clock()
        if code != 0:
            raise classify_failure(err or out, pid=worker.pid)
        source = "py-spy --nonblocking" if nonblocking else "py-spy"
        return parse_dump(out, worker=worker, taken_at=taken_at, native=native, source=source)


def classify_failure(stderr: str, *, pid: int) -> Exception:
    """Translate py-spy's error text into the agent's hierarchy."""
    text = " ".join(stderr.split("Stack backtrace:", 1)[0].split())[:300]
    lowered = text.lower()
    if any(marker in lowered for marker in _PERMISSION_MARKERS):
        return PtraceDenied(f"py-spy was denied access: {text}", pid=pid)
    if any(marker in lowered for marker in _VANISHED_MARKERS):
        return ProcessVanished(f"py-spy: {text}", pid=pid)
    if "failed to find python version" in lowered:  # py-spy 0.3 and 0.4
        return NotPython(f"py-spy: {text}", pid=pid)
    if "unw_" in lowered:  # libunwind: "UNW_EINVAL", "UNW_EBADREG" on greenlet stacks
        return NativeUnwindFailed(f"py-spy could not unwind native frames: {text}", pid=pid)
    return PySpyFailed(f"py-spy failed: {text or 'no output'}", pid=pid)


def _frame(raw: dict[str, Any]) -> Frame:
    module = raw.get("module")
    short = raw.get("short_filename") or raw.get("filename") or "?"
    return Frame(
        function=str(raw.get("name") or "?"),
        file=str(short),
        line=int(raw.get("line") or 0),
        module=str(module) if module else None,
    )


def parse_dump(
    text: str, *, worker: WorkerRef, taken_at: float, native: bool, source: str = "py-spy"
) -> StackSnapshot:
    """Parse `py-spy dump --json` output (a list of threads) into a StackSnapshot."""
    try:
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(raw, dict) for raw in data):
            raise TypeError("expected a list of thread objects")
        threads = tuple(
            ThreadStack(
                tid=int(raw.get("os_thread_id") or raw["thread_id"]),
                name=raw.get("thread_name"),
                frames=tuple(_frame(frame) for frame in raw.get("frames") or ()),
                native=native,
                source=source,
            )
            for raw in data
            if int(raw.get("pid", worker.pid)) == worker.pid
        )
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise PySpyBadOutput(f"unreadable py-spy JSON: {err}", pid=worker.pid) from err
    return StackSnapshot(
        worker=worker, taken_at=taken_at, native=native, threads=threads, source=source
    )
