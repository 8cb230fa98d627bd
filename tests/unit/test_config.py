"""agent/config.py and the argument parsing of agent/cli.py: names, precedence, validation, and
how `deadlock-agent` reports a bad setting (exit code, one line on stderr)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent import cli
from agent.config import (
    DEMO_SETTINGS,
    WATCH_SETTINGS,
    AgentConfig,
    agent_config,
    resolve,
    sampler_mode,
)
from agent.errors import EXIT_UNAVAILABLE, EXIT_USAGE, ConfigError
from agent.incidents import DEFAULT_DIR

# The documented contract (README "Configuration"), written out by hand so a rename shows up here.
ENV_NAMES = {
    "--interval": "DEADLOCK_AGENT_INTERVAL",
    "--stuck-after": "DEADLOCK_AGENT_STUCK_AFTER",
    "--dump-interval": "DEADLOCK_AGENT_DUMP_INTERVAL",
    "--max-dumps-per-minute": "DEADLOCK_AGENT_MAX_DUMPS_PER_MINUTE",
    "--native": "DEADLOCK_AGENT_NATIVE",
    "--py-spy": "DEADLOCK_AGENT_PY_SPY",
    "--py-spy-timeout": "DEADLOCK_AGENT_PY_SPY_TIMEOUT",
    "--sampler": "DEADLOCK_AGENT_SAMPLER",
    "--probe-dir": "DEADLOCK_AGENT_PROBE_DIR",
    "--master-pid": "DEADLOCK_AGENT_MASTER_PID",
    "--pidfile": "DEADLOCK_AGENT_PIDFILE",
    "--web.listen-address": "DEADLOCK_AGENT_WEB_LISTEN_ADDRESS",
    "--web.config.file": "DEADLOCK_AGENT_WEB_CONFIG_FILE",
    "--web.worker-labels": "DEADLOCK_AGENT_WEB_WORKER_LABELS",
    "--log-level": "DEADLOCK_AGENT_LOG_LEVEL",
    "--stuck-incident-after": "DEADLOCK_AGENT_STUCK_INCIDENT_AFTER",
    "--incidents.dir": "DEADLOCK_AGENT_INCIDENTS_DIR",
    "--incidents.max-count": "DEADLOCK_AGENT_INCIDENTS_MAX_COUNT",
    "--incidents.max-bytes": "DEADLOCK_AGENT_INCIDENTS_MAX_BYTES",
    "--web.external-url": "DEADLOCK_AGENT_WEB_EXTERNAL_URL",
    "--host-name": "DEADLOCK_AGENT_HOST_NAME",
    "--slack-webhook-url-file": "SLACK_WEBHOOK_URL_FILE",
    "SLACK_WEBHOOK_URL": "SLACK_WEBHOOK_URL",  # environment only: a secret
    "--push-gateway": "DEADLOCK_AGENT_PUSH_GATEWAY",
    "--push-interval": "DEADLOCK_AGENT_PUSH_INTERVAL",
    "--push-timeout": "DEADLOCK_AGENT_PUSH_TIMEOUT",
    "--l2met": "DEADLOCK_AGENT_L2MET",
    "--remediate": "DEADLOCK_AGENT_REMEDIATE",
    "--remediate.grace": "DEADLOCK_AGENT_REMEDIATE_GRACE",
    "--remediate.abort-wait": "DEADLOCK_AGENT_REMEDIATE_ABORT_WAIT",
    "--remediate.max-per-slot": "DEADLOCK_AGENT_REMEDIATE_MAX_PER_SLOT",
    "--remediate.max-per-host": "DEADLOCK_AGENT_REMEDIATE_MAX_PER_HOST",
    "--remediate.window": "DEADLOCK_AGENT_REMEDIATE_WINDOW",
    "--duration": "DEADLOCK_AGENT_DURATION",
    "--fault-after": "DEADLOCK_AGENT_FAULT_AFTER",
}

DEFAULTS = {
    "interval": 1.0,
    "stuck_after": 10.0,
    "dump_interval": 300.0,
    "max_dumps_per_minute": 30,
    "native": True,
    "py_spy": "py-spy",
    "py_spy_timeout": 5.0,
    "sampler": "auto",
    "probe_dir": None,
    "master_pid": None,
    "pidfile": None,
    "listen_address": "127.0.0.1:19808",
    "web_config_file": None,
    "worker_labels": False,
    "log_level": "INFO",
    "stuck_incident_after": 60.0,
    "incidents_dir": DEFAULT_DIR,
    "incidents_max_count": 200,
    "incidents_max_bytes": 64 * 1024 * 1024,
    "external_url": None,
    "host_name": None,
    "slack_webhook_url": None,
    "slack_webhook_url_file": None,
    "push_gateway": None,
    "push_interval": 15.0,
    "push_timeout": 3.0,
    "l2met": False,
    "remediate": "off",
    "remediate_grace": 30.0,
    "remediate_abort_wait": 5.0,
    "remediate_max_per_slot": 3,
    "remediate_max_per_host": 10,
    "remediate_window": 3600.0,
}


def watch_values(*argv: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse `deadlock-agent watch ARGV` with the real parser and resolve it against env."""
    args = cli.build_parser().parse_args(["watch", *argv])
    return resolve(WATCH_SETTINGS, args, env or {})


