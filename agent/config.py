"""One validated settings object. Each setting: flag, env var, type, default, validator, help.

Only the entry point (agent.cli) reads the environment; it hands `environ` in.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agent.analysis import AnalysisSettings
from agent.errors import ConfigError
from agent.incidents import DEFAULT_DIR, DEFAULT_MAX_BYTES, DEFAULT_MAX_COUNT
from agent.push import gateway_url
from agent.remediation import Mode, RemediationSettings
from agent.server import DEFAULT_LISTEN, parse_listen_address

ENV_PREFIX = "DEADLOCK_AGENT_"


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("must be a number greater than 0") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a number greater than 0")
    return value


def positive_int(text: str) -> int:
    """A whole number > 0."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError("must be a whole number greater than 0") from None
    if value <= 0:
        raise ValueError("must be a whole number greater than 0")
    return value


def boolean(text: str | bool) -> bool:
    """true/false, 1/0, yes/no, on/off."""
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def listen_address(text: str) -> str:
    """HOST:PORT."""
    try:
        parse_listen_address(text)
    except ConfigError as err:
        raise ValueError(str(err)) from err
    return text


def log_level(text: str) -> str:
    """A logging level name."""
    upper = text.strip().upper()
    if upper not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be one of debug, info, warning, error")
    return upper


def http_url(text: str) -> str:
    """An http(s) URL with a host."""
    from urllib.parse import urlsplit

    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return text.strip()


def one_of(*choices: str) -> Callable[[str], str]:
    """A parser for one of `choices`, case-insensitively."""
    allowed = ", ".join(choices[:-1]) + f" or {choices[-1]}"

    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in choices:
            raise ValueError(f"must be {allowed}")
        return lowered

    parse.__doc__ = allowed
    return parse


sampler_mode = one_of("auto", "py-spy", "probe")
remediate_mode = one_of(*(m.value for m in Mode))


def non_empty(text: str) -> str:
    """Any non-empty text."""
    if not text.strip():
        raise ValueError("must not be empty")
    return text


@dataclass(frozen=True)
class Setting:
    """One knob, readable from a flag or an environment variable (the flag wins)."""

    name: str
    flag: str | None  # None: environment only (secrets do not belong on a command line)
    parse: Callable[[Any], Any]
    default: Any
    help: str
    boolean: bool = False
    env_name: str | None = None  # when the variable's name is set by convention
    secret: bool = False  # never echo the value in an error

    @property
    def env(self) -> str:
        """The environment variable: DEADLOCK_AGENT_ + the flag in upper snake case."""
        if self.env_name is not None:
            return self.env_name
        assert self.flag is not None  # noqa: S101 - a setting has a flag or an env_name
        return ENV_PREFIX + self.flag.lstrip("-").replace(".", "_").replace("-", "_").upper()

    @property
    def names(self) -> str:
        """How an error names it: "--flag / ENV"."""
        return f"{self.flag} / {self.env}" if self.flag else self.env


