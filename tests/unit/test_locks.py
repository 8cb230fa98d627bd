"""agent/locks.py: which futex waits are glibc mutex waits, which mutex reads are trusted, and the
wait-for graph's cycles and orphans; and procfs's reading of them from a fake proc root.

The syscall lines are shaped like ones read on this machine (glibc 2.36, x86_64) from threads
blocked in pthread_mutex_lock (op 0x80, val 2), in pthread_cond_wait and Python's untimed lock
acquire (op 0x189, val 0), and waiting for the GIL (op 0x89 with a timeout)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.errors import ProcessVanished
from agent.locks import (
    PID_MAX_LIMIT,
    LockProof,
    MutexWait,
    mutex_futex,
    prove,
    trusted,
)
from agent.procfs import alive_elsewhere, mutex_waits, read_lock_waits, read_mutex

A, B, C = 0x7F21CDEDA140, 0x7F21CDEDA180, 0x7F21CDEDA1C0  # mutex addresses
TAIL = "0x0 0x0 0x7f21cdd9a748 0x7f21ce4a412b"  # args 5, 6, sp, pc


def wait(
    *, tid: int, owner: int, futex: int = A, lock_word: int = 2, kind: int = 0, count: int = 0,
    nusers: int = 1,
) -> MutexWait:  # fmt: skip
    """A thread blocked on a held mutex; the defaults are what a locked default mutex holds."""
    return MutexWait(
        tid=tid, futex=futex, lock_word=lock_word, owner=owner, kind=kind, count=count,
        nusers=nusers,
    )  # fmt: skip


def live(*tids: int) -> frozenset[int]:
    return frozenset(tids)


# --- the syscall line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "machine", "expected"),
    [
        (f"202 {A:#x} 0x80 0x2 0x0 {TAIL}", "x86_64", A),
        (f"202 {A:#x} 0x0 0x2 0x0 {TAIL}", "x86_64", A),
        (f"98 {A:#x} 0x80 0x2 0x0 {TAIL}", "aarch64", A),
        (f"202 {A:#x} 0x189 0x0 0x0 0x0 0xffffffff 0x7f 0x7f", "x86_64", None),
        (f"202 {A:#x} 0x89 0x0 0x7f21bfffe5f0 0x0 0xffffffff 0x7f 0x7f", "x86_64", None),
        (f"202 {A:#x} 0x189 0x2 0x0 {TAIL}", "x86_64", None),
        (f"202 {A:#x} 0x80 0x1 0x0 {TAIL}", "x86_64", None),
        (f"202 {A:#x} 0x80 0x2 0x7ffd5e0 {TAIL}", "x86_64", None),
        (f"202 {A:#x} 0x81 0x2 0x0 {TAIL}", "x86_64", None),
        (f"98 {A:#x} 0x80 0x2 0x0 {TAIL}", "x86_64", None),
        (f"202 {A:#x} 0x80 0x2 0x0 {TAIL}", "aarch64", None),
        (f"202 {A:#x} 0x80 0x2 0x0 {TAIL}", "riscv64", None),
        (f"219 {A:#x} 0x80 0x2 0x0 {TAIL}", "x86_64", None),
        ("7 0x7ffd5e0 0x1 0xffffffff 0x0 0x0 0x0 0x7ffd5a8 0x7f3c1e2d", "x86_64", None),
        ("202 0x0 0x80 0x2 0x0 0x0 0x0 0x7f 0x7f", "x86_64", None),
        ("running", "x86_64", None),
        ("-1 0x7ffd5a8 0x7f3c1e2d", "x86_64", None),
        ("202 zz 0x80 0x2 0x0 0x0 0x0 0x7f 0x7f", "x86_64", None),
        ("", "x86_64", None),
    ],
    ids=[
        "lll-lock-wait-private", "lll-lock-wait-shared", "aarch64", "python-lock-or-condvar",
        "gil-timed-bitset", "bitset-even-with-val-2", "val-1-not-contended", "with-timeout",
        "requeue-pi-op", "aarch64-number-on-x86", "x86-number-on-aarch64", "unknown-machine",
        "restart-syscall", "poll", "null-address", "running", "blocked-outside-syscall",
        "garbage", "empty",
    ],
)  # fmt: skip
def test_mutex_futex(line: str, machine: str, expected: int | None) -> None:
    assert mutex_futex(line, machine) == expected


# --- what is read -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("read", "ok"),
    [
        (wait(tid=1, owner=2), True),
        (wait(tid=1, owner=2, lock_word=1), True),
        (wait(tid=1, owner=2, kind=3), True),
        (wait(tid=1, owner=2, kind=2), True),
        (wait(tid=1, owner=2, kind=1, count=1), True),
        (wait(tid=1, owner=2, lock_word=0), False),
        (wait(tid=1, owner=2, lock_word=3), False),
        (wait(tid=1, owner=2, kind=16), False),
        (wait(tid=1, owner=2, kind=32), False),
        (wait(tid=1, owner=2, kind=128), False),
        (wait(tid=1, owner=2, kind=256), False),
        (wait(tid=1, owner=2, kind=-1), False),
        (wait(tid=1, owner=0), False),
        (wait(tid=1, owner=-5), False),
        (wait(tid=1, owner=PID_MAX_LIMIT + 1), False),
        (wait(tid=1, owner=2, nusers=0), False),
        (wait(tid=1, owner=2, count=1), False),
        (wait(tid=1, owner=2, kind=1, count=0), False),
        (wait(tid=1, owner=1), True),
        (wait(tid=1, owner=1, kind=3), True),
        (wait(tid=1, owner=1, kind=1, count=1), False),
        (wait(tid=1, owner=1, kind=2), False),
    ],
    ids=[
        "held-with-waiters", "held", "adaptive", "errorcheck", "recursive", "free",
        "bad-lock-word", "robust", "priority-inheritance", "pshared", "elision", "negative-kind",
        "no-owner", "negative-owner", "owner-beyond-pid-max", "no-users",
        "count-on-non-recursive", "recursive-without-count", "normal-relock", "adaptive-relock",
        "recursive-relock-never-blocks", "errorcheck-relock-returns-edeadlk",
    ],
)  # fmt: skip
def test_trusted(read: MutexWait, ok: bool) -> None:
    assert trusted(read) is ok


# --- the graph --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waits", "tids", "cycles", "orphans"),
    [
        ([wait(tid=11, owner=12, futex=B), wait(tid=12, owner=11, futex=A)],
         live(10, 11, 12), ((11, 12),), ()),
        ([wait(tid=22, owner=23, futex=A), wait(tid=23, owner=21, futex=B),
          wait(tid=21, owner=22, futex=C)],
         live(21, 22, 23), ((21, 22, 23),), ()),
        ([wait(tid=31, owner=31)], live(30, 31), ((31,),), ()),
        ([wait(tid=41, owner=49)], live(40, 41), (), ((41, 49),)),
        ([wait(tid=51, owner=52, futex=A), wait(tid=52, owner=53, futex=B)],
         live(51, 52, 53), (), ()),
        ([wait(tid=61, owner=62, futex=A), wait(tid=62, owner=63, futex=B),
          wait(tid=63, owner=62, futex=C), wait(tid=64, owner=61, futex=A)],
         live(61, 62, 63, 64), ((62, 63),), ()),
        ([wait(tid=71, owner=72), wait(tid=72, owner=71), wait(tid=73, owner=74, futex=B),
          wait(tid=74, owner=73, futex=C), wait(tid=75, owner=75, futex=C)],
         live(71, 72, 73, 74, 75), ((71, 72), (73, 74), (75,)), ()),
        ([wait(tid=81, owner=82), wait(tid=82, owner=99, futex=B)],
         live(81, 82), (), ((82, 99),)),
        ([wait(tid=91, owner=92), wait(tid=92, owner=91, futex=B)], live(92), (), ((92, 91),)),
        ([], live(1, 2), (), ()),
    ],
    ids=[
        "two-cycle", "three-cycle-in-wait-order", "self-relock", "orphan", "chain-no-cycle",
        "tail-into-cycle-is-not-in-it", "several-cycles", "chain-into-orphan",
        "exited-waiter-is-no-waiter", "no-waits",
    ],
)  # fmt: skip
def test_prove(
    waits: list[MutexWait], tids: frozenset[int], cycles: tuple[tuple[int, ...], ...],
    orphans: tuple[tuple[int, int], ...],
) -> None:  # fmt: skip
    proof = prove(waits, tids)
    assert proof.cycles == cycles
    assert proof.orphans == orphans
    assert proof.proven is bool(cycles or orphans)


def test_edges_name_waiter_mutex_and_owner_including_orphans() -> None:
    proof = prove(
        [wait(tid=12, owner=11, futex=A), wait(tid=11, owner=12, futex=B),
         wait(tid=13, owner=77, futex=C)],
        live(11, 12, 13),
    )  # fmt: skip
    assert proof.edges == ((11, B, 12), (12, A, 11), (13, C, 77))


@pytest.mark.parametrize(
    "waits",
    [
        [wait(tid=11, owner=12, lock_word=0), wait(tid=12, owner=11, futex=B, lock_word=0)],
        [wait(tid=11, owner=12, kind=16), wait(tid=12, owner=11, futex=B, kind=16)],
        [wait(tid=11, owner=12, kind=128), wait(tid=12, owner=11, futex=B, kind=128)],
        [wait(tid=11, owner=12, nusers=0), wait(tid=12, owner=11, futex=B, nusers=0)],
        [wait(tid=11, owner=11, kind=1, count=1)],
        [wait(tid=11, owner=0), wait(tid=12, owner=-1, futex=B)],
    ],
    ids=["free-lock-words", "robust", "pshared", "no-users", "recursive-relock", "no-owner"],
)
def test_untrusted_reads_give_no_edge_and_no_proof(waits: list[MutexWait]) -> None:
    assert prove(waits, live(11, 12)) == LockProof(cycles=(), orphans=(), edges=())


def test_an_owner_alive_in_another_process_is_no_edge_and_no_orphan() -> None:
    # pid 1's thread, or a tid of an unrelated process: the memory is no mutex of ours.
    waits = [wait(tid=11, owner=1), wait(tid=12, owner=4711, futex=B)]
    proof = prove(waits, live(11, 12), alive_elsewhere=frozenset({1, 4711}))
    assert proof == LockProof(cycles=(), orphans=(), edges=())
    # Without that knowledge the same reads are orphans: the caller must say who is alive.
    assert prove(waits, live(11, 12)).orphans == ((11, 1), (12, 4711))


def test_a_live_tid_of_the_process_is_never_taken_for_an_outsider() -> None:
    proof = prove(
        [wait(tid=11, owner=12), wait(tid=12, owner=11, futex=B)], live(11, 12),
        alive_elsewhere=frozenset({11, 12}),
    )  # fmt: skip
    assert proof.cycles == ((11, 12),)


def test_python_locks_and_condition_variables_give_nothing() -> None:
    """Threads in Python's Lock.acquire (twice on one lock: a real self-deadlock), in
    Condition.wait and pthread_cond_wait, and waiting for the GIL: none is a mutex wait, so
    however their memory reads, no edge and no proof."""
    lines = {
        11: f"202 {A:#x} 0x189 0x0 0x0 0x0 0xffffffff 0x7f 0x7f",  # Lock.acquire() again
        12: f"202 {B:#x} 0x189 0x0 0x0 0x0 0xffffffff 0x7f 0x7f",  # Condition.wait()
        13: f"202 {C:#x} 0x189 0x0 0x0 0x0 0xffffffff 0x7f 0x7f",  # pthread_cond_wait
        14: f"202 {C + 8:#x} 0x89 0x0 0x7f21bfffe5f0 0x0 0xffffffff 0x7f 0x7f",  # the GIL
    }
    waits = [
        wait(tid=tid, owner=11, futex=address)  # as if each held by 11
        for tid, line in lines.items()
        if (address := mutex_futex(line, "x86_64")) is not None
    ]
    assert waits == []
    assert prove(waits, live(*lines)) == LockProof(cycles=(), orphans=(), edges=())


# --- procfs: reading them (a fake proc root; mem is a plain file, addresses small) -------------


def mutex_bytes(*, lock_word: int = 2, count: int = 0, owner: int, nusers: int = 1,
                kind: int = 0) -> bytes:  # fmt: skip
    """A glibc LP64 pthread_mutex_t head as it sits in memory."""
    return struct.pack("<iIiIi", lock_word, count, owner, nusers, kind) + bytes(20)


def fake_process(
    proc: Path, *, pid: int, threads: dict[int, str], memory: dict[int, bytes], ppid: int = 1
) -> None:
    """A process under a fake proc root: its tasks' syscall lines and its memory."""
    (proc / str(pid) / "task").mkdir(parents=True)
    (proc / str(pid) / "stat").write_text(f"{pid} (python) S {ppid} " + "0 " * 48 + "\n")
    for tid, line in threads.items():
        (proc / str(pid) / "task" / str(tid)).mkdir()
        (proc / str(pid) / "task" / str(tid) / "syscall").write_text(line + "\n")
    with (proc / str(pid) / "mem").open("wb") as mem:
        for address, raw in memory.items():
            mem.seek(address)
            mem.write(raw)


