"""deadlock-agent's bootstrap, put first on PYTHONPATH by agent.probe.probe_environ.

In every process of that environment it (1) runs the user's own sitecustomize, if one exists
further on sys.path, as Python would have; (2) when DEADLOCK_AGENT_PROBE_DIR is set, in the
interpreter and beside the `agent` package probe_environ recorded, registers an after-fork hook
and nothing else: no ssl, socket, logging or thread in the master. The hook starts the probe
(agent.probe.worker) in a direct gunicorn worker only: a child forked by the arbiter's
spawn_worker, not a fork of a probed worker (multiprocessing) or gunicorn's daemonize/re-exec.
Nothing here may break the app: every failure is one line on stderr.
"""

# Any Python 3 that inherits this PYTHONPATH imports this file: keep annotations unevaluated.
from __future__ import annotations

import os
import sys
from types import FrameType

_DIR_ENV = "DEADLOCK_AGENT_PROBE_DIR"  # agent.probe.ENV_* (not imported: nothing in the master)
_PREFIX_ENV = "DEADLOCK_AGENT_PROBE_PREFIX"
_PYTHON_ENV = "DEADLOCK_AGENT_PROBE_PYTHON"
_PACKAGE_ENV = "DEADLOCK_AGENT_PROBE_PACKAGE"
_HERE = os.path.dirname(os.path.abspath(__file__))

# The pid whose probe this process inherited, or started: a fork of it gets none.
_probed_pid: int | None = None


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"deadlock-agent probe (pid {os.getpid()}): {message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001, S110 - stderr closed: nothing left to tell
        pass


def _same_dir(entry: str) -> bool:
    try:
        return os.path.realpath(entry or os.getcwd()) == os.path.realpath(_HERE)
    except OSError:
        return False


def _chain_user_sitecustomize() -> None:
    """Load the sitecustomize this file hides, as site.execsitecustomize would."""
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    spec = PathFinder.find_spec("sitecustomize", [p for p in sys.path if not _same_dir(p)])
    if spec is None or spec.loader is None:
        return
    module = module_from_spec(spec)
    ours = sys.modules.get("sitecustomize")
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - what site.py does with a failing sitecustomize
        if ours is not None:
            sys.modules["sitecustomize"] = ours
        if sys.flags.verbose:
            sys.excepthook(*sys.exc_info())
        else:
            sys.stderr.write(
                "Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                f"{err.__class__.__name__}: {err}\n"
            )


def _interpreter_matches() -> bool:
    prefix = os.environ.get(_PREFIX_ENV)
    version = os.environ.get(_PYTHON_ENV)
    if prefix is not None and os.path.realpath(prefix) != os.path.realpath(sys.prefix):
        return False
    return version is None or version == f"{sys.version_info[0]}.{sys.version_info[1]}"


def _agent_location() -> str | None:
    """Where `import agent` leads now (or already led), or None."""
    module = sys.modules.get("agent")
    if module is not None:
        paths: list[str] = list(getattr(module, "__path__", ()))
    else:
        from importlib.util import find_spec

        # All of sys.meta_path, not just sys.path: an editable install is a meta path finder.
        spec = find_spec("agent")
        paths = list(spec.submodule_search_locations or ()) if spec is not None else []
    return os.path.realpath(paths[0]) if paths else None


def _agent_matches() -> bool:
    wanted = os.environ.get(_PACKAGE_ENV)
    found = _agent_location()
    if wanted is None:
        return found is not None
    if found == os.path.realpath(wanted):
        return True
    _say(
        f"not started: `import agent` finds {found or 'nothing'}, not deadlock-agent's "
        f"{wanted} (the app has its own `agent` package, or another environment)"
    )
    return False


def _forked_by_spawn_worker() -> bool:
    """Whether the os.fork() that made this process was called by gunicorn's
    Arbiter.spawn_worker itself (not by code running under it in a worker, which is also
    below spawn_worker on the stack)."""
    frame: FrameType | None = sys._getframe(2)  # 0: this, 1: the hook, 2: fork's caller
    if frame is None:
        return False
    code = frame.f_code
    return code.co_name == "spawn_worker" and code.co_filename.endswith(
        os.path.join("gunicorn", "arbiter.py")
    )


def _after_fork_in_child() -> None:
    global _probed_pid
    try:
        if _probed_pid is not None:
            # A probed worker's own fork: no probe, and let go of the parent's socket and files.
            _probed_pid = None
            probed = sys.modules.get("agent.probe.worker")
            if probed is not None:
                probed.after_fork_in_child()
            return
        if "gunicorn.arbiter" not in sys.modules or not _forked_by_spawn_worker():
            return
        directory = os.environ.get(_DIR_ENV)
        if not directory or not _agent_matches():
            return
        _probed_pid = os.getpid()  # tried here: whatever happens, this worker's forks get none
        from agent.probe import worker

        worker.start(directory, os.environ)
    except Exception as err:  # noqa: BLE001 - the probe must never break the app
        _say(f"not started: {err.__class__.__name__}: {err}")


def _install() -> None:
    if not os.environ.get(_DIR_ENV) or not _interpreter_matches():
        return
    if not _agent_matches():
        return
    # threading registers its own after-fork handler when imported, and handlers run in
    # registration order: imported first, its handler resets the registry before ours names
    # the probe thread there. (gunicorn imports threading in the master anyway.)
    import threading  # noqa: F401

    os.register_at_fork(after_in_child=_after_fork_in_child)


try:
    _chain_user_sitecustomize()
except Exception as err:  # noqa: BLE001 - finding the user's sitecustomize must not break Python
    _say(f"could not look for the user's sitecustomize: {err.__class__.__name__}: {err}")
try:
    _install()
except Exception as err:  # noqa: BLE001
    _say(f"not installed: {err.__class__.__name__}: {err}")
