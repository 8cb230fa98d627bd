"""A WSGI app whose requests hang the way real apps do on the network and the database: each route
makes one real client call (requests, urllib3, redis-py, PyMySQL, psycopg2, SQLAlchemy, botocore)
to a peer the test controls. With `timeout` (or `pool_timeout`, a short `hold`) the same call is the
healthy twin: bounded, or over at once.

    /http?port=P[&timeout=S]          requests.get to a peer that accepts and never answers
    /https?port=P[&timeout=S]         the same over TLS: stuck in the handshake
    /redis?port=P[&timeout=S]         redis-py GET against a silent "Redis"
    /mysql?port=P[&timeout=S]         PyMySQL connect to a silent "MySQL" (waits for its greeting)
    /urllib3_pool?port=P[&pool_timeout=S]  a second request through a pool of 1 whose only
                                      connection a streamed response holds (pool_block=True)
    /pg_update?hold=S                 UPDATE a row another transaction holds FOR UPDATE for S s
    /pg_listen?seconds=S              a LISTEN loop waiting in select() (an intentional wait)
    /sqla?hold=S                      SQLAlchemy checkout from a QueuePool of 1 whose connection a
                                      background thread holds for S s
    /queue_consumer                   starts a background consumer idle in queue.Queue.get
    /dns?host=H&timeout=S             requests.get to a host name whose resolver never answers
                                      (run in a network namespace: see capture_net.py)
    /aws?port=P                       botocore credentials in their mandatory refresh window,
                                      refreshed from a silent "IMDS" (call it twice at once)

NETAPP_DSN (a libpq DSN) is the database of the /pg_* and /sqla routes."""

from __future__ import annotations

import datetime
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import psycopg2
import pymysql
import redis
import requests
import sqlalchemy
import urllib3
from botocore.credentials import RefreshableCredentials
from botocore.utils import InstanceMetadataFetcher
from requests.adapters import HTTPAdapter

urllib3.disable_warnings()

Start = Callable[[str, list[tuple[str, str]]], object]

_DSN = os.environ.get("NETAPP_DSN", "")
_leaked: list[Any] = []  # streamed responses left open on purpose: they hold pool slots
_state: dict[str, Any] = {}
_state_lock = threading.Lock()


def _timeout(params: dict[str, str], key: str = "timeout") -> float | None:
    return float(params[key]) if key in params else None


def _http(params: dict[str, str], scheme: str) -> str:
    url = f"{scheme}://127.0.0.1:{params['port']}/"
    # No timeout unless asked: requests' default, the hang this route shows. The peer never
    # completes a handshake, so there is no certificate to check.
    response = requests.get(url, timeout=_timeout(params), verify=False)  # noqa: S501
    return str(response.status_code)


def _dns(params: dict[str, str]) -> str:
    url = f"http://{params['host']}/"
    return str(requests.get(url, timeout=_timeout(params)).status_code)


def _redis(params: dict[str, str]) -> str:
    timeout = _timeout(params)
    client = redis.Redis(host="127.0.0.1", port=int(params["port"]), socket_timeout=timeout,
                         socket_connect_timeout=5)  # fmt: skip
    return repr(client.get("k"))


def _mysql(params: dict[str, str]) -> str:
    timeout = _timeout(params)
    conn = pymysql.connect(host="127.0.0.1", port=int(params["port"]), user="app",
                           connect_timeout=5, read_timeout=timeout)  # fmt: skip
    conn.close()
    return "connected"


def _urllib3_pool(params: dict[str, str]) -> str:
    base = f"http://127.0.0.1:{params['port']}/"
    pool_timeout = _timeout(params, "pool_timeout")
    if pool_timeout is None:
        session = requests.Session()
        session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=1, pool_block=True))
        _leaked.append(session.get(base, stream=True, timeout=5))  # never read, never closed
        return str(session.get(base, timeout=5).status_code)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", int(params["port"]), maxsize=1, block=True)
    _leaked.append(pool.urlopen("GET", "/", preload_content=False, timeout=5))
    return str(pool.urlopen("GET", "/", timeout=5, pool_timeout=pool_timeout).status)


def _ensure_table() -> None:
    with _state_lock:
        if _state.get("table"):
            return
        conn = psycopg2.connect(_DSN)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("CREATE TABLE IF NOT EXISTS netapp_locks (id int PRIMARY KEY, n int)")
                cur.execute("INSERT INTO netapp_locks VALUES (1, 0) ON CONFLICT DO NOTHING")
        finally:
            conn.close()
        _state["table"] = True