def config_of(*argv: str, env: Mapping[str, str] | None = None) -> AgentConfig:
    """The cross-checked AgentConfig of `deadlock-agent watch ARGV`."""
    return agent_config(watch_values(*argv, env=env))


def one_line(text: str) -> str:
    """The text, asserted to be exactly one line."""
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "env"), sorted(ENV_NAMES.items()), ids=sorted(ENV_NAMES)
)
def test_env_var_name_of_each_setting(flag: str, env: str) -> None:
    setting = next(s for s in (*WATCH_SETTINGS, *DEMO_SETTINGS) if (s.flag or s.env) == flag)
    assert setting.env == env


def test_every_setting_is_documented_here() -> None:
    """A new setting must be added to ENV_NAMES (and the README table) on purpose."""
    assert {s.flag or s.env for s in (*WATCH_SETTINGS, *DEMO_SETTINGS)} == set(ENV_NAMES)


def test_defaults_when_neither_flag_nor_env() -> None:
    assert watch_values() == DEFAULTS
    assert config_of() == AgentConfig()


# --- precedence --------------------------------------------------------------------------------

PRECEDENCE = [
    # (flag, flag value, env value, name, parsed flag value, parsed env value)
    ("--interval", "2.5", "4", "interval", 2.5, 4.0),
    ("--stuck-after", "20", "30", "stuck_after", 20.0, 30.0),
    ("--dump-interval", "60", "90", "dump_interval", 60.0, 90.0),
    ("--py-spy", "/opt/py-spy", "/usr/bin/py-spy", "py_spy", "/opt/py-spy", "/usr/bin/py-spy"),
    ("--py-spy-timeout", "2", "3", "py_spy_timeout", 2.0, 3.0),
    ("--master-pid", "123", "456", "master_pid", 123, 456),
    ("--pidfile", "/run/a.pid", "/run/b.pid", "pidfile", "/run/a.pid", "/run/b.pid"),
    ("--web.listen-address", ":9100", "0.0.0.0:9200", "listen_address", ":9100", "0.0.0.0:9200"),
    ("--log-level", "debug", "warning", "log_level", "DEBUG", "WARNING"),
    ("--remediate", "dry-run", "Kill", "remediate", "dry-run", "kill"),
    ("--remediate.grace", "5", "60", "remediate_grace", 5.0, 60.0),
    ("--remediate.max-per-slot", "1", "2", "remediate_max_per_slot", 1, 2),
]


@pytest.mark.parametrize(
    ("flag", "flag_value", "env_value", "name", "from_flag", "from_env"),
    PRECEDENCE,
    ids=[row[0] for row in PRECEDENCE],
)
def test_flag_beats_env_beats_default(
    flag: str, flag_value: str, env_value: str, name: str, from_flag: Any, from_env: Any
) -> None:
    env = {ENV_NAMES[flag]: env_value}
    assert watch_values(f"{flag}={flag_value}")[name] == from_flag
    assert watch_values(f"{flag}={flag_value}", env=env)[name] == from_flag
    assert watch_values(env=env)[name] == from_env
    assert watch_values()[name] == DEFAULTS[name]


