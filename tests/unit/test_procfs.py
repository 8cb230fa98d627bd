"""agent/procfs.py: parsing /proc text, and scanning a worker's threads from a fake proc root
(built in tmp_path) and from the real /proc."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from agent.errors import ProcessVanished, ProcReadError
from agent.procfs import (
    NS_PER_TICK,
    Scanner,
    children,
    parse_ctx_switches,
    parse_schedstat,
    parse_stat,
    parse_syscall,
    scan_worker,
)
from agent.types import ThreadActivity, WorkerRef

MISSING = None  # a file the builder leaves out


def stat_line(
    *, tid: int = 4242, comm: str = "python", state: str = "S", utime: int = 7, stime: int = 3,
    start: int = 123456, threads: int = 920,
) -> str:
    """A /proc/PID/task/TID/stat line; every other field holds a distinct decoy (900 + n)."""
    fields = {n: str(900 + n) for n in range(4, 53)}
    fields[14], fields[15], fields[22] = str(utime), str(stime), str(start)
    fields[20] = str(threads)
    return f"{tid} ({comm}) {state} " + " ".join(fields[n] for n in range(4, 53)) + "\n"


def status_text(*, voluntary: int = 11, nonvoluntary: int = 2) -> str:
    """The lines of a status file around the two context-switch counters."""
    return (
        "Name:\tpython\nState:\tS (sleeping)\nThreads:\t3\n"
        f"voluntary_ctxt_switches:\t{voluntary}\n"
        f"nonvoluntary_ctxt_switches:\t{nonvoluntary}\n"
    )


def write_thread(
    proc: Path, *, pid: int, tid: int, comm: str = "python", state: str = "S", utime: int = 7,
    stime: int = 3, start: int = 123456, voluntary: int = 11, nonvoluntary: int = 2,
    syscall: str | None = "202 0x7f0 0x80 0x0 0x0 0x0 0x0 0x7ffd 0x7f1\n",
    wchan: str | None = "futex_wait_queue",
    schedstat: str | None = "73001234 5002 17\n",
) -> Path:
    """One thread directory under a fake proc root; syscall/wchan/schedstat None leave the
    file out."""
    task = proc / str(pid) / "task" / str(tid)
    task.mkdir(parents=True)
    stat = stat_line(tid=tid, comm=comm, state=state, utime=utime, stime=stime, start=start)
    (task / "stat").write_text(stat)
    # The process's own stat: its num_threads (field 20) counts the task directories.
    count = len(list((proc / str(pid) / "task").iterdir()))
    (proc / str(pid) / "stat").write_text(stat_line(tid=pid, comm=comm, threads=count))
    (task / "status").write_text(status_text(voluntary=voluntary, nonvoluntary=nonvoluntary))
    if syscall is not None:
        (task / "syscall").write_text(syscall)
    if schedstat is not None:
        (task / "schedstat").write_text(schedstat)
    if wchan is not None:
        (task / "wchan").write_text(wchan)
    return task


def worker(pid: int, *, create_time: float = 1700000000.0, master_pid: int = 1) -> WorkerRef:
    return WorkerRef(pid=pid, create_time=create_time, master_pid=master_pid)


# --- parsing -----------------------------------------------------------------------------------

COMMS = ["python", "gunicorn: worker", "a) b (c)", "x)", ") (", "worker) S 1 2"]


@pytest.mark.parametrize("comm", COMMS, ids=["plain", "space", "parens", "trailing-paren",
                                             "only-parens", "looks-like-fields"])  # fmt: skip
def test_parse_stat_comm_with_spaces_and_parens(comm: str) -> None:
    line = stat_line(comm=comm, state="D", utime=120, stime=35, start=987654)
    assert parse_stat(line) == (comm, "D", 155, 987654)


def test_parse_stat_real_kernel_line() -> None:
    # The shape of a Linux 6.x stat line (52 fields) for a setproctitle'd gunicorn worker.
    line = (
        "31337 (gunicorn: work) S 31300 31300 31300 0 -1 4194560 2871 0 0 0 41 9 0 0 20 0 "
        "5 0 8126034 251916288 9473 18446744073709551615 94123 94456 140726 0 0 0 0 16781312 "
        "16386 0 0 0 -1 1 0 0 0 0 0 94789 94800 95123 140726 140727 140727 140728 0\n"
    )
    assert parse_stat(line) == ("gunicorn: work", "S", 50, 8126034)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(status_text(voluntary=11, nonvoluntary=2), 13),
     (status_text(voluntary=0, nonvoluntary=0), 0),
     ("Name:\tpython\n", 0),
     ("voluntary_ctxt_switches:\t5\n", 5),
     ("nonvoluntary_ctxt_switches: 4\nvoluntary_ctxt_switches: 1000000\n", 1000004)],
    ids=["both", "zero", "absent", "voluntary-only", "reordered"],
)  # fmt: skip
def test_parse_ctx_switches(status: str, expected: int) -> None:
    assert parse_ctx_switches(status) == expected


SP_PC = "0x7ffd 0x7f1"
PC = "0x7f1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("running\n", (None, None, False)),
     ("-1 0x7ffd1234 0x7f0011\n", (None, None, False)),
     # untimed futex (Lock.acquire, an idle pool thread): op 0x189, NULL timeout
     (f"202 0x7f2a3c0 0x189 0x0 0x0 0x0 0xffffffff {SP_PC}\n",
      (202, f"0x7f2a3c0 0x189 0x0 {SP_PC}", False)),
     # timed futex (acquire(timeout=...)): op 0x89 with a timeout pointer
     (f"202 0x7f2a3c0 0x89 0x0 0x7ffd00 0x0 0xffffffff {SP_PC}\n",
      (202, f"0x7f2a3c0 0x89 0x0 {SP_PC}", True)),
     # libpq waiting forever: poll(fds, 1, -1)
     (f"7 0x7ffd5e0 0x1 0xffffffff 0x0 0x0 0x0 {SP_PC}\n",
      (7, f"0x7ffd5e0 0x1 0xffffffff {SP_PC}", False)),
     # psycopg 3's 100 ms slices: the leftover registers change, the point does not
     (f"7 0x7ffd5e0 0x1 0x64 0x0 0x7faedd94e6e8 0x0 {SP_PC}\n",
      (7, f"0x7ffd5e0 0x1 0x64 {SP_PC}", True)),
     # restarted after a ptrace stop: the same point
     (f"219 0x7ffd5e0 0x1 0xffffffff 0x0 0x0 0x0 {SP_PC}\n",
      (219, f"0x7ffd5e0 0x1 0xffffffff {SP_PC}", True)),
     # gthread's event loop: a fresh events buffer every call, and asyncio's reaches its select
     # at two stack depths in turn: the epoll fd (and pc) is the wait
     (f"232 0x5 0x7f534dbe4a50 0x3 0x3e8 0x0 0x0 0x7ffcc8cc8430 {PC}\n",
      (232, f"0x5 {PC}", True)),
     (f"232 0x5 0x7f534dbe5b30 0x2 0x3e8 0x0 0x0 0x7ffcc8cc8490 {PC}\n",
      (232, f"0x5 {PC}", True)),
     # a sleep is not a wait
     (f"230 0x1 0x1 0x7ffd10 0x0 0x0 0x0 {SP_PC}\n", (230, f"0x1 0x1 0x7ffd10 {SP_PC}", False)),
     (f"0 0x3 0x7f 0x2000 0x0 0x0 0x0 {SP_PC}\n", (0, f"0x3 0x7f 0x2000 {SP_PC}", False)),
     ("7\n", (7, None, False)),
     ("", (None, None, False)),
     ("garbage here\n", (None, None, False))],
    ids=["running", "blocked-outside-syscall", "futex-untimed", "futex-timed", "poll-forever",
         "poll-slices", "restart-syscall", "epoll-buffer-a", "epoll-buffer-b", "sleep",
         "read-is-zero", "bare-number", "empty", "garbage"],
)  # fmt: skip
def test_parse_syscall(text: str, expected: tuple[int | None, str | None, bool]) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("these lines carry x86_64 syscall numbers")
    assert parse_syscall(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("73001234 5002 17\n", (73001234, 17)), ("0 0 0\n", (0, 0)),
     ("18446744073709551615 1 2\n", (18446744073709551615, 2))],
    ids=["plain", "zero", "huge"],
)  # fmt: skip
def test_parse_schedstat(text: str, expected: tuple[int, int]) -> None:
    assert parse_schedstat(text) == expected


# --- scan_worker against a fake /proc ---------------------------------------------------------


def test_scan_worker_fake_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_thread(proc, pid=100, tid=100, comm="gunicorn: worker", state="S", utime=40, stime=2,
                 start=5000, voluntary=30, nonvoluntary=4)  # fmt: skip
    write_thread(proc, pid=100, tid=105, comm="ThreadPool)x", state="D", utime=1, stime=1,
                 start=5100, syscall="-1 0x0 0x0\n", wchan="0")  # fmt: skip
    write_thread(proc, pid=100, tid=103, syscall="running\n", wchan="\n")
    (proc / "100" / "task" / "not-a-tid").mkdir()

    sample = scan_worker(worker(100), now=42.5, proc=str(proc))

    assert sample.worker == worker(100)
    assert sample.taken_at == 42.5
    assert [t.tid for t in sample.threads] == [100, 103, 105]
    main, running, blocked = sample.threads
    assert sample.resolution_ns == 1
    assert main == ThreadActivity(
        tid=100, start_ticks=5000, comm="gunicorn: worker", state="S", cpu_ns=73001234,
        runs=17, syscall=202, wchan="futex_wait_queue",
        blocked_at="0x7f0 0x80 0x0 0x7ffd 0x7f1", syscall_name="futex",
    )  # fmt: skip
    assert (running.syscall, running.wchan, running.blocked_at) == (None, None, None)
    assert (blocked.comm, blocked.state, blocked.start_ticks) == ("ThreadPool)x", "D", 5100)
    assert (blocked.syscall, blocked.wchan) == (None, None)  # "-1 ..." and wchan "0"


def test_without_schedstat_the_scanner_falls_back_to_ticks_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proc = tmp_path / "proc"
    write_thread(proc, pid=600, tid=600, utime=40, stime=2, voluntary=30, nonvoluntary=4,
                 schedstat=MISSING)  # fmt: skip
    scanner = Scanner(str(proc))
    first = scanner.scan(worker(600), now=1.0)
    second = scanner.scan(worker(600), now=2.0)
    assert not scanner.precise
    assert first.resolution_ns == second.resolution_ns == NS_PER_TICK
    (thread,) = second.threads
    assert (thread.cpu_ns, thread.runs) == (42 * NS_PER_TICK, 34)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "schedstat is missing" in caplog.records[0].message


def test_scan_worker_thread_without_syscall_or_wchan(tmp_path: Path) -> None:
    """Without ptrace access syscall is unreadable and wchan may be hidden: still a sample."""
    proc = tmp_path / "proc"
    write_thread(proc, pid=200, tid=200)
    write_thread(proc, pid=200, tid=201, syscall=MISSING, wchan=MISSING, utime=9, stime=1)
    sample = scan_worker(worker(200), now=1.0, proc=str(proc))
    hidden = next(t for t in sample.threads if t.tid == 201)
    assert (hidden.syscall, hidden.wchan, hidden.blocked_at) == (None, None, None)
    assert hidden.cpu_ns == 73001234
    assert next(t for t in sample.threads if t.tid == 200).syscall == 202


def test_scan_worker_skips_a_thread_that_exited_mid_scan(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_thread(proc, pid=300, tid=300)
    (proc / "300" / "task" / "301").mkdir()  # listed, but its files are already gone
    sample = scan_worker(worker(300), now=1.0, proc=str(proc))
    assert [t.tid for t in sample.threads] == [300]


def test_scan_worker_vanished_worker(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    with pytest.raises(ProcessVanished) as caught:
        scan_worker(worker(400), now=1.0, proc=str(proc))
    assert caught.value.pid == 400
    assert caught.value.reason == "vanished"


def test_scan_worker_unparsable_stat_is_a_proc_error(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    task = write_thread(proc, pid=500, tid=500)
    (task / "stat").write_text("500 (python) S 1 2\n")  # truncated
    with pytest.raises(ProcReadError) as caught:
        scan_worker(worker(500), now=1.0, proc=str(proc))
    assert caught.value.pid == 500
    assert "500" in str(caught.value)


# --- scan_worker against the real /proc --------------------------------------------------------


def test_scan_worker_real_proc_of_this_process() -> None:
    me = psutil.Process()
    parked = threading.Event()
    release = threading.Event()

    def park() -> None:
        parked.set()
        release.wait()

    helper = threading.Thread(target=park, name="procfs-test-parked", daemon=True)
    helper.start()
    try:
        assert parked.wait(5)
        ref = WorkerRef(me.pid, me.create_time(), os.getppid())
        deadline = time.monotonic() + 5
        while True:  # until the helper sits in its futex wait (it may not have got there yet)
            sample = scan_worker(ref, now=time.time(), proc="/proc")
            helper_now = next(t for t in sample.threads if t.tid == helper.native_id)
            if helper_now.state == "S" or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    finally:
        release.set()
        helper.join(5)

    by_tid = {t.tid: t for t in sample.threads}
    assert os.getpid() in by_tid  # the main thread's tid is the pid
    assert helper.native_id in by_tid
    assert len(sample.threads) >= 2
    assert sample.resolution_ns == 1  # this kernel has schedstat
    for t in sample.threads:
        assert isinstance(t.cpu_ns, int)
        assert t.cpu_ns >= 0
        assert isinstance(t.runs, int)
        assert t.start_ticks > 0
        assert t.state in "RSDTtZXIP"
    assert by_tid[os.getpid()].cpu_ns > 1_000_000  # this test process has run for a while
    parked_thread = by_tid[helper.native_id]
    assert parked_thread.state == "S"
    assert parked_thread.runs > 0
    assert isinstance(parked_thread.syscall, int)  # our own threads: syscall is readable
    assert parked_thread.blocked_at  # ...with its arguments and pointers


def test_children_lists_real_child_processes(tmp_path: Path) -> None:
    kids = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    pids = {k.pid for k in kids}
    try:
        # Other fixtures (the session's PostgreSQL) may have children of this process too.
        assert pids <= set(children(os.getpid()) or ())
    finally:
        for kid in kids:
            kid.kill()
            kid.wait()
    assert not pids & set(children(os.getpid()) or ())
    assert children(2**22 + 7) == []  # no such process
    assert children(1, proc=str(tmp_path)) == []  # a proc root without that pid


# --- the incremental Scanner on the real /proc ------------------------------------------------


def test_the_scanner_returns_only_threads_that_ran_and_follows_the_thread_list() -> None:
    me = psutil.Process()
    ref = WorkerRef(me.pid, me.create_time(), os.getppid())
    release = threading.Event()
    work = threading.Event()
    done = threading.Event()

    def parked() -> None:
        release.wait()

    def worker() -> None:
        while not release.is_set():
            if work.wait(0.05):
                sum(range(200_000))  # a few ms of CPU
                work.clear()
                done.set()

    quiet = threading.Thread(target=parked, name="scanner-parked", daemon=True)
    busy = threading.Thread(target=worker, name="scanner-busy", daemon=True)
    quiet.start()
    busy.start()
    scanner = Scanner()
    try:
        first = scanner.scan(ref, now=1.0)
        assert first.tids is not None and {quiet.native_id, busy.native_id} <= first.tids
        assert {t.tid for t in first.threads} == first.tids  # everything, the first time
        assert scanner.open_fds == 2 * len(first.tids) + 1  # schedstat, syscall; the stat file
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the new thread has reached its wait
            time.sleep(0.05)
            if quiet.native_id not in {t.tid for t in scanner.scan(ref, now=1.5).threads}:
                break
        time.sleep(0.2)
        second = scanner.scan(ref, now=2.0)
        changed = {t.tid for t in second.threads}
        assert quiet.native_id not in changed  # parked: schedstat did not move, nothing read
        assert second.tids == first.tids
        work.set()
        assert done.wait(5)
        third = scanner.scan(ref, now=3.0)
        (busy_now,) = [t for t in third.threads if t.tid == busy.native_id]
        (busy_before,) = [t for t in first.threads if t.tid == busy.native_id]
        assert busy_now.cpu_ns - busy_before.cpu_ns > 1_000_000
        extra = threading.Thread(target=parked, name="scanner-new", daemon=True)
        extra.start()
        fourth = scanner.scan(ref, now=4.0)
        assert extra.native_id in (fourth.tids or ())
        assert extra.native_id in {t.tid for t in fourth.threads}  # new: reported in full
        release.set()
        for thread in (quiet, busy, extra):
            thread.join(5)
        # join() returns when the Python thread is done; the kernel task can outlive it for a
        # moment (seen on a loaded machine), so wait for /proc to drop them, as the scanner will.
        ended = {quiet.native_id, busy.native_id, extra.native_id}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            Path(f"/proc/{os.getpid()}/task/{tid}").exists() for tid in ended
        ):
            time.sleep(0.01)
        fifth = scanner.scan(ref, now=5.0)
        assert not ended & (fifth.tids or set())
        assert scanner.open_fds == 2 * len(fifth.tids or ()) + 1  # the ended threads: closed
    finally:
        release.set()
        scanner.close()
    assert scanner.open_fds == 0


def test_the_scanner_falls_back_to_open_read_close_past_its_fd_budget() -> None:
    me = psutil.Process()
    ref = WorkerRef(me.pid, me.create_time(), os.getppid())
    scanner = Scanner(max_fds=2)  # the stat file and one schedstat
    try:
        first = scanner.scan(ref, now=1.0)
        second = scanner.scan(ref, now=2.0)
        assert scanner.open_fds == 2
        assert first.tids == second.tids and len(first.tids or ()) >= 1
        assert os.getpid() in {t.tid for t in second.threads}  # this thread ran: still seen
    finally:
        scanner.close()
