"""agent/probe: py-spy's short file names, probe_environ, and the bootstrap sitecustomize in real
child Pythons: it chains the user's sitecustomize, imports nothing heavy, and starts a probe
only in a process forked by (a stand-in for) gunicorn's Arbiter.spawn_worker, in the recorded
interpreter, beside the recorded `agent` package."""

from __future__ import annotations

import concurrent.futures.thread
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import agent.probe.worker
from agent.probe import (
    ENV_DIR,
    ENV_PACKAGE,
    ENV_PREFIX,
    ENV_PYTHON,
    bootstrap_dir,
    package_dir,
    probe_environ,
    short_filename,
)

ROOT = Path(__file__).resolve().parents[2]


# --- short file names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module_file", "short"),
    [
        (concurrent.futures.thread.__file__, "concurrent/futures/thread.py"),
        (re.__file__, "re/__init__.py"),
        (threading.__file__, "threading.py"),
        (agent.probe.worker.__file__, "agent/probe/worker.py"),
        (str(ROOT / "agent" / "demo" / "app.py"), "app.py"),  # agent/demo has no __init__.py
        ("<string>", "<string>"),
        ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap>"),
    ],
    ids=[
        "stdlib-package",
        "package-init",
        "stdlib-module",
        "agent",
        "namespace-dir",
        "string",
        "frozen",
    ],
)
def test_short_filename_is_py_spys(module_file: str, short: str) -> None:
    assert short_filename(module_file) == short


def test_short_filename_walks_up_while_there_is_an_init(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    for init in ("pkg/__init__.py", "pkg/sub/__init__.py"):
        (tmp_path / init).touch()
    assert short_filename(str(tmp_path / "pkg" / "sub" / "mod.py")) == "pkg/sub/mod.py"
    assert short_filename(str(tmp_path / "loose.py")) == "loose.py"
    seen: list[str] = []
    assert short_filename("/a/b/c.py", lambda p: seen.append(p) or p == "/a/b/__init__.py") == (
        "b/c.py"
    )
    assert seen == ["/a/b/__init__.py", "/a/__init__.py"]


# --- probe_environ ----------------------------------------------------------------------------


def test_probe_environ_prepends_the_bootstrap_once(tmp_path: Path) -> None:
    given = {"PYTHONPATH": f"/app{os.pathsep}{bootstrap_dir()}", "OTHER": "1"}
    env = probe_environ(given, str(tmp_path))
    assert env["PYTHONPATH"] == os.pathsep.join([bootstrap_dir(), "/app"])
    assert given["PYTHONPATH"].startswith("/app")  # a copy
    assert env["OTHER"] == "1"
    assert env[ENV_DIR] == str(tmp_path)
    assert env[ENV_PREFIX] == sys.prefix
    assert env[ENV_PYTHON] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert env[ENV_PACKAGE] == str(ROOT / "agent")
    assert Path(bootstrap_dir(), "sitecustomize.py").is_file()
    assert probe_environ({}, "rel")["PYTHONPATH"] == bootstrap_dir()
    assert package_dir() == str(ROOT / "agent")


# --- the bootstrap in real child Pythons ---------------------------------------------------------

FAKE_ARBITER = """
import os, sys

def spawn_worker(body):
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            sys.stdout.flush()
            os._exit(0)
    os.waitpid(pid, 0)
"""

# Forks a "worker" through spawn_worker, which reports whether it got a probe socket and forks
# a grandchild that reports the same; then a plain fork of the master reports too.
DRIVER = """
import json, os, sys
import gunicorn.arbiter

directory = os.environ["DEADLOCK_AGENT_PROBE_DIR"]

def report(who):
    print(json.dumps({"who": who, "socket": os.path.exists(f"{directory}/{os.getpid()}.sock")}),
          flush=True)

if len(sys.argv) > 1:
    sys.path.insert(0, sys.argv[1])  # the app's directory, as gunicorn's master puts it there

def body():
    report("worker")
    pid = os.fork()
    if pid == 0:
        report("grandchild")
        os._exit(0)
    os.waitpid(pid, 0)

gunicorn.arbiter.spawn_worker(body)
pid = os.fork()
if pid == 0:
    report("plain-fork")
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"who": "master", "threads": len(os.listdir("/proc/self/task")),
                  "heavy": sorted(m for m in ("ssl", "socket", "_socket", "logging", "json",
                                              "agent", "faulthandler") if m in sys.modules
                                  and m != "json")}), flush=True)
"""


def run_driver(
    tmp_path: Path, *, extra: dict[str, str] | None = None, user_site: str | None = None,
    app_dir: str | None = None, sockets: Path | None = None,
) -> tuple[dict[str, dict[str, object]], str]:  # fmt: skip
    """Run DRIVER under the probe environment, its probe sockets in `sockets` (default
    tmp_path/sockets); ({who: report}, stderr)."""
    fake = tmp_path / "fake"
    (fake / "gunicorn").mkdir(parents=True, exist_ok=True)
    (fake / "gunicorn" / "__init__.py").write_text("")
    (fake / "gunicorn" / "arbiter.py").write_text(FAKE_ARBITER)
    paths = [str(fake)]
    if user_site is not None:
        user = tmp_path / "user"
        user.mkdir(exist_ok=True)
        (user / "sitecustomize.py").write_text(user_site)
        paths.append(str(user))
    paths.append(str(ROOT))
    sockets = sockets or tmp_path / "sockets"
    sockets.mkdir(exist_ok=True)
    env = probe_environ({**os.environ, "PYTHONPATH": os.pathsep.join(paths)}, str(sockets))
    env.update(extra or {})
    argv = [sys.executable, "-c", DRIVER, *([app_dir] if app_dir else [])]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=True)
    reports = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            reports[record.pop("who")] = record
    return reports, out.stderr


