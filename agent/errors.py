"""The agent's own exceptions: foreign errors are translated at the boundary, with the pid."""

from __future__ import annotations

# Exit codes (gunicorn Arbiter style: named, not sprinkled).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # a bad flag or environment variable
EXIT_UNAVAILABLE = 3  # something the agent needs is missing (py-spy)
# `deadlock-agent diagnose`: the gravest worker verdict (0, EXIT_OK, when every worker is ok).
EXIT_STUCK = 4  # a request thread made no progress for the whole window (maybe a named stall)
EXIT_DEADLOCKED = 5  # a deadlock-class signature matched, or a proven native lock cycle/orphan
EXIT_SPINNING = 6  # a request thread burned CPU with its stack not moving


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    #: The label value counted in deadlock_agent_sample_errors_total{reason}.
    reason = "error"
    #: How a user fixes it, when they can.
    help: str | None = None

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid

    def __str__(self) -> str:
        text = super().__str__()
        if self.pid is not None:
            text = f"pid {self.pid}: {text}"
        if self.help:
            text = f"{text} ({self.help})"
        return text


class ConfigError(AgentError):
    """A setting has a value the agent cannot use."""

    reason = "config"


class ProcessVanished(AgentError):
    """The worker or thread exited while being sampled: normal control flow."""

    reason = "vanished"


class PySpyMissing(AgentError):
    """The py-spy executable was not found."""

    reason = "pyspy_missing"
    help = "install it with `pip install py-spy`, or point --py-spy / DEADLOCK_AGENT_PY_SPY at it"


class PtraceDenied(AgentError):
    """The kernel refused to let py-spy (or /proc) read the worker."""

    reason = "permission"
    help = (
        "run the agent as the app's user or as root; in a container add the CAP_SYS_PTRACE "
        "capability (docker run --cap-add SYS_PTRACE, Kubernetes securityContext.capabilities) "
        "and share the pid namespace; with Yama (ptrace_scope 1 is Ubuntu's default) set "
        "kernel.yama.ptrace_scope=0; Docker's default seccomp profile allows ptrace on kernels "
        ">= 4.8, so what still blocks is another uid without the capability, Yama, or an "
        "AppArmor profile"
    )


class PySpyTimeout(AgentError):
    """py-spy did not finish in time and was killed."""

    reason = "timeout"


class PySpyFailed(AgentError):
    """py-spy exited with an error we have no better name for."""

    reason = "pyspy_failed"


class NativeUnwindFailed(PySpyFailed):
    """py-spy could not unwind native frames (gevent's greenlet stacks do this)."""

    reason = "native_unwind"


class PySpyStopped(PySpyTimeout):
    """py-spy was cut short because the agent is stopping (SIGTERM): not a timeout of its own."""

    reason = "stopped"


class NotPython(PySpyFailed):
    """py-spy found no Python interpreter in the process: a non-Python child of the master
    (a helper the app or a server hook spawned), or a py-spy too old for this Python."""

    reason = "not_python"
    help = (
        "a gunicorn worker runs Python: a non-Python child of the master is not watched; if "
        "every worker says this, py-spy is too old for this Python (0.4.0 or later reads 3.11)"
    )


class PySpyBadOutput(AgentError):
    """py-spy printed something that is not the JSON we expect."""

    reason = "bad_output"


class ProbeMissing(AgentError):
    """No probe answers for a live worker: no socket in the probe directory, or the connection
    was refused (a stale socket file, or a worker started without the bootstrap)."""

    reason = "probe_missing"
    help = (
        "start gunicorn under `deadlock-agent run -- gunicorn ...`, or after "
        "`eval \"$(deadlock-agent probe-env --probe-dir DIR)\"` with the agent's --probe-dir DIR, "
        "so each worker starts the in-process probe; or use --sampler=py-spy where ptrace is "
        "allowed"
    )


class ProbeSilent(AgentError):
    """The probe accepted the connection but did not answer in time: the worker is alive but
    its probe thread cannot run, most likely because another thread holds the GIL (a C
    extension spinning, a pathological regular expression)."""

    reason = "probe_silent"


class ProbeBadReply(AgentError):
    """The probe answered something that is not the JSON the protocol promises."""

    reason = "bad_output"


class ProcReadError(AgentError):
    """A /proc file could not be read or parsed."""

    reason = "proc"


class NotGunicorn(AgentError):
    """The pid given to `diagnose` is no gunicorn master or worker (or none was found)."""

    reason = "not_gunicorn"


class SignatureError(AgentError):
    """A signature or idle-rule table is malformed."""

    reason = "signatures"


#: Every reason label, so sample_errors_total has 0-valued series from the start.
ERROR_REASONS: tuple[str, ...] = tuple(
    sorted(
        {
            cls.reason
            for cls in (
                ProcessVanished,
                PtraceDenied,
                PySpyMissing,
                PySpyTimeout,
                PySpyStopped,
                PySpyFailed,
                NotPython,
                NativeUnwindFailed,
                PySpyBadOutput,
                ProcReadError,
                ProbeMissing,
                ProbeSilent,
                ProbeBadReply,
            )
        }
    )
)
