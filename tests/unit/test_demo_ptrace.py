"""The demo's Yama handling: the prctl its app makes, and what the demo says about ptrace_scope.

This machine may have no Yama at all, so the kernel is replaced by an injected prctl and a scope
file in tmp_path; tests/integration/test_demo_ptracer.py runs the app in real gunicorn workers.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from agent.demo import ptrace
from agent.demo.ptrace import PR_SET_PTRACER, PR_SET_PTRACER_ANY


class FakePrctl:
    """Records each call; raises OSError(fail) when given an errno."""

    def __init__(self, fail: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.fail = fail

    def __call__(self, option: int, arg2: int) -> None:
        self.calls.append((option, arg2))
        if self.fail is not None:
            raise OSError(self.fail, errno.errorcode[self.fail])


def test_the_constants_are_the_kernels() -> None:
    assert PR_SET_PTRACER == 0x59616D61  # include/uapi/linux/prctl.h: "Yama"
    assert PR_SET_PTRACER_ANY == 2**64 - 1  # ((unsigned long)-1) on 64-bit Linux


@pytest.mark.parametrize("tracer", [4321, PR_SET_PTRACER_ANY], ids=["pid", "any"])
def test_allow_tracer_passes_exactly_the_option_and_the_tracer(tracer: int) -> None:
    prctl = FakePrctl()
    assert ptrace.allow_tracer(tracer, prctl=prctl) is True
    assert prctl.calls == [(PR_SET_PTRACER, tracer)]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS], ids=["no-yama", "no-prctl"])
def test_no_yama_is_false_and_silent(code: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    prctl = FakePrctl(fail=code)
    assert ptrace.allow_tracer(4321, prctl=prctl) is False
    assert prctl.calls == [(PR_SET_PTRACER, 4321)]
    assert caplog.records == []


def test_another_failure_is_false_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert ptrace.allow_tracer(4321, prctl=FakePrctl(fail=errno.EPERM)) is False
    assert "PR_SET_PTRACER" in caplog.text


def test_the_real_prctl_answers_for_this_kernel() -> None:
    """Against the real kernel: in effect with Yama, EINVAL (False) without it. The tracer named
    is this process itself, whose descendants Yama lets trace it anyway: nothing is loosened."""
    has_yama = Path("/proc/sys/kernel/yama").exists()
    assert ptrace.allow_tracer(os.getpid()) is has_yama


@pytest.mark.parametrize(
    ("value", "tracer"),
    [("any", PR_SET_PTRACER_ANY), (" ANY ", PR_SET_PTRACER_ANY), ("1234", 1234)],
    ids=["any", "any-spaced", "pid"],
)
def test_parse_tracer(value: str, tracer: int) -> None:
    assert ptrace.parse_tracer(value) == tracer


@pytest.mark.parametrize(
    "value", ["0", "-1", "none", "12x", ""], ids=["zero", "negative", "word", "x", "empty"]
)
def test_parse_tracer_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="DEMO_PTRACER"):
        ptrace.parse_tracer(value)


@pytest.mark.parametrize(
    ("content", "scope"),
    [(None, None), ("0\n", 0), ("1\n", 1), ("2\n", 2), ("3\n", 3), ("", None), ("one\n", None),
     (b"\xff\n", None)],
    ids=["absent", "0", "1", "2", "3", "empty", "garbage", "not-ascii"],
)  # fmt: skip
def test_read_scope(tmp_path: Path, content: str | bytes | None, scope: int | None) -> None:
    path = tmp_path / "ptrace_scope"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    assert ptrace.read_scope(str(path)) == scope


@pytest.mark.parametrize(
    ("scope", "root", "error", "words"),
    [
        (1, False, False, ["ptrace_scope=1", "PR_SET_PTRACER"]),
        (1, True, False, ["ptrace_scope=1", "PR_SET_PTRACER"]),
        (2, False, True, ["ptrace_scope=2", "as root", "sudo sysctl kernel.yama.ptrace_scope=1"]),
        (3, False, True, ["ptrace_scope=3", "reboot", "kernel.yama.ptrace_scope=1"]),
        (3, True, True, ["ptrace_scope=3", "root too"]),
    ],
    ids=["1", "1-root", "2", "3", "3-root"],
)
def test_scope_note(scope: int, root: bool, error: bool, words: list[str]) -> None:
    note = ptrace.scope_note(scope, root=root)
    assert note is not None
    assert note[0] is error
    assert "\n" not in note[1]
    for word in words:
        assert word in note[1]


@pytest.mark.parametrize(
    ("scope", "root"), [(None, False), (0, False), (2, True)], ids=["no-yama", "0", "2-root"]
)
def test_scope_note_says_nothing_when_yama_does_not_stand_in_the_way(
    scope: int | None, root: bool
) -> None:
    assert ptrace.scope_note(scope, root=root) is None


def test_denied_line_names_ptrace_scope() -> None:
    assert "\n" not in ptrace.DENIED
    assert "kernel.yama.ptrace_scope" in ptrace.DENIED and "root" in ptrace.DENIED


@pytest.mark.parametrize(
    ("content", "root", "said"),
    [(None, False, ""),
     ("1\n", False, "[demo] Yama ptrace_scope=1 lets a process trace only its descendants"),
     ("2\n", False, "[demo] error: Yama ptrace_scope=2 lets only root"),
     ("2\n", True, ""),
     ("3\n", True, "[demo] error: Yama ptrace_scope=3 forbids ptrace for everyone"),
     ("garbage\n", False, "")],
    ids=["no-yama", "1", "2", "2-root", "3", "garbage"],
)  # fmt: skip
def test_the_demo_says_one_line_about_yama(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, root: bool, said: str
) -> None:
    from agent.demo.run import say_yama

    path = tmp_path / "ptrace_scope"
    if content is not None:
        path.write_text(content)
    say_yama(str(path), root=root)
    out = capsys.readouterr().out
    if said:
        assert out.startswith(said) and out.count("\n") == 1, out
    else:
        assert out == ""
