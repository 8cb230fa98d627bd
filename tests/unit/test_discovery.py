"""agent/discovery.py, pure parts: which command lines run gunicorn, which processes of a tree are
masters, and reading gunicorn's pidfile. (The real gunicorn is in
tests/integration/test_discovery_real.py.)"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from agent.discovery import ProcInfo, find_masters, is_gunicorn_cmdline, read_pidfile
from agent.errors import ConfigError

GUNICORN_CMDLINES = {
    "gunicorn app:app": "gunicorn app:app",
    "venv-script": "/venv/bin/gunicorn --workers 2 app:app",
    "python venv-script": "/venv/bin/python /venv/bin/gunicorn --bind :8000 app:app",
    "python -m gunicorn": "python -m gunicorn app:app",
    "python3.11 -u -m gunicorn": "/usr/bin/python3.11 -u -m gunicorn app:app",
    "gunicorn3": "/usr/bin/gunicorn3 app:app",
    "newrelic-admin script": "newrelic-admin run-program gunicorn app:app",
    "newrelic-admin via python": "/venv/bin/python /venv/bin/newrelic-admin run-program "
    "gunicorn app:app",
    "sudo wrapper": "sudo -u web gunicorn app:app",
    "timeout wrapper": "timeout 600 python -m gunicorn app:app",
}

# setproctitle rewrites argv in place; psutil returns it whole or split at spaces.
PROCTITLES = {
    "setproctitle master": ("gunicorn: master [app]",),
    "setproctitle master, split": ("gunicorn:", "master", "[app]"),
    "setproctitle worker": ("gunicorn: worker [app:app]",),
}

NOT_GUNICORN = {
    "django runserver": "python manage.py runserver",
    "vim gunicorn.conf.py": "vim gunicorn.conf.py",
    "python gunicorn.conf.py": "python gunicorn.conf.py",
    "uwsgi": "uwsgi --http :8000 --module app",
    "celery": "celery -A proj worker",
    "python -m gunicorn_helper": "python -m gunicorn_helper",
    "python -m pip install gunicorn": "python -m pip install gunicorn",
    "gunicorn as a late app argument": "python app.py --serve --workers 2 --like gunicorn",
    "bash": "/bin/bash",
}


@pytest.mark.parametrize(
    "cmdline",
    [*(tuple(shlex.split(c)) for c in GUNICORN_CMDLINES.values()), *PROCTITLES.values()],
    ids=[*GUNICORN_CMDLINES, *PROCTITLES],
)
def test_gunicorn_cmdlines(cmdline: tuple[str, ...]) -> None:
    assert is_gunicorn_cmdline(cmdline)


@pytest.mark.parametrize(
    "cmdline",
    [*(tuple(shlex.split(c)) for c in NOT_GUNICORN.values()), ()],
    ids=[*NOT_GUNICORN, "empty (kernel thread or zombie)"],
)
def test_not_gunicorn_cmdlines(cmdline: tuple[str, ...]) -> None:
    assert not is_gunicorn_cmdline(cmdline)


# --- find_masters on hand-built process trees --------------------------------------------------


def proc(pid: int, *, ppid: int, cmd: str = "gunicorn app:app", created: float = 0.0) -> ProcInfo:
    """One process; `cmd` is split like a shell would."""
    return ProcInfo(pid=pid, ppid=ppid, create_time=created or 1700000000.0 + pid,
                    cmdline=tuple(shlex.split(cmd)))  # fmt: skip


def gunicorn_tree(master: int, *, ppid: int = 1, workers: int = 2,
                  cmd: str = "gunicorn app:app") -> list[ProcInfo]:  # fmt: skip
    """A master and its forked workers (workers inherit the master's command line)."""
    return [proc(master, ppid=ppid, cmd=cmd),
            *(proc(master + i, ppid=master, cmd=cmd) for i in range(1, workers + 1))]  # fmt: skip


NOISE = [
    proc(1, ppid=0, cmd="/sbin/init"),
    proc(50, ppid=1, cmd="/bin/bash"),
    proc(51, ppid=50, cmd="vim gunicorn.conf.py"),
    proc(52, ppid=50, cmd="journalctl -fu gunicorn"),
    proc(53, ppid=1, cmd="python manage.py runserver"),
    proc(54, ppid=53, cmd="python manage.py runserver"),
]

TREES = {
    "plain master and workers": (gunicorn_tree(100), [100]),
    "python -m gunicorn": (gunicorn_tree(100, cmd="python -m gunicorn app:app"), [100]),
    "setproctitle titles": (
        [proc(100, ppid=1, cmd="'gunicorn: master [app]'"),
         proc(101, ppid=100, cmd="'gunicorn: worker [app]'"),
         proc(102, ppid=100, cmd="'gunicorn: worker [app]'")],
        [100],
    ),
    "one worker": (gunicorn_tree(100, workers=1), [100]),
    "wrapper that did not exec (sudo)": (
        [proc(90, ppid=1, cmd="sudo -u web gunicorn app:app"), *gunicorn_tree(100, ppid=90)],
        [100],
    ),
    "wrapper that did not exec (timeout python -m)": (
        [proc(90, ppid=1, cmd="timeout 600 python -m gunicorn app:app"),
         *gunicorn_tree(100, ppid=90, cmd="python -m gunicorn app:app")],
        [100],
    ),
    "two masters": (gunicorn_tree(100) + gunicorn_tree(200, workers=3), [100, 200]),
    "master without workers yet": ([proc(100, ppid=1)], []),
    "master with a non-gunicorn child": (
        [*gunicorn_tree(100), proc(110, ppid=100, cmd="/bin/sh -c 'echo hook'")],
        [100],
    ),
    "noise only": ([], []),
    # A worker that forked a helper (multiprocessing's default "fork" start method): the child
    # inherits the worker's command line, but the master is still the master.
    "worker with a forked child": (
        [*gunicorn_tree(100), proc(150, ppid=101)],
        [100],
    ),
}


@pytest.mark.parametrize(("tree", "masters"), TREES.values(), ids=TREES.keys())
def test_find_masters(tree: list[ProcInfo], masters: list[int]) -> None:
    assert find_masters([*NOISE, *tree]) == masters


def test_find_masters_ignores_input_order() -> None:
    tree = [*NOISE, *gunicorn_tree(300), *gunicorn_tree(100)]
    assert find_masters(reversed(tree)) == [100, 300]


# --- read_pidfile ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "pid"),
    [("12345\n", 12345), ("  77 \n", 77), ("9", 9)],
    ids=["gunicorn-style", "padded", "no-newline"],
)
def test_read_pidfile(tmp_path: Path, content: str, pid: int) -> None:
    path = tmp_path / "gunicorn.pid"
    path.write_text(content)
    assert read_pidfile(str(path)) == pid


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, ("cannot read pidfile",)),
     ("", ("does not hold a pid",)),
     ("gunicorn\n", ("does not hold a pid",)),
     ("12.5\n", ("does not hold a pid",)),
     ("0\n", ("invalid pid 0",)),
     ("-12\n", ("invalid pid -12",)),
     ("\xe9\n", ("does not hold a pid",))],
    ids=["missing", "empty", "text", "float", "zero", "negative", "not-ascii"],
)  # fmt: skip
def test_read_pidfile_errors(tmp_path: Path, content: str | None, words: tuple[str, ...]) -> None:
    path = tmp_path / "gunicorn.pid"
    if content is not None:
        path.write_text(content, encoding="latin-1")
    with pytest.raises(ConfigError) as caught:
        read_pidfile(str(path))
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_read_pidfile_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read pidfile"):
        read_pidfile(str(tmp_path))
