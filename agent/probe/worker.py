"""The probe inside a gunicorn worker: one real OS thread serving the agent what it cannot read
from outside without ptrace (every thread's Python stack, and /proc/self's syscall files).

It listens on `<DIR>/<pid>.sock` (mode 0600, 0660 with DEADLOCK_AGENT_PROBE_GROUP=1), serves one
agent connection at a time, and answers newline-delimited JSON requests:

    {"op": "hello"} -> {"pid", "python", "probe", "native_frames": false, "probe_tid", ...}
    {"op": "scan"}  -> agent.procfs.Scanner on this pid: {"resolution_ns", "tids", "threads"}
    {"op": "dump"}  -> {"threads": [{"tid", "ident", "name", "frames": [[function, file, line]]}]}
    anything else   -> {"error": "..."}

The thread is started with _thread and talks through the _socket and select functions captured
at import, so gevent's monkey-patching (gunicorn's gevent worker patches after fork) cannot turn
it into a greenlet; it never uses logging. It does no network I/O of its own.

While an agent is connected, faulthandler's watchdog is armed: if no request is answered for
DEADLOCK_AGENT_PROBE_WATCHDOG seconds (10; 0 disables) because some thread holds the GIL, the C
watchdog writes every thread's Python stack to `<DIR>/<pid>.stacks` without the GIL. This takes
faulthandler's single dump_traceback_later slot from the app while an agent is connected.
"""

from __future__ import annotations

import _socket
import _thread
import atexit
import contextlib
import faulthandler
import json
import os
import select
import sys
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from agent.probe import (
    DEFAULT_WATCHDOG,
    ENV_GROUP,
    ENV_WATCHDOG,
    PROBE_VERSION,
    STACKS_HEADER,
    THREAD_COMM,
    THREAD_NAME,
    short_filename,
    socket_path,
    stacks_path,
)
from agent.procfs import Scanner
from agent.types import WorkerRef

# Captured now, before gevent can patch them: the C functions themselves.
_poll = select.poll
_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
_monotonic = time.monotonic
_current_frames = sys._current_frames

MAX_REQUEST = 4096  # bytes in one request line
MAX_FRAMES = 512  # per thread: a runaway recursion must not make a megabyte reply
SEND_TIMEOUT = 5.0  # an agent that stops reading must not hold the probe forever
_FD_BUDGET = 128  # /proc files the in-process Scanner may hold open in the app


def _frames(frame: FrameType | None, short: Callable[[str], str]) -> list[list[object]]:
    """[function, short file, line] per frame, innermost first: names and lines only, never
    locals."""
    out: list[list[object]] = []
    while frame is not None and len(out) < MAX_FRAMES:
        code = frame.f_code
        name = getattr(code, "co_qualname", code.co_name)  # py-spy shows qualnames on 3.11+
        out.append([name, short(code.co_filename), frame.f_lineno or 0])
        frame = frame.f_back
    return out