def lll_wait(address: int) -> str:
    return f"202 {address:#x} 0x80 0x2 0x0 {TAIL}"


def test_read_mutex_reads_the_glibc_layout(tmp_path: Path) -> None:
    fake_process(tmp_path, pid=5, threads={}, memory={0x1000: mutex_bytes(owner=4242, kind=3)})
    assert read_mutex(5, 0x1000, proc=str(tmp_path)) == (2, 0, 4242, 1, 3)
    assert read_mutex(5, 0x9000, proc=str(tmp_path)) is None  # past the end: a short read
    assert read_mutex(6, 0x1000, proc=str(tmp_path)) is None  # no such process
    assert read_mutex(5, 1 << 64, proc=str(tmp_path)) is None  # no such address


def test_mutex_waits_reads_only_mutex_waiters(tmp_path: Path) -> None:
    fake_process(
        tmp_path, pid=5,
        threads={
            5: "7 0x7ffd5e0 0x1 0xffffffff 0x0 0x0 0x0 0x7ffd5a8 0x7f3c1e2d",
            6: lll_wait(0x1000), 7: lll_wait(0x1000), 8: lll_wait(0x2000),
            9: "202 0x3000 0x189 0x0 0x0 0x0 0xffffffff 0x7f 0x7f", 10: "running",
        },
        memory={0x1000: mutex_bytes(owner=8), 0x2000: mutex_bytes(owner=6, count=7, kind=1),
                0x3000: mutex_bytes(owner=5)},
    )  # fmt: skip
    waits = mutex_waits(5, [5, 6, 7, 8, 9, 10, 11], proc=str(tmp_path), machine="x86_64")
    assert waits == [
        MutexWait(6, 0x1000, 2, 8, 0, 0, 1),
        MutexWait(7, 0x1000, 2, 8, 0, 0, 1),
        MutexWait(8, 0x2000, 2, 6, 1, 7, 1),
    ]


