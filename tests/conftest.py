"""Fixtures every test directory can use."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A fresh directory with a short path, for Unix sockets: a socket path holds at most 107
    bytes, and pytest's tmp_path (longer still under pytest-xdist) can run past that."""
    path = Path(tempfile.mkdtemp(prefix="da-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