def test_unrelated_environment_is_ignored() -> None:
    env = {"DEADLOCK_AGENT_INTERVALS": "x", "INTERVAL": "x", "deadlock_agent_interval": "x"}
    assert watch_values(env=env) == DEFAULTS


# --- booleans: --native / --no-native, --web.worker-labels ---------------------------------------

NATIVE_CASES = [
    # (argv, env value or None, expected)
    ((), None, True),
    (("--no-native",), None, False),
    (("--native",), None, True),
    ((), "false", False),
    ((), "0", False),
    ((), "off", False),
    ((), "no", False),
    ((), " False ", False),
    ((), "true", True),
    ((), "YES", True),
    (("--native",), "false", True),
    (("--no-native",), "true", False),
]


@pytest.mark.parametrize(
    ("argv", "env_value", "expected"),
    NATIVE_CASES,
    ids=[f"{' '.join(a) or 'no-flag'}-env={e!r}" for a, e, _ in NATIVE_CASES],
)
def test_native_flag_and_env(argv: tuple[str, ...], env_value: str | None, expected: bool) -> None:
    env = {} if env_value is None else {"DEADLOCK_AGENT_NATIVE": env_value}
    config = config_of(*argv, env=env)
    assert config.native is expected
    assert config.analysis().native is expected


def test_worker_labels_flag_and_env() -> None:
    assert config_of().worker_labels is False
    assert config_of("--web.worker-labels").worker_labels is True
    assert config_of(env={"DEADLOCK_AGENT_WEB_WORKER_LABELS": "1"}).worker_labels is True
    env = {"DEADLOCK_AGENT_WEB_WORKER_LABELS": "true"}
    assert config_of("--no-web.worker-labels", env=env).worker_labels is False


# --- bad values --------------------------------------------------------------------------------

BAD_VALUES = [
    ("--interval", "0"),
    ("--interval", "-1"),
    ("--interval", "nan"),
    ("--interval", "inf"),
    ("--interval", "-inf"),
    ("--interval", "fast"),
    ("--interval", ""),
    ("--stuck-after", "0"),
    ("--dump-interval", "-30"),
    ("--py-spy-timeout", "NaN"),
    ("--master-pid", "0"),
    ("--master-pid", "-5"),
    ("--master-pid", "1.5"),
    ("--master-pid", "gunicorn"),
    ("--pidfile", "   "),
    ("--py-spy", ""),
    ("--web.listen-address", "19808"),
    ("--web.listen-address", "127.0.0.1"),
    ("--web.listen-address", "127.0.0.1:http"),
    ("--web.listen-address", "127.0.0.1:65536"),
    ("--log-level", "verbose"),
    ("--log-level", "critical"),
    ("--push-interval", "0"),
    ("--push-timeout", "-1"),
    ("--remediate", "yes"),
    ("--remediate", "dryrun"),
    ("--remediate.grace", "0"),
    ("--remediate.abort-wait", "-5"),
    ("--remediate.max-per-slot", "0"),
    ("--remediate.max-per-host", "2.5"),
    ("--remediate.window", "an hour"),
]


