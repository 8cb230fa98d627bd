"""`deadlock-agent demo`: real gunicorn, a real TLS hang, the agent catching it, on loopback."""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import psutil

from agent.config import DemoConfig
from agent.demo import ptrace
from agent.demo.faults import FaultProxy, HttpsServer
from agent.errors import EXIT_FAILURE, EXIT_OK, AgentError, PtraceDenied
from agent.monitor import Monitor, MonitorThread, log_incident
from agent.render import incident_text
from agent.types import CycleReport, Incident, WorkerState


def say(message: str) -> None:
    """Demo progress goes to stdout, flushed, so it reads well piped into a file too."""
    print(f"[demo] {message}", flush=True)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gunicorn:
    """A real gunicorn master running agent.demo.app (or `app`), started and stopped cleanly."""

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        *,
        worker_class: str = "gthread",
        workers: int = 2,
        threads: int = 4,
        extra_args: Sequence[str] = (),
        app: str = "agent.demo.app:app",
        launcher: Sequence[str] = (),
        python: Sequence[str] = (),
    ) -> None:
        """`launcher` starts gunicorn (`deadlock-agent run ... --`): then it is the master's
        parent, the whole group gets stop()'s SIGTERM (as on Heroku), and `pid` is the master's.
        `python` is the command that runs gunicorn's Python (default: this interpreter); it must
        end in exec'ing it, so that its pid is the master's."""
        self.port = free_port()
        self.launcher = tuple(launcher)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "gunicorn.log"
        argv = [
            *(python or [sys.executable]), "-m", "gunicorn",
            "--worker-class", worker_class,
            "--workers", str(workers),
            "--threads", str(threads),
            "--bind", f"127.0.0.1:{self.port}",
            # gunicorn >= 27 opens a control socket under ~/.gunicorn unless told where.
            "--control-socket", str(workdir / "gunicorn-ctl.sock"),
            "--graceful-timeout", "3",
            "--timeout", "30",
            *extra_args,
            app,
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.launcher, *argv],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=bool(self.launcher),
        )
        self._master: int | None = None if self.launcher else self.proc.pid

    @property
    def pid(self) -> int:
        """The master's pid (under a launcher: its child, once started; else the launcher's)."""
        if self._master is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                kids = psutil.Process(self.proc.pid).children()
                if kids:
                    self._master = kids[0].pid
        return self._master if self._master is not None else self.proc.pid

    def worker_pids(self) -> list[int]:
        """The master's live children."""
        try:
            return sorted(p.pid for p in psutil.Process(self.pid).children())
        except psutil.NoSuchProcess:
            return []

    def wait_ready(self, workers: int, timeout: float = 30.0) -> None:
        """Block until every worker is up and / answers (a readiness handshake, not a sleep)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"gunicorn exited with {code}: {self.log_tail()}")
            if len(self.worker_pids()) >= workers and get(self.url + "/", timeout=2) == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn not ready after {timeout:g}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The end of gunicorn's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL the master and any worker it left behind."""
        workers = []
        for pid in self.worker_pids():
            try:  # not pid_exists() first: a worker can exit between the check and Process()
                workers.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        if self.proc.poll() is None:
            if self.launcher:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)  # every process, as Heroku does
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.launcher:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(5)
        _, alive = psutil.wait_procs(workers, timeout=2)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=2)
        self._log.close()


def get(url: str, timeout: float) -> int:
    """GET a URL; the HTTP status, or 0 when the request failed or timed out."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def fire(url: str, count: int, timeout: float) -> None:
    """Send `count` concurrent requests without waiting (the router gives up; the worker won't)."""
    for _ in range(count):
        threading.Thread(target=get, args=(url, timeout), daemon=True).start()


@contextlib.contextmanager
def demo_world(workdir: Path) -> Iterator[tuple[FaultProxy, FaultProxy, dict[str, str]]]:
    """The fault injector: a PostgreSQL-speaking staller and a stallable HTTPS endpoint."""
    https = HttpsServer(workdir).start()
    harvest = FaultProxy((https.host, https.port), protocol="tcp").start()
    # The demo has no PostgreSQL: this endpoint only ever answers SSLRequest and stalls.
    database = FaultProxy(None, protocol="postgres").start()
    env = {
        "DEMO_DATABASE_URL": (
            f"host=127.0.0.1 port={database.port} dbname=demo user=demo sslmode=require"
        ),
        "DEMO_HARVEST_URL": f"https://127.0.0.1:{harvest.port}/harvest",
        "DEMO_CA_FILE": str(https.ca_file),
        "DEMO_HARVEST_INTERVAL": "1",
    }
    try:
        yield database, harvest, env
    finally:
        database.close()
        harvest.close()
        https.close()


def say_yama(path: str = ptrace.SCOPE_PATH, *, root: bool | None = None) -> None:
    """One line on what Yama's ptrace_scope means for the demo's py-spy; none without Yama."""
    root = os.geteuid() == 0 if root is None else root
    note = ptrace.scope_note(ptrace.read_scope(path), root=root)
    if note is not None:
        say(("error: " if note[0] else "") + note[1])


def run_demo(config: DemoConfig, *, host: str) -> int:
    """Run the demo; exit 0 once the agent has detected the deadlock, 1 if it never did."""
    from agent.runtime import Agent

    say_yama()
    events: queue.SimpleQueue[int] = queue.SimpleQueue()
    detected: queue.SimpleQueue[Incident] = queue.SimpleQueue()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="deadlock-agent-demo-") as tmp, demo_world(
        Path(tmp)
    ) as (database, harvest, env):
        say("starting gunicorn (gthread, 2 workers x 4 threads) with the demo app")
        # The workers let this process's children (the agent's py-spy) ptrace them under Yama.
        gunicorn = Gunicorn(Path(tmp), {**env, "DEMO_PTRACER": str(os.getpid())})
        agent = None
        monitor_thread = None
        try:
            gunicorn.wait_ready(workers=2)
            say(f"gunicorn master pid {gunicorn.pid}, workers {gunicorn.worker_pids()}, "
                f"app on {gunicorn.url}")
            agent_config = replace(config.agent, master_pid=gunicorn.pid, pidfile=None)
            agent = Agent.create(
                agent_config, host=host, listeners=(log_incident, detected.put)
            )
            agent.server.start()
            agent.start_pushing()
            monitor_thread = MonitorThread(agent.monitor)
            monitor_thread.start()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, _frame: events.put(signum))
            say(f"agent watching; metrics on {agent.server.url}/metrics "
                f"(stuck after {agent_config.stuck_after:g}s)")
            if agent_config.slack_webhook_url is None:
                say("no SLACK_WEBHOOK_URL set: the Slack message will be written to the log")
            return _script(config, gunicorn, database, harvest, agent.server.url,
                           agent.monitor, events, detected, started)
        except AgentError as err:
            say(f"cannot start the agent: {err}")
            return EXIT_FAILURE
        finally:
            say("stopping")
            database.heal()
            harvest.heal()
            if monitor_thread is not None:
                monitor_thread.stop()
            if agent is not None:
                agent.close()
            gunicorn.stop()


