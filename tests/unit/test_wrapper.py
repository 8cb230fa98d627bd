"""agent.wrapper's pure parts and `deadlock-agent run`'s command line (the process behaviour is
tests/integration/test_run_wrapper.py's)."""

from __future__ import annotations

import signal

import pytest

from agent.cli import build_parser, main
from agent.config import AgentConfig
from agent.errors import ConfigError
from agent.wrapper import Wrapper, child_environ, exit_status


@pytest.mark.parametrize(
    ("returncode", "status"),
    [(0, 0), (3, 3), (-signal.SIGKILL, 137), (-signal.SIGTERM, 143)],
)
def test_exit_status_is_what_a_shell_reports(returncode: int, status: int) -> None:
    assert exit_status(returncode) == status


def test_run_needs_a_command() -> None:
    with pytest.raises(ConfigError, match="deadlock-agent run -- gunicorn"):
        Wrapper(AgentConfig(), [], host="h", environ={})


def test_run_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--"], environ={}) == 2
    assert "give the command to start after --" in capsys.readouterr().err


def test_command_after_the_separator_keeps_its_own_flags() -> None:
    args = build_parser().parse_args(
        ["run", "--stuck-after", "7", "--", "gunicorn", "--workers", "2", "app:app"]
    )
    assert args.stuck_after == "7"
    assert args.argv[-4:] == ["gunicorn", "--workers", "2", "app:app"]


def test_child_environment_without_a_probe_is_ours() -> None:
    assert child_environ({"A": "1"}, None) == {"A": "1"}
