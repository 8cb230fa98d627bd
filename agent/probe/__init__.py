"""The in-process probe: what runs inside each gunicorn worker where ptrace is denied.

`bootstrap/sitecustomize.py` (on the app's PYTHONPATH, see probe_environ) starts
`agent.probe.worker` in each direct gunicorn worker; `agent.probe.client.ProbeClient` talks to
it from the agent over a Unix socket `<DIR>/<pid>.sock`. This module is small on purpose: the
names both sides share, and how to put the bootstrap in a child's environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

#: The protocol version: `hello` answers it, the client refuses another.
PROBE_VERSION = 1
#: Directory for the sockets (must exist); unset, the bootstrap does nothing.
ENV_DIR = "DEADLOCK_AGENT_PROBE_DIR"
#: "1": socket and stacks file mode 0660 (an agent in the directory's group may connect).
ENV_GROUP = "DEADLOCK_AGENT_PROBE_GROUP"
#: Seconds of probe silence before faulthandler writes every thread's stack; 0 disables.
ENV_WATCHDOG = "DEADLOCK_AGENT_PROBE_WATCHDOG"
# What probe_environ recorded about the interpreter and the agent package (newrelic-admin
# style): the bootstrap does nothing in another interpreter or beside another `agent` package.
ENV_PREFIX = "DEADLOCK_AGENT_PROBE_PREFIX"
ENV_PYTHON = "DEADLOCK_AGENT_PROBE_PYTHON"
ENV_PACKAGE = "DEADLOCK_AGENT_PROBE_PACKAGE"
#: The probe thread's name in threading's registry (py-spy shows it), and its /proc comm
#: (15 bytes at most) which faulthandler's watchdog thread inherits.
THREAD_NAME = "deadlock-agent-probe"
THREAD_COMM = "deadlock-probe"
DEFAULT_WATCHDOG = 10.0
#: The first line of a stacks file, before faulthandler's text: which ident is which thread.
STACKS_HEADER = "# deadlock-agent-probe "


def bootstrap_dir() -> str:
    """The directory holding the bootstrap sitecustomize.py."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")


def package_dir() -> str:
    """Where this `agent` package lives (what the bootstrap checks `import agent` finds)."""
    return os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def probe_environ(environ: Mapping[str, str], directory: str) -> dict[str, str]:
    """A copy of `environ` that starts the probe in gunicorn workers: the bootstrap first on
    PYTHONPATH, the socket directory, and this interpreter and package for the bootstrap's
    checks."""
    env = dict(environ)
    ours = bootstrap_dir()
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != ours]
    env["PYTHONPATH"] = os.pathsep.join([ours, *rest])
    env[ENV_DIR] = os.path.abspath(directory)
    env[ENV_PREFIX] = sys.prefix
    env[ENV_PYTHON] = f"{sys.version_info[0]}.{sys.version_info[1]}"
    env[ENV_PACKAGE] = package_dir()
    return env


def socket_path(directory: str, pid: int) -> str:
    """The probe socket of a worker."""
    return os.path.join(directory, f"{pid}.sock")


def stacks_path(directory: str, pid: int) -> str:
    """Where faulthandler's watchdog writes a silent worker's stacks."""
    return os.path.join(directory, f"{pid}.stacks")


def short_filename(path: str, exists: Callable[[str], bool] = os.path.exists) -> str:
    """py-spy's short file name: `path` without its directories up to the first one that has no
    __init__.py ("/usr/lib/python3.11/concurrent/futures/thread.py" ->
    "concurrent/futures/thread.py", ".../site-packages/psycopg2/__init__.py" ->
    "psycopg2/__init__.py"; a namespace package's module keeps just its name). The same walk
    as py-spy's PythonSpy::shorten_filename, so signatures match either source."""
    prefix = path
    while True:
        parent = os.path.dirname(prefix)
        if parent == prefix:  # "/" or "": no parent left
            break
        prefix = parent
        if not exists(os.path.join(parent, "__init__.py")):
            break
    if not prefix:
        return path
    return path[len(prefix) :].lstrip("/") or path
