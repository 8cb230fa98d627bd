"""Checks that the PostgreSQL test harness really serves TLS and refuses plaintext."""

from __future__ import annotations

import psycopg2
import pytest
from pgserver import PgServer

pytestmark = pytest.mark.integration


def test_require_connection_uses_tls(postgres: PgServer) -> None:
    """A sslmode=require connection is encrypted according to the server itself."""
    conn = psycopg2.connect(postgres.dsn(sslmode="require", connect_timeout=5))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            row = cur.fetchone()
    finally:
        conn.close()
    assert row == (True,)


def test_plaintext_connection_is_refused(postgres: PgServer) -> None:
    """pg_hba.conf admits only hostssl, so a sslmode=disable connection fails."""
    with pytest.raises(psycopg2.OperationalError, match=r"no pg_hba\.conf entry"):
        psycopg2.connect(postgres.dsn(sslmode="disable", connect_timeout=5))
