"""The entry point: `deadlock-agent watch`, `run`, `demo`, `diagnose` and `probe-env`; the only
reader of environ."""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import NoReturn

from agent import __version__
from agent.config import (
    DEMO_SETTINGS,
    WATCH_SETTINGS,
    DemoConfig,
    add_arguments,
    agent_config,
    positive_float,
    positive_int,
    resolve,
)
from agent.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    AgentError,
    ConfigError,
    NotGunicorn,
    ProcessVanished,
    PtraceDenied,
    PySpyMissing,
)

log = logging.getLogger("agent")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag, then exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"deadlock-agent: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(
        prog="deadlock-agent",
        description="Watch Gunicorn workers for threads hung in libpq+OpenSSL and other known "
        "hangs; serve Prometheus metrics.",
    )
    parser.add_argument("--version", action="version", version=f"deadlock-agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    watch = commands.add_parser("watch", help="watch gunicorn masters and serve /metrics")
    add_arguments(watch, WATCH_SETTINGS)
    demo = commands.add_parser(
        "demo", help="run a real gunicorn app, drive it into the libpq/SSL hang, detect it"
    )
    add_arguments(demo, WATCH_SETTINGS)
    add_arguments(demo, DEMO_SETTINGS)
    run = commands.add_parser(
        "run",
        help="start a command (gunicorn) and watch it from this process: "
        "`deadlock-agent run [options] -- gunicorn app:app` (Heroku's web: line)",
    )
    add_arguments(run, WATCH_SETTINGS)
    run.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
        help="the command to start, after --",
    )  # fmt: skip
    probe_env = commands.add_parser(
        "probe-env",
        help="print the environment that loads the in-process probe into gunicorn's workers "
        "(for a gunicorn not started by `run`): eval it before starting gunicorn",
    )
    probe_env.add_argument(
        "--probe-dir", dest="probe_dir", required=True, metavar="DIR",
        help="the directory for the probes' sockets (give the agent the same --probe-dir)",
    )  # fmt: skip
    diagnose = commands.add_parser(
        "diagnose",
        help="look at a gunicorn's workers once, now: threads, verdicts, remedies, lock graph, "
        "versions; exit 0 ok, 4 stuck, 5 deadlocked, 6 spinning",
    )
    diagnose.add_argument(
        "pid", nargs="?", type=_pid, default=None,
        help="a gunicorn master or worker pid (default: find masters by command line)",
    )  # fmt: skip
    diagnose.add_argument("--json", action="store_true", help="print one JSON document")
    diagnose.add_argument(
        "--seconds", type=_seconds, default=None, metavar="S",
        help="watch this long; a thread with no progress in all of it is stuck "
        f"[default {DEFAULT_DIAGNOSE_SECONDS:g}]",
    )  # fmt: skip
    diagnose.add_argument(
        "--py-spy", dest="py_spy", default=None, metavar="VALUE",
        help="the py-spy executable [env DEADLOCK_AGENT_PY_SPY; default py-spy]",
    )  # fmt: skip
    diagnose.add_argument(
        "--native", action=argparse.BooleanOptionalAction, default=True,
        help="dump native frames too (pauses each worker ~50 ms, twice) [default on]",
    )  # fmt: skip
    return parser


DEFAULT_DIAGNOSE_SECONDS = 3.0


def _pid(text: str) -> int:
    try:
        return positive_int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"PID {err}") from None


def _seconds(text: str) -> float:
    try:
        value = positive_float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--seconds {err}") from None
    if value > 60:
        raise argparse.ArgumentTypeError("--seconds must be at most 60 (a one-shot look)")
    return value


def setup_logging(level: str) -> None:
    """Log to stderr, one line per record, with the time: operators grep these."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def install_signal_handlers(events: queue.SimpleQueue[int], stop: threading.Event) -> None:
    """SIGTERM/SIGINT only enqueue (and cut a running py-spy short); the loop exits."""

    def handler(signum: int, _frame: object) -> None:
        stop.set()
        events.put(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def host_name(configured: str | None, environ: Mapping[str, str]) -> str:
    """What notifications call this machine: --host-name, else Heroku's $DYNO, else hostname."""
    return configured or environ.get("DYNO") or socket.gethostname()


