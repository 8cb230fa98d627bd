"""`deadlock-agent run -- gunicorn app:app ...`: start the web server as a child and watch it.

For platforms where a sidecar process cannot see the web process (Heroku: every Procfile line
is its own dyno). The app comes first: it is started before the agent, and nothing the agent
does can stop it. A failure to set the agent up is logged and the app runs unwatched; a bug in
a cycle is caught by the loop; py-spy runs in its own process with a timeout.

Shutdown follows Heroku's: SIGTERM goes to *every* process in the dyno, maybe more than once,
then SIGKILL 30 s later. So on SIGTERM (or SIGINT) the wrapper stops sampling, does not signal
the child again (it has its own SIGTERM; a second one can mean "now" to it), waits for it, and
exits with its status. The exception is a container where the wrapper is PID 1: the runtime
signals PID 1 alone, so the wrapper passes SIGTERM on. Gunicorn's control signals (HUP, USR1,
USR2, TTIN, TTOU) sent to the wrapper are passed on to gunicorn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import FrameType

from agent.config import AgentConfig
from agent.errors import AgentError, ConfigError
from agent.monitor import MonitorThread
from agent.runtime import Agent

log = logging.getLogger(__name__)

#: Signals the wrapper passes on to gunicorn: its own controls (reload, reopen logs, upgrade,
#: more or fewer workers).
FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
STOPPING = (signal.SIGTERM, signal.SIGINT)

EXIT_NOT_FOUND = 127  # as a shell says of a command it cannot find
EXIT_NOT_EXECUTABLE = 126


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: its exit code, or 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode


def child_environ(
    environ: Mapping[str, str], probe_dir: str | None
) -> dict[str, str]:
    """The child's environment: ours, plus the probe's bootstrap when there is a probe dir."""
    if probe_dir is None:
        return dict(environ)
    from agent.probe import probe_environ

    return probe_environ(environ, probe_dir)


class Wrapper:
    """One run: the child, the agent beside it, and the signals between them."""

    def __init__(
        self,
        config: AgentConfig,
        command: Sequence[str],
        *,
        host: str,
        environ: Mapping[str, str],
        is_init: bool | None = None,
    ) -> None:
        if not command:
            raise ConfigError(
                "run: give the command to start after --, e.g. "
                "`deadlock-agent run -- gunicorn app:app`"
            )
        self.config = config
        self.command = list(command)
        self.host = host
        self.environ = environ
        self.is_init = os.getpid() == 1 if is_init is None else is_init
        self.child: subprocess.Popen[bytes] | None = None
        self.agent: Agent | None = None
        self.stopping = threading.Event()
        self._made_dir: str | None = None
        self._monitor: MonitorThread | None = None
        self._stop_signal: int | None = None

    # --- signals ----------------------------------------------------------------------------

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        first = not self.stopping.is_set()
        self.stopping.set()
        self._stop_sampling(signum)
        child = self.child
        if child is not None and self.is_init and child.poll() is None:
            with contextlib.suppress(OSError):
                child.send_signal(signum)  # PID 1 of a container: nobody else tells the child
        if first:
            # Not logged from here: a handler must not take the logging lock. The main loop
            # says it once the child is gone.
            self._stop_signal = signum

    def _on_forward(self, signum: int, _frame: FrameType | None) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            with contextlib.suppress(OSError):
                child.send_signal(signum)

    def _install(self) -> None:
        for signum in STOPPING:
            signal.signal(signum, self._on_stop)
        for signum in FORWARDED:
            signal.signal(signum, self._on_forward)

    def _stop_sampling(self, signum: int) -> None:
        if self.agent is not None:
            self.agent.stop.set()  # cuts a running py-spy short
        if self._monitor is not None:
            self._monitor.events.put(signum)

    # --- the run ----------------------------------------------------------------------------

    def _probe_dir(self) -> str | None:
        if self.config.sampler == "py-spy":
            return None
        if self.config.probe_dir is not None:
            return self.config.probe_dir
        self._made_dir = tempfile.mkdtemp(prefix="deadlock-agent-probe-")  # mode 0700
        return self._made_dir

    def _start_agent(self, config: AgentConfig) -> None:
        """Set up and start the agent; on any failure say so and let the app run unwatched."""
        try:
            agent = Agent.create(config, host=self.host)
            agent.server.start()
            agent.start_pushing()
        except AgentError as err:
            log.error("deadlock-agent is not watching this app: %s", err)
            return
        except Exception:  # the app must run whatever goes wrong here
            log.exception("deadlock-agent is not watching this app: failed to start")
            return
        self.agent = agent
        if self.stopping.is_set():
            return
        monitor = MonitorThread(agent.monitor)
        self._monitor = monitor
        monitor.start()
        log.info(
            "deadlock-agent watching gunicorn pid %s; metrics on %s/metrics",
            config.master_pid, agent.server.url,
        )  # fmt: skip

    def run(self) -> int:
        """Start the child and the agent; return the child's exit status."""
        self._install()
        probe_dir = self._probe_dir()
        try:
            try:
                self.child = subprocess.Popen(
                    self.command, env=child_environ(self.environ, probe_dir)
                )
            except FileNotFoundError:
                log.error("run: command not found: %s", self.command[0])
                return EXIT_NOT_FOUND
            except PermissionError:
                log.error("run: permission denied: %s", self.command[0])
                return EXIT_NOT_EXECUTABLE
            log.info("started %s (pid %s)", shlex.join(self.command), self.child.pid)
            self._start_agent(
                replace(self.config, master_pid=self.child.pid, pidfile=None, probe_dir=probe_dir)
            )
            returncode = self.child.wait()  # signals run their handlers and the wait resumes
        finally:
            if self._stop_signal is not None:
                log.info(
                    "received %s: stopped sampling; waited for the app without signalling it",
                    signal.Signals(self._stop_signal).name,
                )
            if self._monitor is not None:
                self._monitor.stop(timeout=5.0)
            if self.agent is not None:
                try:
                    self.agent.close()
                except Exception:  # the app has exited; its status is what matters now
                    log.exception("closing the agent failed")
            if self._made_dir is not None:
                shutil.rmtree(self._made_dir, ignore_errors=True)
        status = exit_status(returncode)
        log.info("the app exited with status %s", status)
        return status


def run_wrapped(
    config: AgentConfig, command: Sequence[str], *, host: str, environ: Mapping[str, str]
) -> int:
    """`deadlock-agent run`: see the module's docstring."""
    return Wrapper(config, command, host=host, environ=environ).run()
