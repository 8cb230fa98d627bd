"""The agent's side of the in-process probe: a scanner and a stack source for Monitor that asks
each worker's probe (agent.probe.worker) over its Unix socket instead of reading /proc and
running py-spy from outside. The only module that knows the probe protocol's field names.

One persistent connection per worker, opened lazily; every call returns or raises within
`timeout`. A probe that does not answer (a thread holds the GIL) is ProbeSilent; `dump` then
falls back to the stacks faulthandler's watchdog wrote for it, when it wrote any since the last
good answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agent.errors import ProbeBadReply, ProbeMissing, ProbeSilent, ProcessVanished
from agent.probe import PROBE_VERSION, STACKS_HEADER, short_filename, socket_path, stacks_path
from agent.types import Frame, ProcSample, StackSnapshot, ThreadActivity, ThreadStack, WorkerRef

#: StackSnapshot.source of the probe's dumps, and of stacks its faulthandler watchdog wrote.
SOURCE = "probe"
WATCHDOG_SOURCE = "probe-watchdog"

DEFAULT_TIMEOUT = 1.0
MAX_REPLY = 16 << 20  # bytes: a reply longer than this is not the probe's
_STACKS_MAX = 4 << 20  # bytes of a stacks file read back

ThreadNames = dict[int, tuple[int, str | None]]  # ident -> (native tid, thread name)


class _Connection:
    __slots__ = ("buffer", "hello", "pending", "sock")

    def __init__(self, sock: socket.socket, hello: Mapping[str, Any]) -> None:
        self.sock = sock
        self.hello = hello  # empty until the probe's hello reply is read
        self.buffer = b""
        # Requests sent that timed out unanswered: their replies are read and dropped first.
        self.pending = 0


class ProbeClient:
    """Scans and dumps workers through their probes (Monitor's scanner and stack source)."""

    def __init__(
        self,
        directory: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        proc: str = "/proc",
    ) -> None:
        self.directory = directory
        self.timeout = timeout
        self.clock = clock
        self.proc = proc
        self.precise = True  # schedstat read from inside; False once a probe reports ticks
        self._connections: dict[WorkerRef, _Connection] = {}
        self._answered_ns: dict[WorkerRef, int] = {}  # wall clock of the last good answer
        self._names: dict[WorkerRef, ThreadNames] = {}  # from the last good dump
        self._probe_ident: dict[WorkerRef, int] = {}

    # --- lifecycle --------------------------------------------------------------------------

    def available(self, pid: int) -> bool:
        """Whether a probe socket exists for the pid (one stat; it may be stale)."""
        return os.path.exists(socket_path(self.directory, pid))

    def retain(self, workers: Iterable[WorkerRef]) -> None:
        """Close the connections of workers no longer watched."""
        keep = set(workers)
        for worker in [w for w in self._known() if w not in keep]:
            self.forget(worker)

    def forget(self, worker: WorkerRef) -> None:
        """Drop a worker's connection and what was learned about it."""
        self._drop(worker)
        self._answered_ns.pop(worker, None)
        self._names.pop(worker, None)
        self._probe_ident.pop(worker, None)

    def close(self) -> None:
        """Close every connection (the agent is stopping)."""
        self.retain(())

    def _known(self) -> set[WorkerRef]:
        return (
            set(self._connections) | set(self._answered_ns) | set(self._names)
            | set(self._probe_ident)
        )

    def _drop(self, worker: WorkerRef) -> None:
        connection = self._connections.pop(worker, None)
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.sock.close()

    # --- the two calls Monitor makes ------------------------------------------------------

    def scan(self, worker: WorkerRef, *, now: float) -> ProcSample:
        """The worker's threads that changed since this connection's last scan (all of them
        on a new connection) and its live threads, read by the probe from /proc/self."""
        reply = self._request(worker, "scan")
        try:
            sample = parse_scan(reply, worker=worker, taken_at=now)
        except ProbeBadReply:
            self._drop(worker)  # the next call starts over on a fresh connection
            raise
        if sample.resolution_ns != 1:
            self.precise = False
        return sample

    def dump(self, worker: WorkerRef, *, native: bool) -> StackSnapshot:
        """Every thread's Python stack (never native frames, whatever `native` asks); when the
        probe is silent, the stacks faulthandler's watchdog wrote since its last answer."""
        del native  # the probe sees Python frames only: snapshot.native is False
        try:
            reply = self._request(worker, "dump")
        except ProbeSilent:
            snapshot = self._watchdog_stacks(worker)
            if snapshot is None:
                raise
            return snapshot
        try:
            snapshot, names = parse_dump(reply, worker=worker, taken_at=self.clock())
        except ProbeBadReply:
            self._drop(worker)
            raise
        self._names[worker] = names
        return snapshot

    # --- the wire -------------------------------------------------------------------------

    def _request(self, worker: WorkerRef, op: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        for attempt in (1, 2):
            connection = self._connections.get(worker)
            fresh = connection is None
            if connection is None:
                connection = self._connect(worker, deadline)
            try:
                reply = self._exchange(worker, connection, op, deadline)
            except ProbeBadReply:
                self._drop(worker)  # out of step, or refused: start over next time
                raise
            except (ConnectionError, EOFError) as err:
                self._drop(worker)
                if not self._alive(worker.pid):
                    raise ProcessVanished("worker exited", pid=worker.pid) from err
                if fresh or attempt == 2:
                    raise ProbeMissing(f"the probe closed the connection: {err}",
                                       pid=worker.pid) from err  # fmt: skip
                continue  # a connection kept from before: try once on a new one
            self._answered_ns[worker] = time.time_ns()
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self, worker: WorkerRef, deadline: float) -> _Connection:
        path = socket_path(self.directory, worker.pid)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if not self._alive(worker.pid):
                raise ProcessVanished("worker exited", pid=worker.pid) from err
            raise ProbeMissing(f"no probe at {path}", pid=worker.pid) from err
        except PermissionError as err:
            sock.close()
            raise ProbeMissing(
                f"no permission to connect to {path}: run the agent as the app's user, or set "
                "DEADLOCK_AGENT_PROBE_GROUP=1 for the app and put the agent in the group of "
                "the probe directory",
                pid=worker.pid,
            ) from err
        except TimeoutError as err:  # the listen backlog is full: nobody accepts
            sock.close()
            raise self._silent(worker, "connecting") from err
        except OSError as err:
            sock.close()
            raise ProbeMissing(f"cannot connect to {path}: {err}", pid=worker.pid) from err
        connection = _Connection(sock, {})
        self._connections[worker] = connection
        try:
            hello = self._exchange(worker, connection, "hello", deadline)
        except ProbeBadReply:
            self._drop(worker)
            raise
        except (ConnectionError, EOFError) as err:
            self._drop(worker)
            if not self._alive(worker.pid):
                raise ProcessVanished("worker exited", pid=worker.pid) from err
            raise ProbeMissing(f"the probe closed the connection: {err}",
                               pid=worker.pid) from err  # fmt: skip
        self._greeted(worker, connection, hello)
        return connection

    def _greeted(self, worker: WorkerRef, connection: _Connection, hello: dict[str, Any]) -> None:
        try:
            check_hello(hello, pid=worker.pid)
        except ProbeBadReply:
            self._drop(worker)
            raise
        connection.hello = hello
        ident = hello.get("probe_ident")
        if isinstance(ident, int):
            self._probe_ident[worker] = ident

    def _exchange(
        self, worker: WorkerRef, connection: _Connection, op: str, deadline: float
    ) -> dict[str, Any]:
        sock = connection.sock
        if connection.pending:
            self._catch_up(worker, connection)
            if connection.pending:
                # Still no answer to a request sent at least `timeout` ago: silent, at once.
                raise self._silent(worker, op)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            while b"\n" not in connection.buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise EOFError("connection closed")
                connection.buffer += chunk
                if len(connection.buffer) > MAX_REPLY:
                    self._drop(worker)
                    raise ProbeBadReply(f"{op} reply longer than {MAX_REPLY} bytes",
                                        pid=worker.pid)  # fmt: skip
        except TimeoutError as err:
            # The reply may still come: keep the connection and drop that reply when it does,
            # so a probe that stays silent costs the loop `timeout` once, not every cycle.
            connection.pending += 1
            raise self._silent(worker, op) from err
        except BrokenPipeError as err:
            raise ConnectionResetError(str(err)) from err
        line, connection.buffer = connection.buffer.split(b"\n", 1)
        return decode_reply(line, op=op, pid=worker.pid)

    def _catch_up(self, worker: WorkerRef, connection: _Connection) -> None:
        """Read, without waiting, the replies to requests that timed out; drop them (a late
        hello is still checked)."""
        sock = connection.sock
        sock.settimeout(0.0)
        try:
            while connection.pending:
                while b"\n" in connection.buffer and connection.pending:
                    line, connection.buffer = connection.buffer.split(b"\n", 1)
                    connection.pending -= 1
                    if not connection.hello:
                        self._greeted(worker, connection, decode_reply(line, op="hello",
                                                                       pid=worker.pid))  # fmt: skip
                if not connection.pending:
                    break
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise EOFError("connection closed")
                connection.buffer += chunk
                if len(connection.buffer) > MAX_REPLY:
                    raise ProbeBadReply(f"reply longer than {MAX_REPLY} bytes", pid=worker.pid)
        except BlockingIOError:
            return  # nothing more yet

    def _silent(self, worker: WorkerRef, op: str) -> Exception:
        if not self._alive(worker.pid):
            return ProcessVanished("worker exited", pid=worker.pid)
        return ProbeSilent(
            f"the probe did not answer {op!r} within {self.timeout:g}s although the worker is "
            "alive: its probe thread cannot run, most likely because another thread holds the "
            "GIL (a C extension or regular expression spinning)",
            pid=worker.pid,
        )

    def _alive(self, pid: int) -> bool:
        try:
            with open(f"{self.proc}/{pid}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            return False
        state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
        return state not in (b"Z", b"X")

    # --- faulthandler's stacks --------------------------------------------------------------

    def _watchdog_stacks(self, worker: WorkerRef) -> StackSnapshot | None:
        path = stacks_path(self.directory, worker.pid)
        try:
            with open(path, "rb") as handle:
                if os.fstat(handle.fileno()).st_mtime_ns <= self._answered_ns.get(worker, 0):
                    return None  # not written since the probe last answered
                text = handle.read(_STACKS_MAX).decode("ascii", "replace")
        except OSError:
            return None
        root = f"{self.proc}/{worker.pid}/root"
        prefixed = os.path.isdir(root)  # readable with ptrace-read access only

        def exists(name: str) -> bool:
            return os.path.exists(root + name if prefixed else name)

        snapshot = parse_faulthandler(
            text, worker=worker, taken_at=self.clock(), names=self._names.get(worker, {}),
            probe_ident=self._probe_ident.get(worker),
            short=lambda name: short_filename(name, exists),
        )  # fmt: skip
        return snapshot if snapshot.threads else None


# --- replies (pure) -----------------------------------------------------------------------


def decode_reply(line: bytes, *, op: str, pid: int) -> dict[str, Any]:
    """One reply line as a JSON object; ProbeBadReply for anything else or an error reply."""
    try:
        reply = json.loads(line)
    except ValueError as err:
        raise ProbeBadReply(f"{op} reply is not JSON: {err}", pid=pid) from err
    if not isinstance(reply, dict):
        raise ProbeBadReply(f"{op} reply is not a JSON object", pid=pid)
    if "error" in reply:
        raise ProbeBadReply(f"the probe refused {op!r}: {str(reply['error'])[:300]}", pid=pid)
    return reply


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} is not an integer: {value!r}")
    return value


def _opt(value: object, kind: type, what: str) -> Any:
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{what} is not {kind.__name__} or null: {value!r}")
    return value


def check_hello(reply: Mapping[str, Any], *, pid: int) -> None:
    """A hello from a probe of this protocol version, in this pid."""
    if reply.get("probe") != PROBE_VERSION:
        raise ProbeBadReply(f"probe protocol {reply.get('probe')!r}, expected {PROBE_VERSION}",
                            pid=pid)  # fmt: skip
    if reply.get("pid") != pid:
        raise ProbeBadReply(f"the socket answers for pid {reply.get('pid')!r}", pid=pid)


def parse_scan(reply: Mapping[str, Any], *, worker: WorkerRef, taken_at: float) -> ProcSample:
    """A scan reply as a ProcSample of `worker`."""
    try:
        resolution = _int(reply.get("resolution_ns"), "resolution_ns")
        if resolution < 1:
            raise ValueError(f"resolution_ns {resolution}")
        raw_tids = reply.get("tids")
        tids = None
        if raw_tids is not None:
            if not isinstance(raw_tids, list):
                raise TypeError("tids is not a list")
            tids = frozenset(_int(t, "tid") for t in raw_tids)
        raw_threads = reply.get("threads")
        if not isinstance(raw_threads, list):
            raise TypeError("threads is not a list")
        threads = []
        for raw in raw_threads:
            if not isinstance(raw, list) or len(raw) != 11:
                raise TypeError(f"a thread is not an 11-field list: {raw!r}"[:200])
            tid, start, comm, state, cpu, runs, number, wchan, point, timed, name = raw
            if (
                not isinstance(comm, str)
                or not isinstance(state, str)
                or not isinstance(timed, bool)
            ):
                raise TypeError(f"thread fields of the wrong type: {raw!r}"[:200])
            threads.append(
                ThreadActivity(
                    tid=_int(tid, "tid"), start_ticks=_int(start, "start_ticks"), comm=comm,
                    state=state, cpu_ns=_int(cpu, "cpu_ns"), runs=_int(runs, "runs"),
                    syscall=None if number is None else _int(number, "syscall"),
                    wchan=_opt(wchan, str, "wchan"), blocked_at=_opt(point, str, "blocked_at"),
                    timed_wait=timed, syscall_name=_opt(name, str, "syscall_name"),
                )
            )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise ProbeBadReply(f"bad scan reply: {err}", pid=worker.pid) from err
    return ProcSample(
        worker=worker, taken_at=taken_at, threads=tuple(threads), resolution_ns=resolution,
        tids=tids,
    )  # fmt: skip


def parse_dump(
    reply: Mapping[str, Any], *, worker: WorkerRef, taken_at: float
) -> tuple[StackSnapshot, ThreadNames]:
    """A dump reply as a (Python-only) StackSnapshot, and the threads' ident -> (tid, name)."""
    names: ThreadNames = {}
    threads = []
    try:
        raw_threads = reply.get("threads")
        if not isinstance(raw_threads, list):
            raise TypeError("threads is not a list")
        for raw in raw_threads:
            if not isinstance(raw, dict):
                raise TypeError("a thread is not an object")
            tid = _int(raw.get("tid"), "tid")
            ident = _int(raw.get("ident"), "ident")
            name = _opt(raw.get("name"), str, "name")
            raw_frames = raw.get("frames")
            if not isinstance(raw_frames, list):
                raise TypeError("frames is not a list")
            frames = []
            for frame in raw_frames:
                if not isinstance(frame, list) or len(frame) != 3:
                    raise TypeError(f"a frame is not [function, file, line]: {frame!r}"[:200])
                function, file, line = frame
                if not isinstance(function, str) or not isinstance(file, str):
                    raise TypeError(f"a frame's names are not strings: {frame!r}"[:200])
                frames.append(Frame(function=function, file=file, line=_int(line, "line")))
            names[ident] = (tid, name)
            threads.append(ThreadStack(tid=tid, name=name, frames=tuple(frames), native=False,
                                       source=SOURCE))  # fmt: skip
    except (TypeError, ValueError) as err:
        raise ProbeBadReply(f"bad dump reply: {err}", pid=worker.pid) from err
    snapshot = StackSnapshot(worker=worker, taken_at=taken_at, native=False, source=SOURCE,
                             threads=tuple(threads))  # fmt: skip
    return snapshot, names


_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-fA-F]+)\b.*\(most recent call first\):")
_FRAME = re.compile(r'^  File "(.*)", line (\d+|\?\?\?) in (.*)$')