def test_probe_only_in_the_spawned_worker_and_nothing_heavy_in_the_master(
    tmp_path: Path, short_tmp_path: Path
) -> None:
    reports, stderr = run_driver(tmp_path, sockets=short_tmp_path)
    assert reports["worker"] == {"socket": True}, stderr
    assert reports["grandchild"] == {"socket": False}  # a worker's own fork: no probe
    assert reports["plain-fork"] == {"socket": False}  # not spawn_worker (daemonize, re-exec)
    assert reports["master"] == {"threads": 1, "heavy": []}
    assert stderr == ""
    # One socket, the worker's (left behind: os._exit skips atexit; the live test exits cleanly).
    assert len(list(short_tmp_path.glob("*.sock"))) == 1


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({ENV_PREFIX: "/no/such/prefix"}, False),
        ({ENV_PYTHON: "2.7"}, False),
        ({ENV_PACKAGE: "/elsewhere/agent"}, True),
        ({ENV_DIR: ""}, False),
    ],
    ids=["other-prefix", "other-version", "other-agent-package", "no-directory"],
)
def test_mismatch_starts_nothing(tmp_path: Path, extra: dict[str, str], says: bool) -> None:
    reports, stderr = run_driver(tmp_path, extra=extra)
    assert reports["worker"] == {"socket": False}
    assert reports["master"]["threads"] == 1
    if says:
        (line,) = stderr.splitlines()
        assert "not started: `import agent` finds" in line
    else:
        assert stderr == ""


def test_an_apps_own_agent_package_wins_over_ours_and_no_probe_starts(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "agent").mkdir(parents=True)
    (app / "agent" / "__init__.py").write_text("raise RuntimeError('the app agent imported')\n")
    reports, stderr = run_driver(tmp_path, app_dir=str(app))
    assert reports["worker"] == {"socket": False}
    assert f"`import agent` finds {app / 'agent'}" in stderr
    assert "the app agent imported" not in stderr


def test_user_sitecustomize_runs_too(tmp_path: Path, short_tmp_path: Path) -> None:
    user = 'import sys\nprint(\'{"who": "user-sitecustomize"}\', flush=True)\n'
    reports, stderr = run_driver(tmp_path, user_site=user, sockets=short_tmp_path)
    assert "user-sitecustomize" in reports
    assert reports["worker"] == {"socket": True}, stderr


def test_failing_user_sitecustomize_is_reported_as_python_would(
    tmp_path: Path, short_tmp_path: Path
) -> None:
    failing = "raise ValueError('broken user sitecustomize')\n"
    reports, stderr = run_driver(tmp_path, user_site=failing, sockets=short_tmp_path)
    assert stderr == (
        "Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
        "ValueError: broken user sitecustomize\n"
    )
    # ...exactly what Python prints without us:
    plain = subprocess.run(
        [sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=30, check=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "user")},
    )  # fmt: skip
    assert plain.stderr == stderr
    assert reports["worker"] == {"socket": True}


def test_bootstrap_failure_in_the_hook_is_one_line(tmp_path: Path, short_tmp_path: Path) -> None:
    # A probe directory that does not exist: the worker cannot listen; the app goes on.
    reports, stderr = run_driver(tmp_path, extra={ENV_DIR: str(short_tmp_path / "missing")})
    assert reports["worker"] == {"socket": False}
    assert "grandchild" in reports
    assert len(stderr.splitlines()) == 1, stderr
    line = stderr.strip()
    assert re.fullmatch(r"deadlock-agent probe \(pid \d+\): not started: FileNotFoundError: .*",
                        line), line  # fmt: skip


def test_bootstrap_source_stays_importable_by_old_pythons() -> None:
    source = Path(bootstrap_dir(), "sitecustomize.py").read_text()
    assert source.count("from __future__ import annotations") == 1
    assert "import ssl" not in source and "import socket" not in source
    assert "import logging" not in source
    compile(textwrap.dedent(source), "sitecustomize.py", "exec")