def test_alive_elsewhere_keeps_the_parent_s_threads_as_inherited(tmp_path: Path) -> None:
    fake_process(tmp_path, pid=5, threads={5: "running"}, memory={}, ppid=3)
    (tmp_path / "300").mkdir()  # a thread of the parent: the owner of an inherited mutex
    (tmp_path / "300" / "status").write_text("Name:\tgunicorn\nTgid:\t3\nPid:\t300\n")
    (tmp_path / "400").mkdir()  # a thread of an unrelated process
    (tmp_path / "400" / "status").write_text("Name:\tother\nTgid:\t4\nPid:\t400\n")
    # 500: no such thread anywhere
    assert alive_elsewhere(5, [300, 400, 500], proc=str(tmp_path)) == {400}


def test_read_lock_waits_proves_a_cycle_and_an_orphan_from_a_fake_proc(tmp_path: Path) -> None:
    fake_process(
        tmp_path, pid=5,
        threads={5: "running", 6: lll_wait(0x1000), 7: lll_wait(0x2000), 8: lll_wait(0x3000),
                 9: lll_wait(0x4000)},
        memory={0x1000: mutex_bytes(owner=7), 0x2000: mutex_bytes(owner=6),
                0x3000: mutex_bytes(owner=66), 0x4000: mutex_bytes(owner=400)},
    )  # fmt: skip
    (tmp_path / "400").mkdir()
    (tmp_path / "400" / "status").write_text("Tgid:\t4\n")
    waits, tids, elsewhere = read_lock_waits(5, proc=str(tmp_path), machine="x86_64")
    assert tids == {5, 6, 7, 8, 9}
    assert elsewhere == {400}
    proof = prove(waits, tids, alive_elsewhere=elsewhere)
    assert proof.cycles == ((6, 7),)
    assert proof.orphans == ((8, 66),)


def test_read_lock_waits_of_a_vanished_process_raises_vanished(tmp_path: Path) -> None:
    with pytest.raises(ProcessVanished):
        read_lock_waits(5, proc=str(tmp_path), machine="x86_64")