def _script(
    config: DemoConfig,
    gunicorn: Gunicorn,
    database: FaultProxy,
    harvest: FaultProxy,
    metrics_url: str,
    monitor: Monitor,
    events: queue.SimpleQueue[int],
    detected: queue.SimpleQueue[Incident],
    started: float,
) -> int:
    deadline = math.inf if config.duration is None else started + config.duration
    fault_at = time.monotonic() + config.fault_after
    say(f"healthy traffic for {config.fault_after:g}s ...")
    ok = 0
    while time.monotonic() < fault_at:
        ok += get(gunicorn.url + "/", timeout=2) == 200
        if _denied(monitor.last_report):  # the first cycle dumps every worker: known early
            say(ptrace.DENIED)
            return EXIT_FAILURE
        if _wait_event(events, 0.2):
            return EXIT_FAILURE
    say(f"{ok} healthy requests served; agent sees workers {_states(monitor.last_report)}")
    say("injecting the fault: new PostgreSQL TLS handshakes stall after SSLRequest, and the "
        "HTTPS endpoint the harvest thread posts to stalls too")
    database.stall()
    harvest.stall()
    fire(gunicorn.url + "/db", count=16, timeout=30)

    count = 0
    next_status = time.monotonic() + 3
    while time.monotonic() < deadline:
        count += _print_new(detected)
        if count:
            break
        if _denied(monitor.last_report):
            say(ptrace.DENIED)
            return EXIT_FAILURE
        if time.monotonic() >= next_status:
            say(f"t+{time.monotonic() - fault_at:.0f}s: workers {_states(monitor.last_report)}; "
                f"{database.stalled_connections} database handshakes stalled")
            next_status += 3
        if _wait_event(events, 0.2):
            break
    if not count:
        say("the agent did not detect the deadlock in time")
        return EXIT_FAILURE
    time.sleep(min(1.5, max(0.0, deadline - time.monotonic())))  # the other worker's turn
    count += _print_new(detected)
    say(f"DETECTED {count} deadlocked worker(s), {time.monotonic() - fault_at:.1f}s after the "
        f"fault; workers {_states(monitor.last_report)}")
    say(f"metrics: curl -s {metrics_url}/metrics | grep deadlock_agent_")
    say(f"evidence (every thread, native frames): curl -s {metrics_url}/incidents  "
        f"and {metrics_url}/incidents/<id>.txt")  # fmt: skip
    say("keeping /metrics up " + (
        "; Ctrl-C to stop" if config.duration is None
        else f"until --duration {config.duration:g}s has passed"))
    while time.monotonic() < deadline and not _wait_event(events, 0.5):
        _print_new(detected)
    return EXIT_OK


def _print_new(detected: queue.SimpleQueue[Incident]) -> int:
    """Print newly opened incidents; return how many."""
    count = 0
    while True:
        try:
            incident = detected.get_nowait()
        except queue.Empty:
            return count
        if incident.resolved_at is None:
            count += 1
            print(incident_text(incident), flush=True)


def _denied(report: CycleReport | None) -> bool:
    """Whether py-spy was refused access (the agent has logged the error with its fix)."""
    return report is not None and report.sample_errors.get(PtraceDenied.reason, 0) > 0


def _wait_event(events: queue.SimpleQueue[int], timeout: float) -> bool:
    try:
        events.get(timeout=timeout)
    except queue.Empty:
        return False
    return True


def _states(report: CycleReport | None) -> str:
    if report is None:
        return "(no cycle yet)"
    counts = {state.value: 0 for state in WorkerState}
    for worker in report.workers:
        counts[worker.state.value] += 1
    return ", ".join(f"{k}={v}" for k, v in counts.items())
