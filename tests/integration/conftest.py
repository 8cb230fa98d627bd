"""Shared fixtures for integration tests that run real servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pgserver import PgServer, running_postgres


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    """Yield a TLS-only PostgreSQL 15 server shared by the whole test session."""
    with running_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server