def parse_faulthandler(
    text: str,
    *,
    worker: WorkerRef,
    taken_at: float,
    names: Mapping[int, tuple[int, str | None]],
    probe_ident: int | None,
    short: Callable[[str], str] = short_filename,
) -> StackSnapshot:
    """The last dump in a probe's stacks file (faulthandler's text, after the probe's header
    line naming each thread ident's tid) as a Python-only StackSnapshot. faulthandler gives
    code names, not qualified names ("do_handshake", where py-spy says
    "SSLSocket.do_handshake"), and at most 100 frames of 100 threads."""
    known = dict(names)
    lines = text.splitlines()
    for line in lines:
        if line.startswith(STACKS_HEADER):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                header = json.loads(line[len(STACKS_HEADER) :])
                for key, (tid, name) in header.get("threads", {}).items():
                    if isinstance(tid, int) and (name is None or isinstance(name, str)):
                        known.setdefault(int(key), (tid, name))
                if probe_ident is None and isinstance(header.get("probe_ident"), int):
                    probe_ident = header["probe_ident"]
    # Only the last dump: with repeat=True the watchdog appends one every period.
    starts = [i for i, line in enumerate(lines) if line.startswith("Timeout (")]
    if starts:
        lines = lines[starts[-1] + 1 :]
    threads: list[ThreadStack] = []
    ident: int | None = None
    frames: list[Frame] = []

    def flush() -> None:
        if ident is not None and ident != probe_ident:
            tid, name = known.get(ident, (ident, None))
            threads.append(ThreadStack(tid=tid, name=name, frames=tuple(frames), native=False,
                                       source=WATCHDOG_SOURCE))  # fmt: skip

    for line in lines:
        head = _THREAD.match(line)
        if head:
            flush()
            ident, frames = int(head[1], 16), []
            continue
        frame = _FRAME.match(line)
        if frame and ident is not None:
            number = int(frame[2]) if frame[2].isdigit() else 0
            frames.append(Frame(function=frame[3], file=short(frame[1]), line=number))
    flush()
    return StackSnapshot(
        worker=worker, taken_at=taken_at, native=False, threads=tuple(threads),
        source=WATCHDOG_SOURCE,
    )  # fmt: skip
