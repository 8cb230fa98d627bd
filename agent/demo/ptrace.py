"""Yama and the demo: its app names the demo as a ptracer, and the demo says what Yama allows.

Under Yama's ptrace_scope=1 (Ubuntu's default) a non-root process may ptrace only its own
descendants, and the demo's py-spy is a sibling of the gunicorn workers, not their ancestor. A
process can name who else may trace it with prctl(PR_SET_PTRACER, pid): any descendant of that pid
then may (https://www.kernel.org/doc/html/latest/admin-guide/LSM/Yama.html). The demo app does
this in each worker; the agent never does it to a user's app. Scope 2 (admin-only) and 3 (no
attach) ignore PR_SET_PTRACER, and without Yama prctl fails with EINVAL, which means nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PTRACER = 0x59616D61  # "Yama", include/uapi/linux/prctl.h
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value  # (unsigned long)-1: any process of this uid
SCOPE_PATH = "/proc/sys/kernel/yama/ptrace_scope"

#: prctl(option, arg2): returns normally or raises OSError with the errno (injected in tests).
Prctl = Callable[[int, int], None]

DENIED = (
    "py-spy was denied access to the gunicorn workers, so the agent cannot read their stacks "
    "(its error above says why): run the demo as root, or let it trace its own app with "
    "`sudo sysctl kernel.yama.ptrace_scope=1`"
)


def libc_prctl(option: int, arg2: int) -> None:
    """prctl(2) through ctypes; OSError with the errno when it returns -1."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if not hasattr(libc, "prctl"):  # not Linux, so no Yama either
        raise OSError(errno.ENOSYS, "no prctl in this C library")
    zero = ctypes.c_ulong(0)
    # prctl is variadic: pass every argument with its C type, unused ones as 0.
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), zero, zero, zero) == -1:
        code = ctypes.get_errno()
        raise OSError(code, errno.errorcode.get(code, str(code)))


def allow_tracer(tracer: int, *, prctl: Prctl | None = None) -> bool:
    """Let `tracer` (a pid, or PR_SET_PTRACER_ANY) and its descendants ptrace us; if it took."""
    try:
        (prctl or libc_prctl)(PR_SET_PTRACER, tracer)
    except OSError as err:
        # EINVAL: no Yama (or no such tracer pid); ENOSYS: no prctl at all. Nothing to allow.
        if err.errno not in (errno.EINVAL, errno.ENOSYS):
            log.warning("prctl(PR_SET_PTRACER, %s) failed: %s", tracer, err)
        return False
    return True


def parse_tracer(value: str) -> int:
    """DEMO_PTRACER: a pid, or `any` for PR_SET_PTRACER_ANY."""
    value = value.strip().lower()
    if value == "any":
        return PR_SET_PTRACER_ANY
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"DEMO_PTRACER must be a pid or 'any', not {value!r}")
    return int(value)


def read_scope(path: str = SCOPE_PATH) -> int | None:
    """Yama's ptrace_scope; None without Yama (no such file) or when the value is unreadable."""
    try:
        return int(Path(path).read_text(encoding="ascii"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def scope_note(scope: int | None, *, root: bool) -> tuple[bool, str] | None:
    """What the demo says about Yama: (is it an error, the line), or None for nothing to say."""
    if scope is None or scope <= 0:
        return None
    if scope == 1:
        return False, (
            "Yama ptrace_scope=1 lets a process trace only its descendants: the demo app's "
            "workers allow the demo's py-spy with prctl(PR_SET_PTRACER)"
        )
    if scope == 2:
        if root:
            return None  # admin-only attach: root has CAP_SYS_PTRACE
        return True, (
            "Yama ptrace_scope=2 lets only root (CAP_SYS_PTRACE) trace, and PR_SET_PTRACER cannot "
            "help: run the demo as root, or `sudo sysctl kernel.yama.ptrace_scope=1`"
        )
    return True, (
        f"Yama ptrace_scope={scope} forbids ptrace for everyone, root too, until a reboot: set "
        "kernel.yama.ptrace_scope=1 in /etc/sysctl.d and reboot, then run the demo again"
    )