WATCH_SETTINGS: tuple[Setting, ...] = (
    Setting("interval", "--interval", positive_float, 1.0,
            "seconds between sampling cycles (the cheap /proc scan runs every cycle)"),
    Setting("stuck_after", "--stuck-after", positive_float, 10.0,
            "a thread whose stack and CPU time have not moved for this many seconds is stuck"),
    Setting("dump_interval", "--dump-interval", positive_float, 300.0,
            "re-dump a worker whose threads keep running where no dump has seen them at most "
            "this often (threads that did not run, or came back to a known idle point, never)"),
    Setting("max_dumps_per_minute", "--max-dumps-per-minute", positive_int, 30,
            "py-spy runs in any 60 s, all workers together; stuck threads are re-checked first"),
    Setting("native", "--native", boolean, True,
            "allow `py-spy dump --native` (pauses the worker ~50 ms) for workers with a suspect "
            "thread", boolean=True),
    Setting("py_spy", "--py-spy", non_empty, "py-spy",
            "the py-spy executable: a path, or a name looked for beside this Python, then on PATH"),
    Setting("py_spy_timeout", "--py-spy-timeout", positive_float, 5.0,
            "seconds before a py-spy call is killed"),
    Setting("sampler", "--sampler", sampler_mode, "auto",
            "how workers are sampled: py-spy, the in-process probe (where ptrace is denied), or "
            "auto: full py-spy, else py-spy --nonblocking, else the probe, per master"),
    Setting("probe_dir", "--probe-dir", non_empty, None,
            "directory of the in-process probes' sockets (`run` makes a private one; give it "
            "to `watch` when gunicorn runs with `deadlock-agent probe-env`)"),
    Setting("master_pid", "--master-pid", positive_int, None,
            "watch this gunicorn master only (default: find masters by command line)"),
    Setting("pidfile", "--pidfile", non_empty, None,
            "watch the master whose pid is in this file (gunicorn --pid)"),
    Setting("listen_address", "--web.listen-address", listen_address, DEFAULT_LISTEN,
            "where to serve /metrics, /healthz and /"),
    Setting("web_config_file", "--web.config.file", non_empty, None,
            "the exporter-toolkit web config (YAML: tls_server_config, basic_auth_users, "
            "http_server_config.headers) guarding every endpoint; re-read when it changes"),
    Setting("worker_labels", "--web.worker-labels", boolean, False,
            "also export deadlock_agent_worker_state with pid labels (high churn on respawn)",
            boolean=True),
    Setting("log_level", "--log-level", log_level, "INFO", "debug, info, warning or error"),
    Setting("stuck_incident_after", "--stuck-incident-after", positive_float, 60.0,
            "a named stall or spin, or a worker stuck with no known signature, becomes an "
            "incident after this long (a deadlock at once)"),
    Setting("incidents_dir", "--incidents.dir", non_empty, DEFAULT_DIR,
            "where incident evidence (JSON + text) is kept"),
    Setting("incidents_max_count", "--incidents.max-count", positive_int, DEFAULT_MAX_COUNT,
            "keep at most this many incidents (oldest dropped)"),
    Setting("incidents_max_bytes", "--incidents.max-bytes", positive_int, DEFAULT_MAX_BYTES,
            "keep incident files within this many bytes (oldest dropped)"),
    Setting("external_url", "--web.external-url", http_url, None,
            "public base URL of this agent, for links in notifications"),
    Setting("host_name", "--host-name", non_empty, None,
            "host name in notifications (default: $DYNO, else the machine's host name)"),
    Setting("slack_webhook_url", None, http_url, None,
            "Slack incoming webhook URL: enables the Slack notifier", env_name="SLACK_WEBHOOK_URL",
            secret=True),
    Setting("slack_webhook_url_file", "--slack-webhook-url-file", non_empty, None,
            "file holding the Slack webhook URL (a mounted secret)",
            env_name="SLACK_WEBHOOK_URL_FILE"),
    Setting("push_gateway", "--push-gateway", gateway_url, None,
            "push metrics to this Pushgateway (http[s]://[user:password@]host:port), for "
            "platforms nobody can scrape one dyno of (Heroku); credentials belong in the env",
            secret=True),
    Setting("push_interval", "--push-interval", positive_float, 15.0,
            "seconds between pushes (and l2met lines)"),
    Setting("push_timeout", "--push-timeout", positive_float, 3.0,
            "seconds before a push, or the delete at shutdown, is given up"),
    Setting("l2met", "--l2met", boolean, False,
            "log an l2met line (sample#/count#) to stderr every push interval, for log drains",
            boolean=True),
    Setting("remediate", "--remediate", remediate_mode, "off",
            "act on deadlocked workers: off, dry-run (log what would be sent) or kill "
            "(SIGABRT, then SIGKILL if still alive)"),
    Setting("remediate_grace", "--remediate.grace", positive_float, 30.0,
            "signal a worker only once it has been deadlocked for longer than this (seconds)"),
    Setting("remediate_abort_wait", "--remediate.abort-wait", positive_float, 5.0,
            "seconds after SIGABRT before SIGKILL, if the worker is still alive"),
    Setting("remediate_max_per_slot", "--remediate.max-per-slot", positive_int, 3,
            "signal at most this many workers of one worker slot (a worker and its "
            "replacements) per --remediate.window; past it, only alert"),
    Setting("remediate_max_per_host", "--remediate.max-per-host", positive_int, 10,
            "signal at most this many workers on this host per --remediate.window"),
    Setting("remediate_window", "--remediate.window", positive_float, 3600.0,
            "the sliding window of the remediation rate limits (seconds)"),
)

DEMO_SETTINGS: tuple[Setting, ...] = (
    Setting("duration", "--duration", positive_float, None,
            "exit after this many seconds (default: run until Ctrl-C)"),
    Setting("fault_after", "--fault-after", positive_float, 5.0,
            "seconds of healthy traffic before the fault is injected"),
)


