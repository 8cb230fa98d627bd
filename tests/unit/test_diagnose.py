"""`diagnose` on real py-spy fixtures: the real flow (procfs scans of a fake /proc root, the
Tracker, the catalog, the lock proof) with an injected clock, then its text, JSON and exit code.

The fake /proc holds frozen threads (their schedstat never moves: no progress), so a window
of `seconds` makes every non-idle thread stuck, as a hung worker's are."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from builders import fixture, py, snapshot, stack
from test_procfs import write_thread

from agent.diagnose import Diagnosis, diagnose, exit_code, to_record, to_text
from agent.errors import (
    EXIT_DEADLOCKED,
    EXIT_OK,
    EXIT_SPINNING,
    EXIT_STUCK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    AgentError,
    NativeUnwindFailed,
    PtraceDenied,
    PySpyTimeout,
)
from agent.types import StackSnapshot, WorkerRef, WorkerState

SITE = "/srv/venv/lib/python3.11/site-packages"
POLL = "7 0x7ffd5e0 0x1 0xffffffff 0x0 0x0 0x0 0x7ffd5a8 0x7f3c1e2d\n"
IDLE_FUTEX = "202 0x7f0 0x189 0x0 0x0 0x0 0xffffffff 0x7ffd 0x7f1\n"  # a condition variable
MAPS = (
    "55d0-55d1 r--p 0 00:2f 1 /root/.pyenv/versions/3.11.7/bin/python3.11\n"
    f"7f10-7f11 r-xp 0 00:2f 2 {SITE}/psycopg2_binary.libs/libpq-a17e3caa.so.5.17\n"
    f"7f12-7f13 r-xp 0 00:2f 3 {SITE}/psycopg2_binary.libs/libssl-8bd944e8.so.3\n"
    f"7f14-7f15 r-xp 0 00:2f 4 {SITE}/psycopg2/_psycopg.cpython-311-x86_64-linux-gnu.so\n"
    "7f16-7f17 r-xp 0 08:01 5 /usr/lib/x86_64-linux-gnu/libssl.so.3\n"
)


class Clock:
    """Time that passes only when the code under test sleeps (and a little per reading)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Dumps:
    """A StackSource replaying one snapshot, stamped with the injected clock."""

    def __init__(self, snap: StackSnapshot, clock: Clock, *, fail: Exception | None = None):
        self.snap, self.clock, self.fail = snap, clock, fail
        self.calls: list[bool] = []

    def dump(self, worker: WorkerRef, *, native: bool) -> StackSnapshot:
        self.calls.append(native)
        if self.fail is not None:
            raise self.fail
        return replace(self.snap, worker=worker, taken_at=self.clock(), native=native)


def fake_proc(
    tmp_path: Path, snap: StackSnapshot, *, syscalls: dict[int, str] | None = None
) -> str:
    proc = tmp_path / "proc"
    pid = snap.worker.pid
    for thread in snap.threads:
        call = (syscalls or {}).get(thread.tid, POLL if thread.tid != pid else IDLE_FUTEX)
        write_thread(proc, pid=pid, tid=thread.tid, syscall=call, schedstat="5000000 40 17\n")
    (proc / str(pid) / "maps").write_text(MAPS)
    site = proc / str(pid) / "root" / SITE.lstrip("/")
    site.mkdir(parents=True)
    (site / "psycopg2_binary-2.9.13.dist-info").mkdir()
    return str(proc)