def _pg_update(params: dict[str, str]) -> str:
    _ensure_table()
    hold = float(params.get("hold", "60"))
    locked = threading.Event()

    def holder() -> None:
        # Another session: takes the row lock, sits idle in transaction, then commits.
        conn = psycopg2.connect(_DSN)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT n FROM netapp_locks WHERE id = 1 FOR UPDATE")
                locked.set()
                time.sleep(hold)
        finally:
            conn.close()

    threading.Thread(target=holder, daemon=True, name="lock-holder").start()
    locked.wait(10)
    conn = psycopg2.connect(_DSN)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("UPDATE netapp_locks SET n = n + 1 WHERE id = 1")
    finally:
        conn.close()
    return "updated"


def _pg_listen(params: dict[str, str]) -> str:
    conn = psycopg2.connect(_DSN)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("LISTEN netapp")
        deadline = time.monotonic() + float(params.get("seconds", "30"))
        while (left := deadline - time.monotonic()) > 0:
            if select.select([conn], [], [], left) != ([], [], []):
                conn.poll()
                conn.notifies.clear()
    finally:
        conn.close()
    return "listened"


def _engine() -> sqlalchemy.Engine:
    with _state_lock:
        if "engine" not in _state:
            _state["engine"] = sqlalchemy.create_engine(
                "postgresql+psycopg2://", creator=lambda: psycopg2.connect(_DSN),
                pool_size=1, max_overflow=0, pool_timeout=60,
            )  # fmt: skip
        return _state["engine"]  # type: ignore[no-any-return]


def _sqla(params: dict[str, str]) -> str:
    engine = _engine()
    hold = float(params.get("hold", "0"))
    if hold > 0:
        taken = threading.Event()

        def holder() -> None:
            with engine.connect():
                taken.set()
                threading.Event().wait(hold)

        threading.Thread(target=holder, daemon=True, name="pool-holder").start()
        taken.wait(10)
    with engine.connect() as conn:
        return str(conn.execute(sqlalchemy.text("SELECT 1")).scalar())


def _queue_consumer(params: dict[str, str]) -> str:
    work: queue.Queue[object] = queue.Queue()
    _leaked.append(work)
    threading.Thread(target=work.get, daemon=True, name="queue-consumer").start()
    return "started"


def _aws(params: dict[str, str]) -> str:
    with _state_lock:
        if "credentials" not in _state:
            fetcher = InstanceMetadataFetcher(
                timeout=600, num_attempts=1, base_url=f"http://127.0.0.1:{params['port']}"
            )
            expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
            _state["credentials"] = RefreshableCredentials.create_from_metadata(
                metadata={"access_key": "AKIDEXAMPLE", "secret_key": "secret", "token": "t",
                          "expiry_time": expiry.isoformat()},
                refresh_using=fetcher.retrieve_iam_role_credentials, method="iam-role",
            )  # fmt: skip
    # Five minutes left: inside botocore's mandatory window, every caller waits for the refresh.
    return _state["credentials"].get_frozen_credentials().access_key  # type: ignore[no-any-return]


ROUTES: dict[str, Callable[[dict[str, str]], str]] = {
    "/http": lambda p: _http(p, "http"),
    "/https": lambda p: _http(p, "https"),
    "/dns": _dns,
    "/redis": _redis,
    "/mysql": _mysql,
    "/urllib3_pool": _urllib3_pool,
    "/pg_update": _pg_update,
    "/pg_listen": _pg_listen,
    "/sqla": _sqla,
    "/queue_consumer": _queue_consumer,
    "/aws": _aws,
}


def app(environ: dict[str, Any], start_response: Start) -> Iterable[bytes]:
    """Route to one hanging (or healthy) call; `/` answers at once (readiness)."""
    path = environ.get("PATH_INFO", "/")
    params = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    route = ROUTES.get(path)
    if route is None:
        status, body = ("200 OK", "ok") if path == "/" else ("404 Not Found", "no such route")
    else:
        try:
            status, body = "200 OK", route(params)
        except Exception as err:  # noqa: BLE001 - the client is told what failed, as a web app would
            status, body = "502 Bad Gateway", f"{type(err).__name__}: {err}"
    start_response(status, [("Content-Type", "text/plain")])
    return [body.encode()]