def watch(values: Mapping[str, object], environ: Mapping[str, str]) -> int:
    """Run the agent until SIGTERM/SIGINT."""
    from agent.runtime import Agent

    config = agent_config(values)
    setup_logging(config.log_level)
    agent = Agent.create(config, host=host_name(config.host_name, environ))
    events: queue.SimpleQueue[int] = queue.SimpleQueue()
    install_signal_handlers(events, agent.stop)
    agent.server.start()
    agent.start_pushing()
    target = (
        f"master pid {config.master_pid}" if config.master_pid
        else f"pidfile {config.pidfile}" if config.pidfile
        else "gunicorn masters found by command line"
    )
    log.info(
        "deadlock-agent %s watching %s; metrics on %s/metrics (interval %gs, stuck after %gs)",
        __version__, target, agent.server.url, config.interval, config.stuck_after,
    )
    notifier = "Slack" if config.slack_webhook_url else "the log (no SLACK_WEBHOOK_URL)"
    log.info("incidents kept in %s; notifications go to %s", config.incidents_dir, notifier)
    try:
        signum = agent.monitor.run(events)
    finally:
        agent.close()
    log.info("received %s; exiting", signal.Signals(signum).name if signum else "stop")
    return EXIT_OK


def run(values: Mapping[str, object], argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Start the command, watch it, exit with its status (see agent.wrapper)."""
    from agent.wrapper import run_wrapped

    command = list(argv[1:] if argv[:1] == ["--"] else argv)
    config = agent_config(values)
    setup_logging(config.log_level)
    return run_wrapped(
        config, command, host=host_name(config.host_name, environ), environ=environ
    )


def print_probe_env(directory: str, environ: Mapping[str, str]) -> int:
    """`export` lines for the variables the probe needs, for a shell to eval."""
    import shlex
    from pathlib import Path

    from agent.probe import probe_environ

    if not Path(directory).is_dir():
        print(f"deadlock-agent: error: --probe-dir {directory}: no such directory",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    wanted = probe_environ(environ, directory)
    for name in sorted(wanted):
        if environ.get(name) != wanted[name]:
            print(f"export {name}={shlex.quote(wanted[name])}")
    return EXIT_OK


def diagnose(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """One look at a gunicorn's workers; the exit code is the gravest verdict."""
    import json

    from agent.diagnose import diagnose as run_diagnose
    from agent.diagnose import exit_code, to_record, to_text
    from agent.pyspy import PySpy

    logging.basicConfig(level="WARNING", format="deadlock-agent: %(message)s", stream=sys.stderr)
    pyspy = PySpy(args.py_spy or environ.get("DEADLOCK_AGENT_PY_SPY") or "py-spy")
    try:
        pyspy.check()
        found = run_diagnose(
            args.pid, stacks=pyspy, seconds=args.seconds or DEFAULT_DIAGNOSE_SECONDS,
            native=args.native,
        )  # fmt: skip
    except (NotGunicorn, ProcessVanished) as err:
        print(f"deadlock-agent: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (PtraceDenied, PySpyMissing) as err:
        print(f"deadlock-agent: error: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except AgentError as err:
        print(f"deadlock-agent: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(to_record(found), indent=1))
    else:
        print(to_text(found))
    return exit_code(found)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Parse, validate, dispatch; translate the agent's errors into one line and an exit code."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "diagnose":
        return diagnose(args, environ)
    if args.command == "probe-env":
        return print_probe_env(args.probe_dir, environ)
    try:
        values = resolve(WATCH_SETTINGS, args, environ)
        if args.command == "watch":
            return watch(values, environ)
        if args.command == "run":
            return run(values, args.argv, environ)
        from agent.demo.run import run_demo

        demo_values = resolve(DEMO_SETTINGS, args, environ)
        config = DemoConfig(agent=agent_config(values), **demo_values)
        setup_logging(config.agent.log_level)
        return run_demo(config, host=host_name(config.agent.host_name, environ))
    except ConfigError as err:
        print(f"deadlock-agent: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as err:
        print(f"deadlock-agent: error: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
