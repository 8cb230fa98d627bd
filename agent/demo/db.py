"""The demo apps' database access: one query on a fresh libpq connection (Django's default before
CONN_MAX_AGE), over TLS when DEMO_DATABASE_URL says sslmode=require."""

from __future__ import annotations

import os
from typing import Any


def query(sql: str, params: tuple[Any, ...] = ()) -> Any:
    """Run one statement on a new connection and return the first column of its first row."""
    import psycopg2  # demo dependency: `pip install deadlock-agent[demo]`

    dsn = os.environ.get("DEMO_DATABASE_URL")
    if not dsn:
        raise LookupError("DEMO_DATABASE_URL is not set")
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()[0]
    finally:
        conn.close()