@pytest.mark.parametrize(
    ("flag", "raw"), BAD_VALUES, ids=[f"{flag}={raw!r}" for flag, raw in BAD_VALUES]
)
def test_bad_flag_value_names_flag_and_env(flag: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        watch_values(f"{flag}={raw}")
    message = str(caught.value)
    assert flag in message
    assert ENV_NAMES[flag] in message
    assert repr(raw) in message


BAD_ENV = [
    *BAD_VALUES,
    ("--native", "maybe"),
    ("--native", ""),
    ("--native", "2"),
    ("--web.worker-labels", "enabled"),
    ("--l2met", "sometimes"),
]


@pytest.mark.parametrize(
    ("flag", "raw"), BAD_ENV, ids=[f"{ENV_NAMES[flag]}={raw!r}" for flag, raw in BAD_ENV]
)
def test_bad_env_value_names_flag_and_env(flag: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        watch_values(env={ENV_NAMES[flag]: raw})
    message = str(caught.value)
    assert flag in message
    assert ENV_NAMES[flag] in message
    assert f"from {ENV_NAMES[flag]}" in message


def test_bad_env_value_is_not_consulted_when_the_flag_is_given() -> None:
    values = watch_values("--interval=2", env={"DEADLOCK_AGENT_INTERVAL": "fast"})
    assert values["interval"] == 2.0


# --- cross-checks ------------------------------------------------------------------------------

CROSS_CHECKS = [
    # (argv, env, words the message must contain)
    (("--master-pid=12", "--pidfile=/run/g.pid"), {}, ("--master-pid", "--pidfile")),
    (("--pidfile=/run/g.pid",), {"DEADLOCK_AGENT_MASTER_PID": "12"}, ("--master-pid", "--pidfile")),
    (("--interval=1", "--stuck-after=1.9"), {}, ("--stuck-after", "--interval")),
    (("--interval=5", "--stuck-after=9"), {}, ("--stuck-after", "--interval")),
    (("--interval=2", "--dump-interval=1.5"), {}, ("--dump-interval", "--interval")),
    (("--remediate.max-per-slot=5", "--remediate.max-per-host=4"), {},
     ("--remediate.max-per-slot", "--remediate.max-per-host")),
]


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    CROSS_CHECKS,
    ids=["master-pid-and-pidfile", "master-pid-env-and-pidfile", "stuck-after-below-2x",
         "stuck-after-below-2x-scaled", "dump-interval-below-interval",
         "remediate-slot-above-host"],
)  # fmt: skip
def test_cross_checks(argv: tuple[str, ...], env: dict[str, str], words: tuple[str, ...]) -> None:
    values = watch_values(*argv, env=env)  # each value is fine on its own
    with pytest.raises(ConfigError) as caught:
        agent_config(values)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    "argv",
    [("--interval=1", "--stuck-after=2"), ("--interval=2", "--dump-interval=2"),
     ("--master-pid=12",), ("--pidfile=/run/g.pid",)],
    ids=["stuck-after-exactly-2x", "dump-interval-equal", "master-pid-alone", "pidfile-alone"],
)  # fmt: skip
def test_cross_check_boundaries_are_accepted(argv: tuple[str, ...]) -> None:
    config_of(*argv)


def test_remediation_settings_are_derived() -> None:
    from agent.remediation import Mode, RemediationSettings

    assert config_of().remediation() == RemediationSettings(mode=Mode.OFF)
    config = config_of("--remediate=kill", "--remediate.grace=2", "--remediate.abort-wait=1",
                       "--remediate.max-per-slot=1", "--remediate.max-per-host=1",
                       env={"DEADLOCK_AGENT_REMEDIATE_WINDOW": "600"})  # fmt: skip
    assert config.remediation() == RemediationSettings(
        mode=Mode.KILL, grace=2.0, abort_wait=1.0, max_per_slot=1, max_per_host=1, window=600.0
    )


def test_stale_after_and_analysis_are_derived() -> None:
    config = config_of("--interval=2", "--py-spy-timeout=3", "--stuck-after=6")
    assert config.stale_after == 3 * 2 + 2 * 3
    settings = config.analysis()
    assert settings.stuck_after == 6.0
    assert settings.suspect_after == 2.0  # min(2, 6/2)
    assert settings.native_gap == 3.0  # min(5, 6/2)


# --- through agent.cli.main --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["watch", "--interval=0"], {}),
     (["watch"], {"DEADLOCK_AGENT_INTERVAL": "soon"}),
     (["watch", "--web.listen-address", "nowhere"], {}),
     (["watch"], {"DEADLOCK_AGENT_NATIVE": "perhaps"}),
     (["watch", "--log-level", "loud"], {}),
     (["watch", "--interval=1", "--stuck-after=1"], {}),
     (["demo", "--duration=-3"], {}),
     (["demo"], {"DEADLOCK_AGENT_FAULT_AFTER": "later"})],
    ids=["flag", "env", "listen-address", "bool-env", "log-level", "cross-check", "demo-flag",
         "demo-env"],
)  # fmt: skip
def test_main_bad_value_exits_2_with_one_line(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv, env) == EXIT_USAGE
    captured = capsys.readouterr()
    assert one_line(captured.err).startswith("deadlock-agent: error: ")
    assert captured.out == ""