class Probe:
    """One worker's probe: the listening socket, the stacks file, and the serving thread."""

    def __init__(
        self,
        directory: str,
        *,
        group: bool = False,
        watchdog: float = DEFAULT_WATCHDOG,
        pid: int | None = None,
    ) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self.mode = 0o660 if group else 0o600
        self.watchdog = watchdog
        self.path = socket_path(directory, self.pid)
        self.stacks = stacks_path(directory, self.pid)
        self.main_ident = _thread.get_ident()
        self.ident: int | None = None  # the serving thread's, once started
        self.tid: int | None = None
        self._listener: _socket.socket | None = None
        self._stacks_fd: int | None = None
        self._scanner: Scanner | None = None
        self._armed_at: float | None = None
        self._header_size = 0
        self._short_names: dict[str, str] = {}
        self.ref = WorkerRef(self.pid, 0.0, os.getppid())

    # --- start and stop --------------------------------------------------------------------

    def listen(self) -> None:
        """Create the socket file with private permissions, then the stacks file."""
        temporary = f"{self.path}.{_thread.get_ident():x}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            listener.settimeout(None)  # not socket.setdefaulttimeout()'s, should the app set one
            listener.bind(temporary)
            # chmod before listen(): until then a connect is refused, whatever the mode was.
            os.chmod(temporary, self.mode)
            listener.listen(4)
            os.replace(temporary, self.path)  # a stale <pid>.sock of a dead process goes
        except BaseException:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        os.set_inheritable(listener.fileno(), False)
        self._listener = listener
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC | os.O_CLOEXEC
        fd = os.open(self.stacks, flags | getattr(os, "O_NOFOLLOW", 0), self.mode)
        os.fchmod(fd, self.mode)
        self._stacks_fd = fd

    def start(self) -> None:
        """Listen, then serve from a new OS thread; returns once that thread has named itself."""
        self.listen()
        ready = _thread.allocate_lock()
        ready.acquire()
        self.ident = _thread.start_new_thread(self._thread_main, (ready,))
        # The thread registers its name in threading's registry while this (main) thread
        # waits: before gevent's patching, which runs after fork on this thread, can begin.
        ready.acquire(timeout=2.0)
        atexit.register(self.close)
        # A child forked while the watchdog is armed inherits faulthandler's "running" lock held
        # by a thread it does not have, and hangs in Py_Finalize (measured on 3.11.7: any
        # os.fork() child that exits normally). Disarm around every fork of this worker; the
        # GIL is held from the before hook to fork(), so the probe cannot re-arm in between.
        os.register_at_fork(before=self._before_fork, after_in_parent=self._after_fork_in_parent)

    def _before_fork(self) -> None:
        if os.getpid() == self.pid and self._armed_at is not None:
            faulthandler.cancel_dump_traceback_later()

    def _after_fork_in_parent(self) -> None:
        if os.getpid() == self.pid and self._armed_at is not None and self._stacks_fd is not None:
            faulthandler.dump_traceback_later(self.watchdog, repeat=True, file=self._stacks_fd)

    def _thread_main(self, ready: Any) -> None:
        try:
            self.tid = _thread.get_native_id()
            self._name_thread()
        except Exception:  # noqa: BLE001, S110 - a name is a nicety; serving is what counts
            pass
        finally:
            ready.release()
        try:
            self.serve()
        except BaseException as err:  # noqa: BLE001 - never take the worker down
            with contextlib.suppress(Exception):
                sys.stderr.write(f"deadlock-agent probe (pid {self.pid}): stopped: {err!r}\n")

    def _name_thread(self) -> None:
        # /proc comm first (15 bytes): faulthandler's watchdog thread, started from this thread,
        # inherits it, so scans can leave both out.
        with (
            contextlib.suppress(OSError),
            open(f"/proc/self/task/{self.tid}/comm", "w", encoding="ascii") as comm,
        ):
            comm.write(THREAD_COMM)
        import threading

        threading.current_thread().name = THREAD_NAME  # registers a _DummyThread for us

    def close(self) -> None:
        """Stop the watchdog and remove this worker's files (atexit; only in the worker itself)."""
        if os.getpid() != self.pid:
            return
        self._disarm()
        for path in (self.path, self.stacks):
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.release_fds()

    def release_fds(self) -> None:
        """Close the socket, stacks file and /proc files without touching the files' names."""
        self._armed_at = None
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        if self._stacks_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._stacks_fd)
            self._stacks_fd = None
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None

    # --- serving ---------------------------------------------------------------------------

    def serve(self) -> None:
        """Accept agents one at a time, forever."""
        while self._listener is not None:
            try:
                conn = _accept(self._listener)
            except OSError:
                if self._listener is None:
                    return
                continue
            try:
                self.session(conn)
            except OSError:
                pass
            finally:
                self._disarm()
                with contextlib.suppress(OSError):
                    conn.close()

    def session(self, conn: _socket.socket) -> None:
        """Answer one agent's requests until it hangs up; a second agent is told it is busy."""
        if self._scanner is not None:
            self._scanner.close()
        self._scanner = None  # a fresh Scanner: the first scan returns every thread
        conn.settimeout(SEND_TIMEOUT)
        poller = _poll()
        poller.register(conn.fileno(), _POLLIN)
        if self._listener is not None:
            poller.register(self._listener.fileno(), _POLLIN)
        buffer = b""
        while True:
            for fd, _ in poller.poll():
                if self._listener is not None and fd == self._listener.fileno():
                    self._refuse_another()
                    continue
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    conn.sendall(self.answer(line) + b"\n")
                    self._rearm()
                if len(buffer) > MAX_REQUEST:
                    conn.sendall(_error("request too long") + b"\n")
                    return

    def _refuse_another(self) -> None:
        if self._listener is None:
            return
        other = _accept(self._listener)
        try:
            other.settimeout(0.1)
            other.sendall(_error("busy: another agent is connected to this probe") + b"\n")
        except OSError:
            pass
        finally:
            other.close()

    # --- requests --------------------------------------------------------------------------

    def answer(self, line: bytes) -> bytes:
        """The reply to one request line; never raises."""
        try:
            request = json.loads(line)
            op = request.get("op") if isinstance(request, dict) else None
            if op == "scan":
                reply = self.scan()
            elif op == "dump":
                reply = self.dump()
            elif op == "hello":
                reply = self.hello()
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as err:  # noqa: BLE001 - a bad request must not end the probe
            reply = {"error": f"{err.__class__.__name__}: {err}"[:500]}
        return json.dumps(reply, separators=(",", ":")).encode()

    def hello(self) -> dict[str, Any]:
        """Who answers, and what it cannot see."""
        return {
            "pid": self.pid,
            "python": ".".join(map(str, sys.version_info[:3])),
            "probe": PROBE_VERSION,
            "native_frames": False,
            "probe_tid": self.tid,
            "probe_ident": self.ident,
            "watchdog": self.watchdog,
        }

    def _own_tids(self) -> set[int]:
        """The probe's thread and faulthandler's watchdog thread (which inherits its comm)."""
        own = {self.tid} if self.tid is not None else set()
        scanner = self._scanner
        if scanner is not None:
            watched = scanner._watched.get(self.ref)
            if watched is not None:
                own.update(t for t, task in watched.tasks.items()
                           if task.activity.comm == THREAD_COMM)  # fmt: skip
        return own

    def scan(self) -> dict[str, Any]:
        """This worker's threads that ran since the last scan of this connection (all the first
        time) and the live tids, as the agent's own Scanner would read them from outside."""
        if self._scanner is None:
            scanner = Scanner(max_fds=_FD_BUDGET)
            # Without schedstat the Scanner would log; say so in the reply instead.
            scanner.precise = os.path.exists("/proc/self/schedstat")
            self._scanner = scanner
        sample = self._scanner.scan(self.ref, now=0.0)
        own = self._own_tids()
        return {
            "resolution_ns": sample.resolution_ns,
            "tids": None if sample.tids is None else sorted(sample.tids - own),
            "threads": [
                [t.tid, t.start_ticks, t.comm, t.state, t.cpu_ns, t.runs, t.syscall, t.wchan,
                 t.blocked_at, t.timed_wait, t.syscall_name]
                for t in sample.threads
                if t.tid not in own and t.comm != THREAD_COMM  # a watchdog that just exited
            ],
        }  # fmt: skip

    def _short(self, path: str) -> str:
        short = self._short_names.get(path)
        if short is None:
            if len(self._short_names) > 10_000:
                self._short_names.clear()
            short = self._short_names[path] = short_filename(path)
        return short

    def threads(self) -> dict[int, tuple[int, str | None]]:
        """ident -> (native tid, name) from threading's registry (read without its lock: a dict
        copy is atomic under the GIL, and gevent may have patched the lock)."""
        found: dict[int, tuple[int, str | None]] = {}
        threading = sys.modules.get("threading")
        registry: Mapping[int, Any] = getattr(threading, "_active", None) or {}
        for ident, thread in dict(registry).items():
            native = getattr(thread, "_native_id", None)
            if isinstance(native, int):
                found[ident] = (native, getattr(thread, "_name", None))
        # The thread that started the probe is the one fork() left: its tid is the pid. The
        # registry says otherwise on 3.11 (its _after_fork keeps the master's native_id), and
        # gevent re-keys it under its main greenlet's id.
        main = found.get(self.main_ident)
        if main is None:
            main_thread = getattr(threading, "_main_thread", None)
            main = (self.pid, getattr(main_thread, "_name", "MainThread"))
        found[self.main_ident] = (self.pid, main[1])
        return found

    def dump(self) -> dict[str, Any]:
        """Every thread's Python stack but the probe's, innermost frame first."""
        frames = _current_frames()
        try:
            known = self.threads()
            threads = []
            for ident, frame in frames.items():
                if ident == self.ident:
                    continue
                tid, name = known.get(ident, (ident, None))
                threads.append(
                    {"tid": tid, "ident": ident, "name": name,
                     "frames": _frames(frame, self._short)}
                )  # fmt: skip
        finally:
            del frames  # frames keep their locals alive: let them go now
        return {"pid": self.pid, "threads": threads}

    # --- the watchdog ----------------------------------------------------------------------

    def _rearm(self) -> None:
        """Push the watchdog's deadline back. Each dump_traceback_later() starts a new OS thread
        in CPython, so it is re-armed once per half period, not after every answer: the stacks
        are written between T/2 and T after the probe falls silent."""
        if self.watchdog <= 0 or self._stacks_fd is None:
            return
        now = _monotonic()
        fd = self._stacks_fd
        fired = os.fstat(fd).st_size > self._header_size
        if not fired and self._armed_at is not None and now - self._armed_at < self.watchdog / 2:
            return
        os.ftruncate(fd, 0)  # O_APPEND: the next writes start at 0 again
        header = STACKS_HEADER + json.dumps(
            {"pid": self.pid, "probe_ident": self.ident,
             "threads": {str(i): list(v) for i, v in self.threads().items()}},
            separators=(",", ":"),
        ) + "\n"  # fmt: skip
        data = header.encode("ascii", "backslashreplace")
        os.write(fd, data)
        self._header_size = len(data)
        faulthandler.dump_traceback_later(self.watchdog, repeat=True, file=fd)
        self._armed_at = now

    def _disarm(self) -> None:
        if self._armed_at is not None:
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = None


def _accept(listener: _socket.socket) -> _socket.socket:
    """accept() on the C socket (socket.socket.accept is Python, and gevent patches it)."""
    fd, _ = listener._accept()  # type: ignore[attr-defined]
    return _socket.socket(fileno=fd)


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


_probe: Probe | None = None


def start(directory: str, environ: Mapping[str, str]) -> Probe:
    """Start this worker's probe (the bootstrap's after-fork hook calls this)."""
    global _probe
    try:
        watchdog = float(environ.get(ENV_WATCHDOG, DEFAULT_WATCHDOG))
    except ValueError:
        watchdog = DEFAULT_WATCHDOG
    probe = Probe(directory, group=environ.get(ENV_GROUP) == "1", watchdog=max(0.0, watchdog))
    probe.start()
    _probe = probe
    return probe


def after_fork_in_child() -> None:
    """In a probed worker's own fork: close the inherited socket and files, keep their names."""
    global _probe
    if _probe is not None:
        _probe.release_fds()
        _probe = None