@dataclass(frozen=True)
class AgentConfig:
    """Validated settings for `deadlock-agent watch` (and the agent inside the demo)."""

    interval: float = 1.0
    stuck_after: float = 10.0
    dump_interval: float = 300.0
    max_dumps_per_minute: int = 30
    native: bool = True
    py_spy: str = "py-spy"
    py_spy_timeout: float = 5.0
    sampler: str = "auto"
    probe_dir: str | None = None
    master_pid: int | None = None
    pidfile: str | None = None
    listen_address: str = DEFAULT_LISTEN
    web_config_file: str | None = None
    worker_labels: bool = False
    log_level: str = "INFO"
    stuck_incident_after: float = 60.0
    incidents_dir: str = DEFAULT_DIR
    incidents_max_count: int = DEFAULT_MAX_COUNT
    incidents_max_bytes: int = DEFAULT_MAX_BYTES
    external_url: str | None = None
    host_name: str | None = None
    slack_webhook_url: str | None = field(default=None, repr=False)  # a secret
    slack_webhook_url_file: str | None = None
    push_gateway: str | None = field(default=None, repr=False)  # may hold a password
    push_interval: float = 15.0
    push_timeout: float = 3.0
    l2met: bool = False
    remediate: str = "off"
    remediate_grace: float = 30.0
    remediate_abort_wait: float = 5.0
    remediate_max_per_slot: int = 3
    remediate_max_per_host: int = 10
    remediate_window: float = 3600.0

    def remediation(self) -> RemediationSettings:
        """The remediation policy's settings."""
        return RemediationSettings(
            mode=Mode(self.remediate),
            grace=self.remediate_grace,
            abort_wait=self.remediate_abort_wait,
            max_per_slot=self.remediate_max_per_slot,
            max_per_host=self.remediate_max_per_host,
            window=self.remediate_window,
        )

    def analysis(self) -> AnalysisSettings:
        """The tracker's timing knobs, derived from these settings."""
        return AnalysisSettings(
            stuck_after=self.stuck_after,
            # Dump a thread once it has been quiet for a fraction of stuck-after, so its
            # stack is known (and native) before it is judged.
            suspect_after=min(2.0, self.stuck_after / 2),
            dump_interval=self.dump_interval,
            native_gap=min(5.0, self.stuck_after / 2),
            native=self.native,
            max_dumps_per_minute=self.max_dumps_per_minute,
            interval=self.interval,
        )

    @property
    def stale_after(self) -> float:
        """/healthz turns 503 when the last cycle is older than this."""
        return 3 * self.interval + 2 * self.py_spy_timeout


@dataclass(frozen=True)
class DemoConfig:
    """Settings of `deadlock-agent demo` on top of the agent's."""

    agent: AgentConfig
    duration: float | None = None
    fault_after: float = 5.0


def add_arguments(parser: argparse.ArgumentParser, table: Sequence[Setting]) -> None:
    """Declare each setting as a flag; defaults stay None so the environment can fill in."""
    for s in table:
        helptext = f"{s.help} [env {s.env}; default {s.default}]"
        if s.flag is None:
            continue
        if s.boolean:
            parser.add_argument(
                s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None,
                help=helptext,
            )
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar="VALUE", help=helptext)


def resolve(
    table: Sequence[Setting], args: argparse.Namespace, environ: Mapping[str, str]
) -> dict[str, Any]:
    """Flag, else env var, else default; a bad value raises ConfigError naming both."""
    values: dict[str, Any] = {}
    for s in table:
        raw = getattr(args, s.name, None)
        source = s.flag or s.env
        if raw is None and s.env in environ:
            raw, source = environ[s.env], s.env
        if raw is None:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.parse(raw)
        except ValueError as err:
            shown = "a value" if s.secret else repr(raw)
            raise ConfigError(f"{s.names}: {err} (got {shown} from {source})") from err
    return values


def agent_config(values: Mapping[str, Any]) -> AgentConfig:
    """Build and cross-check an AgentConfig from resolved values."""
    names = {f.name for f in fields(AgentConfig)}
    config = AgentConfig(**{k: v for k, v in values.items() if k in names})
    if config.sampler == "probe" and config.probe_dir is None:
        raise ConfigError("--sampler=probe needs --probe-dir (or run gunicorn under `run`)")
    if config.master_pid is not None and config.pidfile is not None:
        raise ConfigError("--master-pid and --pidfile are exclusive: give one")
    if config.stuck_after < 2 * config.interval:
        raise ConfigError(
            f"--stuck-after ({config.stuck_after:g}) must be at least twice --interval "
            f"({config.interval:g}) to tell stuck from slow"
        )
    if config.dump_interval < config.interval:
        raise ConfigError("--dump-interval must be at least --interval")
    if config.stuck_incident_after < config.stuck_after:
        raise ConfigError("--stuck-incident-after must be at least --stuck-after")
    if config.slack_webhook_url_file is not None:
        if config.slack_webhook_url is not None:
            raise ConfigError("SLACK_WEBHOOK_URL and SLACK_WEBHOOK_URL_FILE are exclusive")
        path = config.slack_webhook_url_file
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"--slack-webhook-url-file / SLACK_WEBHOOK_URL_FILE: cannot read "
                              f"{path}: {err.strerror}") from err  # fmt: skip
        try:
            url = http_url(text)
        except ValueError as err:
            raise ConfigError(f"SLACK_WEBHOOK_URL_FILE {path}: {err}") from err
        config = replace(config, slack_webhook_url=url)
    if config.web_config_file is not None:
        from agent.webconfig import load

        load(config.web_config_file)  # the whole file checked before anything starts
    if config.push_timeout > config.push_interval:
        raise ConfigError("--push-timeout must be at most --push-interval")
    if config.remediate_max_per_slot > config.remediate_max_per_host:
        raise ConfigError(
            f"--remediate.max-per-slot ({config.remediate_max_per_slot}) must be at most "
            f"--remediate.max-per-host ({config.remediate_max_per_host})"
        )
    if config.push_timeout > 10:
        # Shutdown waits for one push and one delete: Heroku kills 30 s after SIGTERM.
        raise ConfigError("--push-timeout must be at most 10 seconds (shutdown waits for it)")
    return config