def test_main_bad_value_line_names_flag_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["watch"], {"DEADLOCK_AGENT_STUCK_AFTER": "-1"}) == EXIT_USAGE
    line = one_line(capsys.readouterr().err)
    assert "--stuck-after" in line
    assert "DEADLOCK_AGENT_STUCK_AFTER" in line


@pytest.mark.parametrize(
    "argv",
    [["watch", "--bogus"], ["watch", "--interval"], ["frobnicate"], ["watch", "--native=yes"]],
    ids=["unknown-flag", "missing-value", "unknown-command", "value-on-bool-flag"],
)
def test_main_usage_error_exits_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(argv, {})
    assert caught.value.code == EXIT_USAGE
    assert one_line(capsys.readouterr().err).startswith("deadlock-agent: error: ")


def test_main_without_command_prints_help_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main([], {}) == EXIT_USAGE
    assert "watch" in capsys.readouterr().out


def test_main_missing_py_spy_exits_3_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nonexistent" / "py-spy")
    # Port 0: should the check not stop it, binding would not clash with a real agent.
    argv = ["watch", "--py-spy", missing, "--web.listen-address", "127.0.0.1:0"]
    assert cli.main(argv, {}) == EXIT_UNAVAILABLE
    line = one_line(capsys.readouterr().err)
    assert line.startswith("deadlock-agent: error: ")
    assert missing in line
    assert "pip install py-spy" in line


def test_main_missing_py_spy_from_env_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"DEADLOCK_AGENT_PY_SPY": "/nonexistent/py-spy",
           "DEADLOCK_AGENT_WEB_LISTEN_ADDRESS": "127.0.0.1:0"}  # fmt: skip
    assert cli.main(["watch"], env) == EXIT_UNAVAILABLE
    assert "pip install py-spy" in one_line(capsys.readouterr().err)


def test_slack_webhook_url_is_a_secret_never_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "ftp://hooks.example/T000/B000/s3cr3t-token"
    code = cli.main(["watch"], environ={"SLACK_WEBHOOK_URL": secret})
    err = capsys.readouterr().err
    assert code == 2
    assert "SLACK_WEBHOOK_URL" in err and "s3cr3t" not in err
    assert "s3cr3t" not in repr(config_of(env={"SLACK_WEBHOOK_URL": "https://h/s3cr3t"}))


def test_slack_webhook_url_file(tmp_path: Path) -> None:
    path = tmp_path / "hook"
    path.write_text("https://hooks.slack.test/services/T/B/x\n")
    config = config_of(env={"SLACK_WEBHOOK_URL_FILE": str(path)})
    assert config.slack_webhook_url == "https://hooks.slack.test/services/T/B/x"
    with pytest.raises(ConfigError, match="cannot read"):
        config_of(env={"SLACK_WEBHOOK_URL_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="exclusive"):
        config_of(env={"SLACK_WEBHOOK_URL_FILE": str(path), "SLACK_WEBHOOK_URL": "https://x/y"})


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for setting in (*WATCH_SETTINGS, *DEMO_SETTINGS):
        assert f"`{setting.env}`" in readme, setting.env
        if setting.flag is not None:
            assert f"`{setting.flag}" in readme, setting.flag


@pytest.mark.parametrize("value", ["auto", "py-spy", "probe", "PROBE"])
def test_sampler_modes(value: str) -> None:
    assert sampler_mode(value) == value.lower()


def test_sampler_rejects_others_and_probe_needs_a_directory() -> None:
    with pytest.raises(ValueError, match="auto, py-spy or probe"):
        sampler_mode("gdb")
    with pytest.raises(ConfigError, match="--probe-dir"):
        agent_config({"sampler": "probe"})
    assert agent_config({"sampler": "probe", "probe_dir": "/run/x"}).probe_dir == "/run/x"
