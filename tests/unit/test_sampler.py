"""agent.sampler: which level samples a master's workers, decided by what actually works.

py-spy is the real PySpy class fed py-spy's real error text through its runner; the probe is
a recording stand-in (the real one has its own tests)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from builders import WORKER, activity, proc

from agent import procfs
from agent.errors import ProbeMissing, ProbeSilent, PtraceDenied
from agent.pyspy import PySpy
from agent.sampler import Level, Mode, Sampler
from agent.types import ProcSample, StackSnapshot, ThreadStack, WorkerRef

DENIED = (
    "Permission Denied: Try running again with elevated permissions by going "
    "'sudo env \"PATH=$PATH\" !!'"
)
DUMP = json.dumps([{"pid": WORKER.pid, "thread_id": 1, "os_thread_id": 100,
                    "thread_name": "MainThread", "frames": []}])  # fmt: skip


class FakeRunner:
    """py-spy as the kernel lets it run: `attach` (a blocking dump) and `read` (--nonblocking)
    are each allowed or denied."""

    def __init__(self, *, attach: bool, read: bool) -> None:
        self.attach, self.read = attach, read
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], *, timeout: float) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        allowed = self.read if "--nonblocking" in argv else self.attach
        return (0, DUMP, "") if allowed else (1, "", DENIED)


class FakeProbe:
    def __init__(self, *, present: bool = True, silent: bool = False) -> None:
        self.present, self.silent = present, silent
        self.dumps = 0
        self.scans = 0

    def available(self, pid: int) -> bool:
        return self.present

    def scan(self, worker: WorkerRef, *, now: float) -> ProcSample:
        self.scans += 1
        if self.silent:
            raise ProbeSilent("no answer within 1s", pid=worker.pid)
        return proc(activity(tid=worker.pid), at=now, worker=worker)

    def dump(self, worker: WorkerRef, *, native: bool) -> StackSnapshot:
        self.dumps += 1
        thread = ThreadStack(tid=worker.pid, name="MainThread", frames=(), native=False,
                             source="probe")  # fmt: skip
        return StackSnapshot(worker, 0.0, False, (thread,), source="probe")

    def retain(self, workers: Iterable[WorkerRef]) -> None:
        pass

    def forget(self, worker: WorkerRef) -> None:
        pass

    def close(self) -> None:
        pass


def sampler(mode: Mode, runner: FakeRunner | None, probe: FakeProbe | None,
            proc_dir: str = "/nonexistent") -> Sampler:  # fmt: skip
    pyspy = PySpy("py-spy", runner=runner) if runner is not None else None
    return Sampler(mode, pyspy=pyspy, probe=probe, scanner=procfs.Scanner(proc_dir))


def test_full_py_spy_when_attaching_works() -> None:
    runner, probe = FakeRunner(attach=True, read=True), FakeProbe()
    s = sampler(Mode.AUTO, runner, probe)
    snap = s.dump(WORKER, native=True)
    assert snap.native and snap.source == "py-spy"
    assert s.level(WORKER) is Level.PYSPY
    assert probe.dumps == 0
    assert "--native" in runner.calls[0] and "--nonblocking" not in runner.calls[0]


def test_nonblocking_when_only_attaching_is_denied() -> None:
    runner, probe = FakeRunner(attach=False, read=True), FakeProbe()
    s = sampler(Mode.AUTO, runner, probe)
    snap = s.dump(WORKER, native=True)
    assert not snap.native and snap.source == "py-spy --nonblocking"
    assert s.level(WORKER) is Level.NONBLOCKING
    # Decided once for the master: later dumps go straight to --nonblocking, never --native.
    runner.calls.clear()
    s.dump(WorkerRef(101, 1.0, WORKER.master_pid), native=True)
    assert runner.calls == [["py-spy", "dump", "--json", "--pid", "101", "--nonblocking"]]
    assert probe.dumps == 0


def test_probe_when_py_spy_is_denied_outright() -> None:
    runner, probe = FakeRunner(attach=False, read=False), FakeProbe()
    s = sampler(Mode.AUTO, runner, probe)
    snap = s.dump(WORKER, native=True)
    assert snap.source == "probe" and probe.dumps == 1
    assert s.level(WORKER) is Level.PROBE
    assert not s.sees_memory(WORKER)  # no lock proof or versions read from outside
    runner.calls.clear()
    s.dump(WORKER, native=False)
    assert runner.calls == [] and probe.dumps == 2
    # Its /proc view comes from the probe too (the agent cannot read the syscalls).
    s.scan(WORKER, now=5.0)
    assert probe.scans == 1
    # Another master is decided on its own.
    assert s.level(WorkerRef(200, 1.0, 2)) is None


def test_denied_with_no_probe_says_how_to_get_one() -> None:
    s = sampler(Mode.AUTO, FakeRunner(attach=False, read=False), FakeProbe(present=False))
    with pytest.raises(PtraceDenied, match="deadlock-agent run"):
        s.dump(WORKER, native=True)
    assert s.level(WORKER) is None


def test_py_spy_mode_never_falls_back() -> None:
    runner, probe = FakeRunner(attach=False, read=True), FakeProbe()
    s = sampler(Mode.PYSPY, runner, probe)
    with pytest.raises(PtraceDenied):
        s.dump(WORKER, native=True)
    assert len(runner.calls) == 1 and probe.dumps == 0


def test_probe_mode_never_runs_py_spy() -> None:
    runner, probe = FakeRunner(attach=True, read=True), FakeProbe()
    s = sampler(Mode.PROBE, runner, probe)
    assert s.dump(WORKER, native=True).source == "probe"
    assert runner.calls == []


def test_probe_mode_without_a_probe_is_refused() -> None:
    with pytest.raises(ValueError, match="probe"):
        sampler(Mode.PROBE, None, None)


def test_auto_without_py_spy_uses_the_probe() -> None:
    probe = FakeProbe()
    s = sampler(Mode.AUTO, None, probe)
    assert s.level(WORKER) is Level.PROBE
    assert s.dump(WORKER, native=True).source == "probe"


def test_silent_probe_is_counted_and_read_around_from_outside(tmp_path: Path) -> None:
    """The probe does not answer (a thread may hold the GIL): the scan falls back to the
    agent's own /proc view, and the silence is handed to the Monitor to count."""
    task = tmp_path / str(WORKER.pid) / "task" / str(WORKER.pid)
    task.mkdir(parents=True)
    stat = f"{WORKER.pid} (gunicorn) S 1 1 1 0 -1 0 0 0 0 0 5 5 0 0 20 0 1 0 100 0 0"
    (tmp_path / str(WORKER.pid) / "stat").write_text(stat)
    (task / "stat").write_text(stat)
    (task / "schedstat").write_text("123456 0 7\n")
    probe = FakeProbe(silent=True)
    s = sampler(Mode.PROBE, None, probe, proc_dir=str(tmp_path))
    sample = s.scan(WORKER, now=1.0)
    assert [t.cpu_ns for t in sample.threads] == [123456]
    assert sample.threads[0].syscall is None  # what only the probe could have read
    errors = s.drain_errors()
    assert [e.reason for e in errors] == ["probe_silent"]
    assert s.drain_errors() == []


def test_probe_missing_error_says_what_to_do() -> None:
    assert "deadlock-agent run" in str(ProbeMissing("no probe socket", pid=5))