def run(tmp_path: Path, snap: StackSnapshot, **kwargs: object) -> tuple[Diagnosis, Dumps]:
    clock = Clock()
    syscalls = kwargs.pop("syscalls", None)
    proc = fake_proc(tmp_path, snap, syscalls=syscalls)  # type: ignore[arg-type]
    stacks = Dumps(snap, clock, fail=kwargs.pop("fail", None))  # type: ignore[arg-type]
    found = diagnose(
        None, stacks=stacks, seconds=3.0, proc=proc, clock=clock, sleep=clock.sleep,
        workers=((snap.worker.master_pid,), (snap.worker,)), **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return found, stacks


def test_the_seed_hang_fixture_is_deadlocked_with_remedy_and_version_note(tmp_path: Path) -> None:
    found, stacks = run(tmp_path, fixture("libpq_ssl_with_https.native"))
    assert stacks.calls == [True, False, True]  # native, halfway Python, native
    assert found.verdict is WorkerState.DEADLOCKED
    assert exit_code(found) == EXIT_DEADLOCKED == 5
    (worker,) = found.workers
    assert worker.worker_class == "gthread"
    assert [f.signature.name for f in worker.report.findings] == ["libpq_ssl_with_https"]
    text = to_text(found)
    print(text)
    assert "worker 18237 (master 1, gthread): DEADLOCKED" in text
    assert "libpq_ssl_with_https (deadlock):" in text
    assert "[https] tid 18238 (NR-Harvest-Thread)" in text
    assert "Remedy: This is the Gunicorn" in text
    assert "stuck (no progress in 3.0 s) [request thread]" in text
    assert "PQconnectdb (libpq-a17e3caa.so.5.17)" in text
    assert "versions: libpq 17, openssl 3, libpq_openssl 3, psycopg2 2.9.13, cpython 3.11" in text
    flat = " ".join(text.split())  # long sentences are wrapped at 100 columns
    assert "this is the modern stall: a server or proxy not completing the TLS handshake" in flat
    assert text.endswith("verdict: deadlocked (exit 5)")


def test_the_json_document_has_the_same_facts(tmp_path: Path) -> None:
    found, _ = run(tmp_path, fixture("libpq_ssl_with_https.native"))
    record = json.loads(json.dumps(to_record(found)))
    assert (record["verdict"], record["exit_code"], record["seconds"]) == ("deadlocked", 5, 3.0)
    (worker,) = record["workers"]
    assert (worker["pid"], worker["master_pid"], worker["worker_class"]) == (18237, 1, "gthread")
    (finding,) = worker["findings"]
    assert finding["signature"] == "libpq_ssl_with_https" and finding["class"] == "deadlock"
    assert finding["remedy"] and finding["references"] and finding["summary"]
    assert {t["role"] for t in finding["threads"]} >= {"libpq", "https"}
    states = {t["name"]: t["state"] for t in worker["threads"]}
    assert states["NR-Harvest-Thread"] == "stuck" and states["MainThread"] == "idle"
    assert worker["versions"]["psycopg2"] == "2.9.13"
    assert "modern stall" in worker["version_note"]
    assert worker["locks"] is None


def test_an_idle_gthread_worker_is_ok(tmp_path: Path) -> None:
    snap = fixture("idle_gthread.native")
    idle = {t.tid: IDLE_FUTEX for t in snap.threads}
    found, _ = run(tmp_path, snap, syscalls=idle)
    assert found.verdict is WorkerState.OK and exit_code(found) == EXIT_OK
    text = to_text(found)
    assert "worker 2655 (master 1, gthread): OK" in text
    assert "thread 2676 ThreadPoolExecutor-0_0: idle [request thread]" in text
    assert text.endswith("verdict: ok (exit 0)")


def test_libpq_alone_is_stuck_with_a_named_stall_not_deadlocked(tmp_path: Path) -> None:
    # Only the TLS handshake to PostgreSQL hangs, no other OpenSSL user: a stall (no
    # connect_timeout), never the seed's deadlock.
    found, _ = run(tmp_path, fixture("libpq_alone.native"))
    assert found.verdict is WorkerState.STUCK and exit_code(found) == EXIT_STUCK
    text = to_text(found)
    assert "libpq_network_stall (stall)" in text and "libpq_ssl_with_https" not in text


def write_mutex(proc: str, pid: int, address: int, owner: int) -> None:
    """A held glibc pthread_mutex_t (lock 2, owner, nusers 1, kind normal) in the fake memory."""
    mem = Path(proc, str(pid), "mem")
    with mem.open("r+b" if mem.exists() else "wb") as f:
        f.seek(address)
        f.write(struct.pack("<iIiIi", 2, 0, owner, 1, 0))


@pytest.mark.skipif(
    __import__("os").uname().machine != "x86_64", reason="the fake syscall lines are x86_64's"
)
def test_a_mutex_cycle_is_printed_with_both_threads(tmp_path: Path) -> None:
    worker = WorkerRef(300, 1000.0, 1)
    frames = (py("run", "nativelocks.py", 12), py("Thread.run", "threading.py", 982))
    snap = snapshot(
        stack(py("EpollSelector.select", "selectors.py", 468), tid=300, name="MainThread"),
        stack(*frames, tid=301, name="ab"),
        stack(*frames, tid=302, name="ba"),
        worker=worker, at=0,
    )  # fmt: skip
    waits = {
        300: IDLE_FUTEX,
        301: "202 0x1000 0x80 0x2 0x0 0x0 0x0 0x7ffd 0x7f1\n",
        302: "202 0x2000 0x80 0x2 0x0 0x0 0x0 0x7ffd 0x7f1\n",
    }
    clock = Clock()
    proc = fake_proc(tmp_path, snap, syscalls=waits)
    write_mutex(proc, 300, 0x1000, owner=302)
    write_mutex(proc, 300, 0x2000, owner=301)
    found = diagnose(
        None, stacks=Dumps(snap, clock), seconds=2.0, proc=proc, clock=clock,
        sleep=clock.sleep, workers=((1,), (worker,)),
    )  # fmt: skip
    assert exit_code(found) == EXIT_DEADLOCKED
    (w,) = found.workers
    assert w.proof is not None and w.proof.cycles == ((301, 302),)
    text = to_text(found)
    print(text)
    assert "tid 301 (ab) waits on mutex 0x1000 held by tid 302 (ba)" in text
    assert "CYCLE (proven deadlock): tid 301 (ab) -> tid 302 (ba) -> tid 301 (ab)" in text
    assert "native_mutex_cycle (deadlock):" in text
    record = to_record(found)["workers"][0]
    assert record["locks"]["cycles"] == [[301, 302]]
    assert record["findings"][0]["signature"] == "native_mutex_cycle"


@pytest.mark.parametrize(
    ("state", "code"),
    [(WorkerState.OK, 0), (WorkerState.SPINNING, 6), (WorkerState.STUCK, 4),
     (WorkerState.DEADLOCKED, 5)],
    ids=["ok", "spinning", "stuck", "deadlocked"],
)  # fmt: skip
def test_the_exit_code_is_the_gravest_verdict(
    tmp_path: Path, state: WorkerState, code: int
) -> None:
    found, _ = run(tmp_path, fixture("libpq_ssl_with_https.native"))
    (w,) = found.workers
    ok = replace(w, report=replace(w.report, state=WorkerState.OK))
    graver = replace(w, report=replace(w.report, state=state))
    assert exit_code(replace(found, workers=(ok, graver, ok))) == code
    assert {EXIT_STUCK, EXIT_DEADLOCKED, EXIT_SPINNING}.isdisjoint({0, 1, EXIT_USAGE,
                                                                   EXIT_UNAVAILABLE})


def test_gevent_native_failure_falls_back_to_python_dumps(tmp_path: Path) -> None:
    snap = fixture("idle_gevent.python")

    class Flaky(Dumps):
        def dump(self, worker: WorkerRef, *, native: bool) -> StackSnapshot:
            if native:
                self.calls.append(native)
                raise NativeUnwindFailed("py-spy could not unwind native frames: UNW_EINVAL")
            return super().dump(worker, native=native)

    clock = Clock()
    proc = fake_proc(tmp_path, snap, syscalls={t.tid: IDLE_FUTEX for t in snap.threads})
    stacks = Flaky(snap, clock)
    found = diagnose(None, stacks=stacks, seconds=2.0, proc=proc, clock=clock,
                     sleep=clock.sleep, workers=((1,), (snap.worker,)))  # fmt: skip
    assert stacks.calls == [True, False, False, False]  # native tried once, then Python only
    assert exit_code(found) == EXIT_OK


def test_ptrace_denied_is_raised_not_half_answered(tmp_path: Path) -> None:
    denied = PtraceDenied("py-spy was denied access: Permission Denied", pid=18237)
    with pytest.raises(PtraceDenied, match="CAP_SYS_PTRACE"):
        run(tmp_path, fixture("libpq_ssl_with_https.native"), fail=denied)


def test_when_no_worker_could_be_dumped_there_is_no_verdict(tmp_path: Path) -> None:
    failed = PySpyTimeout("py-spy did not finish within 5s; killed", pid=18237)
    with pytest.raises(AgentError, match="did not finish"):
        run(tmp_path, fixture("libpq_ssl_with_https.native"), fail=failed)
