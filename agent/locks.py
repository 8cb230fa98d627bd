"""Native lock proof: which threads wait on which glibc mutex, held by whom; cycles and orphans.

Pure: procfs reads the syscall lines and the mutexes, this module judges them. The wait-for
graph has one edge per thread blocked in glibc's `__lll_lock_wait` (thread -> the mutex's
`__owner`), so each thread has at most one way out and a cycle is a proven deadlock. So is a
mutex whose owner is not a thread of the process any more (it exited holding it, or the mutex
was inherited across fork). Futexes that are not a `pthread_mutex_t` give no edge: condition
variables, semaphores and Python's locks (semaphores, no owner) wait with FUTEX_WAIT_BITSET;
glibc-internal locks (malloc's arenas, stdio's FILE locks) are bare ints that share the mutex's
wait call, so what follows them in memory must look like a held mutex or they are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# futex(2) syscall number by machine. Only the 64-bit layouts are known here (below): others
# never give a candidate.
FUTEX_SYSCALL = {"x86_64": 202, "aarch64": 98}
FUTEX_WAIT = 0
FUTEX_PRIVATE_FLAG = 0x80
# glibc's __lll_lock_wait: futex(&lock, FUTEX_WAIT[_PRIVATE], 2, NULL): "wait while the lock
# word is 2 (locked, with waiters)", no deadline.
# https://sourceware.org/git/?p=glibc.git;a=blob;f=nptl/lowlevellock.c;hb=glibc-2.36
LLL_LOCK_WAIT_VALUE = 2
# glibc's struct __pthread_mutex_s on LP64 (x86_64 and the generic layout aarch64 uses):
# int __lock @0, unsigned __count @4, int __owner @8, unsigned __nusers @12, int __kind @16.
MUTEX_SIZE = 20
MUTEX_NORMAL, MUTEX_RECURSIVE, MUTEX_ERRORCHECK, MUTEX_ADAPTIVE = 0, 1, 2, 3
# Linux's PID_MAX_LIMIT on 64-bit: no tid is larger (the low half of a pointer usually is).
PID_MAX_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True)
class MutexWait:
    """A thread blocked on a glibc pthread_mutex_t, with the mutex's fields as read from memory."""

    tid: int
    futex: int  # the mutex's address (its __lock word is its first field)
    lock_word: int  # __lock: 0 free, 1 locked, 2 locked with waiters
    owner: int  # __owner: the tid that holds it
    kind: int  # __kind: the mutex type, plus flag bits (robust, PI, pshared, elision)
    count: int = 0  # __count: the recursion depth of a recursive mutex, else 0
    nusers: int = 1  # __nusers: lock holders, at least 1 while it is held


@dataclass(frozen=True)
class LockProof:
    """What the wait-for graph proves: deadlock cycles and orphaned mutexes, and its edges."""

    cycles: tuple[tuple[int, ...], ...]  # tids in wait order, each starting at its lowest tid
    orphans: tuple[tuple[int, int], ...]  # (waiter tid, the owner tid that is gone)
    edges: tuple[tuple[int, int, int], ...]  # (waiter tid, mutex address, owner tid)

    @property
    def proven(self) -> bool:
        """Whether anything is proven deadlocked."""
        return bool(self.cycles or self.orphans)


def mutex_futex(syscall: str, machine: str) -> int | None:
    """The futex address when a /proc/.../syscall line is glibc's untimed mutex wait, else None."""
    fields = syscall.split()
    if len(fields) < 5 or fields[0] != str(FUTEX_SYSCALL.get(machine)):
        return None
    try:
        address, op, value, timeout = (int(field, 16) for field in fields[1:5])
    except ValueError:
        return None
    # Not FUTEX_WAIT_BITSET (0x89, 0x189): sem_clockwait (Python's locks) and condition
    # variables use that, and neither has an owner.
    if op not in (FUTEX_WAIT, FUTEX_WAIT | FUTEX_PRIVATE_FLAG):
        return None
    if value != LLL_LOCK_WAIT_VALUE or timeout != 0 or address == 0:
        return None
    return address


def trusted(wait: MutexWait) -> bool:
    """Whether the memory at the futex reads as a held, process-private pthread_mutex_t.

    Rejected: a free lock word, flag bits in __kind (robust, PI, PP, pshared, elision: their
    owner field means something else or lives elsewhere), an owner that cannot be a tid, a
    __count or __nusers a held mutex of that kind never has, and a waiter that owns a mutex
    that would not block it (a recursive one) or would have refused (an error-checking one)."""
    if wait.lock_word not in (1, 2) or wait.kind not in range(4):
        return False
    if not 0 < wait.owner <= PID_MAX_LIMIT or wait.nusers < 1:
        return False
    if (wait.count >= 1) != (wait.kind == MUTEX_RECURSIVE):
        return False
    return wait.owner != wait.tid or wait.kind in (MUTEX_NORMAL, MUTEX_ADAPTIVE)


def prove(
    waits: Iterable[MutexWait],
    live_tids: frozenset[int],
    *,
    alive_elsewhere: frozenset[int] = frozenset(),
) -> LockProof:
    """Build the wait-for graph (waiter -> owner) of one process; find its cycles and orphans.

    `live_tids` are the process's threads. An owner outside them is gone (an orphan) unless it
    is in `alive_elsewhere` (a live thread of an unrelated process, so a mutex we cannot
    vouch for): that wait gives no edge. Untrusted reads give no edge either."""
    owner_of: dict[int, int] = {}
    edges: list[tuple[int, int, int]] = []
    orphans: list[tuple[int, int]] = []
    for wait in waits:
        if wait.tid not in live_tids or wait.tid in owner_of or not trusted(wait):
            continue
        if wait.owner not in live_tids:
            if wait.owner in alive_elsewhere:
                continue
            orphans.append((wait.tid, wait.owner))
        owner_of[wait.tid] = wait.owner
        edges.append((wait.tid, wait.futex, wait.owner))
    return LockProof(
        cycles=_cycles(owner_of), orphans=tuple(sorted(orphans)), edges=tuple(sorted(edges))
    )


def _cycles(owner_of: dict[int, int]) -> tuple[tuple[int, ...], ...]:
    """The cycles of a graph with at most one edge out of each node."""
    found: list[tuple[int, ...]] = []
    done: set[int] = set()
    for start in sorted(owner_of):
        path: list[int] = []
        at: int | None = start
        while at is not None and at not in done and at not in path:
            path.append(at)
            at = owner_of.get(at)
        if at is not None and at in path:  # the walk came back onto itself: a cycle
            cycle = path[path.index(at) :]
            lowest = cycle.index(min(cycle))
            found.append(tuple(cycle[lowest:] + cycle[:lowest]))
        done.update(path)
    return tuple(sorted(found))
