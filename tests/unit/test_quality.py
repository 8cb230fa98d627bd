"""Lint and types are part of the suite: `ruff check` and `mypy --strict` on agent/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "ruff", "check", "agent", "tests", "benchmarks"],
        [sys.executable, "-m", "mypy"],  # strict, files = agent: see pyproject.toml
    ],
    ids=["ruff", "mypy-strict"],
)
def test_clean(argv: list[str]) -> None:
    result = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
