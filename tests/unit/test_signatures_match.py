"""Signature and idle-rule matching on real py-spy fixtures (tests/fixtures/pyspy/README.md) and
on hand-built frames where no modern build can produce them."""

from __future__ import annotations

import pytest
from builders import GTHREAD_IDLE_POOL, GTHREAD_MAIN, GTHREAD_REQUEST, fixture, native, py, stack

from agent.signatures import Candidate, Catalog, load_catalog
from agent.types import ThreadStack

CATALOG = load_catalog()
BY_NAME = {s.name: s for s in CATALOG.signatures}


def busy(stacks: tuple[ThreadStack, ...], catalog: Catalog = CATALOG) -> list[Candidate]:
    """Candidates as the tracker would give them if every non-idle thread were stuck."""
    return [Candidate(s, stuck=catalog.idle_rule(s) is None) for s in stacks]


def matched(stacks: tuple[ThreadStack, ...]) -> set[str]:
    return {
        sig.name
        for sig in CATALOG.signatures
        if CATALOG.assign_roles(sig, busy(stacks)) is not None
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("libpq_ssl_with_https.native", {"libpq_ssl_with_https"}),
        ("libpq_ssl_with_https.python", {"libpq_ssl_with_https"}),
        ("libpq_alone.native", set()),
        ("libpq_alone.python", set()),
        ("idle_gthread.native", set()),
        ("idle_gthread.python", set()),
        ("idle_sync.python", set()),
        ("idle_gevent.python", set()),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_signatures_on_real_dumps(name: str, expected: set[str]) -> None:
    assert matched(fixture(name).threads) == expected


def test_libpq_ssl_with_https_roles_name_the_right_threads() -> None:
    snap = fixture("libpq_ssl_with_https.native")
    sig = BY_NAME["libpq_ssl_with_https"]
    candidates = busy(snap.threads)
    assigned = CATALOG.assign_roles(sig, candidates)
    assert assigned is not None
    roles = {role.name: candidates[i].stack for role, i in zip(sig.roles, assigned, strict=True)}
    assert roles["libpq"].name is not None and roles["libpq"].name.startswith("ThreadPoolExecutor")
    assert any(f.function == "PQconnectdb" for f in roles["libpq"].frames)
    assert roles["https"].name == "NR-Harvest-Thread"
    assert any(f.function == "SSLSocket.do_handshake" for f in roles["https"].frames)


def test_the_https_thread_need_not_be_stuck_but_the_libpq_thread_must() -> None:
    snap = fixture("libpq_ssl_with_https.native")
    sig = BY_NAME["libpq_ssl_with_https"]
    only_https_stuck = [Candidate(s, stuck=s.name == "NR-Harvest-Thread") for s in snap.threads]
    assert CATALOG.assign_roles(sig, only_https_stuck) is None
    only_libpq_stuck = [
        Candidate(s, stuck=(s.name or "").startswith("ThreadPoolExecutor")) for s in snap.threads
    ]
    assert CATALOG.assign_roles(sig, only_libpq_stuck) is not None


@pytest.mark.parametrize(
    "name",
    ["idle_gthread.native", "idle_gthread.python", "idle_sync.python", "idle_gevent.python"],
)
def test_every_thread_of_an_idle_worker_is_idle(name: str) -> None:
    for thread in fixture(name).threads:
        assert CATALOG.idle_rule(thread) is not None, thread


def test_stuck_libpq_threads_are_not_idle() -> None:
    snap = fixture("libpq_alone.native")
    in_connect = [t for t in snap.threads if any(f.function == "PQconnectdb" for f in t.frames)]
    assert in_connect
    assert all(CATALOG.idle_rule(t) is None for t in in_connect)


# Frames of the original bug, as old unstripped builds (libpq 9.x, OpenSSL 1.0) showed them.
LOCK_WAITER = stack(
    native("__lll_lock_wait", "/lib/x86_64-linux-gnu/libpthread.so.0"),
    native("pthread_mutex_lock", "/lib/x86_64-linux-gnu/libpthread.so.0"),
    native("pq_lockingcallback", "/usr/lib/x86_64-linux-gnu/libpq.so.5"),
    native("CRYPTO_lock", "/lib/x86_64-linux-gnu/libcrypto.so.1.0.0"),
    native("ssl3_read_bytes", "/lib/x86_64-linux-gnu/libssl.so.1.0.0"),
    native("pqsecure_read", "/usr/lib/x86_64-linux-gnu/libpq.so.5"),
    native("PQexec", "/usr/lib/x86_64-linux-gnu/libpq.so.5"),
    py("execute", "django/db/backends/utils.py", 64),
    *GTHREAD_REQUEST,
    tid=11,
    is_native=True,
)


# A query on an established TLS connection, waiting for its result (captured shape:
# poll <- PQsocketPoll <- PQgetResult <- PQexec <- psycopg2), and its Python-only view.
SLOW_QUERY = stack(
    native("poll", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    native("PQsocketPoll", "/site-packages/psycopg2_binary.libs/libpq-a17e3caa.so.5.17"),
    native("PQgetResult", "/site-packages/psycopg2_binary.libs/libpq-a17e3caa.so.5.17"),
    native("PQexec", "/site-packages/psycopg2_binary.libs/libpq-a17e3caa.so.5.17"),
    py("_query", "agent/demo/app.py", 70),
    *GTHREAD_REQUEST,
    tid=21,
    is_native=True,
)
SLOW_QUERY_PYTHON = stack(
    py("Cursor.execute", "psycopg/cursor.py", 732),
    py("CursorWrapper._execute", "django/db/backends/utils.py", 89),
    py("_query", "app/views.py", 70),
    *GTHREAD_REQUEST,
    tid=22,
)
CONNECTING_PYTHON = stack(py("connect", "psycopg2/__init__.py", 122), *GTHREAD_REQUEST, tid=23)
CONNECTING_DJANGO = stack(
    py("DatabaseWrapper.get_new_connection", "django/db/backends/postgresql/base.py", 332),
    py("BaseDatabaseWrapper.connect", "django/db/backends/base/base.py", 256),
    *GTHREAD_REQUEST,
    tid=24,
)
CLOSING = stack(
    native("SSL_shutdown", "/usr/lib/x86_64-linux-gnu/libssl.so.3"),
    native("PQfinish", "/site-packages/psycopg2_binary.libs/libpq-a17e3caa.so.5.17"),
    py("close", "app/db.py", 12),
    *GTHREAD_REQUEST,
    tid=25,
    is_native=True,
)
# The other OpenSSL user: waiting >= 2 s for a slow HTTPS reply, or in a stalled handshake.
SLOW_HTTPS_REPLY = stack(
    native("read", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    native("BIO_read", "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"),
    py("SSLSocket.recv_into", "ssl.py", 1314),
    py("SocketIO.readinto", "socket.py", 706),
    py("HTTPResponse._read_status", "http/client.py", 286),
    py("harvest", "newrelic/core/agent.py", 5),
    tid=31,
    name="NR-Harvest-Thread",
    is_native=True,
)
HANDSHAKE = stack(
    native("read", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    native("BIO_read", "/usr/lib/x86_64-linux-gnu/libcrypto.so.3"),
    py("SSLSocket.do_handshake", "ssl.py", 1383),
    py("harvest", "newrelic/core/agent.py", 5),
    tid=32,
    name="NR-Harvest-Thread",
    is_native=True,
)


@pytest.mark.parametrize(
    ("stacks", "expected"),
    [
        ((LOCK_WAITER,), {"libpq_ssl_lock_callback"}),
        (
            (
                stack(
                    native("CRYPTO_lock", "/lib/libcrypto.so.1.0.0"),
                    native("SSL_read", "/lib/libssl.so.1.0.0"),
                    tid=12,
                    is_native=True,
                ),
            ),
            set(),
        ),
        (
            (
                stack(
                    native("pgtls_read", "/usr/lib/libpq.so.5"),
                    native("SSL_read", "/usr/lib/libssl.so.3"),
                    py("execute", "psycopg2/extras.py"),
                    *GTHREAD_REQUEST,
                    tid=13,
                ),
                stack(
                    native("SSL_read", "/usr/lib/libssl.so.3"),
                    native("pqsecure_read", "/usr/lib/libpq.so.5"),
                    py("execute", "psycopg2/extras.py"),
                    *GTHREAD_REQUEST,
                    tid=14,
                ),
            ),
            set(),
        ),
        (
            (
                stack(native("PQconnectdb", "/x/libpq-abc.so.5"), *GTHREAD_REQUEST, tid=15),
                stack(
                    py("SSLSocket.recv_into", "ssl.py"),
                    py("HTTPResponse.read", "urllib3/response.py"),
                    tid=16,
                ),
            ),
            {"libpq_ssl_with_https"},
        ),
        # The healthy twin of the seed: a slow query on an established connection beside a
        # thread waiting on a slow HTTPS reply. Same libraries, same waits: not the hang.
        ((SLOW_QUERY, SLOW_HTTPS_REPLY), set()),
        ((SLOW_QUERY_PYTHON, SLOW_HTTPS_REPLY), set()),
        ((SLOW_QUERY, HANDSHAKE), set()),
        ((CONNECTING_PYTHON, SLOW_HTTPS_REPLY), {"libpq_ssl_with_https"}),
        ((CONNECTING_DJANGO, HANDSHAKE), {"libpq_ssl_with_https"}),
        ((CLOSING, HANDSHAKE), {"libpq_ssl_with_https"}),
    ],
    ids=[
        "historical-lock-callback",
        "crypto-lock-without-mutex-wait",
        "two-libpq-threads-in-tls-are-not-https",
        "stripped-libpq-connect-plus-python-https",
        "slow-query-beside-slow-https-reply",
        "slow-query-python-frames-beside-slow-https-reply",
        "slow-query-beside-handshake",
        "connect-python-frames-beside-slow-https-reply",
        "django-connect-beside-handshake",
        "teardown-beside-handshake",
    ],
)
def test_signatures_on_built_frames(stacks: tuple[ThreadStack, ...], expected: set[str]) -> None:
    assert matched(stacks) == expected


@pytest.mark.parametrize(
    ("frames", "idle"),
    [
        (GTHREAD_IDLE_POOL, True),
        (GTHREAD_MAIN, True),
        ((py("Condition.wait", "threading.py", 320), py("harvest", "newrelic/core.py")), True),
        (
            (py("Condition.wait", "threading.py", 320), py("checkout", "pool.py"),
             *GTHREAD_REQUEST),
            False,
        ),
        ((py("select", "selectors.py"), py("poll_forever", "app.py")), False),
        (
            (py("acquire_with_timeout", "gevent/_threading.py", 36),
             py("_Condition.wait", "gevent/_threading.py", 86),
             py("Queue.get", "gevent/_threading.py", 207),
             py("_WorkerGreenlet.run", "gevent/threadpool.py", 216)),
            True,
        ),
        (GTHREAD_REQUEST, False),
        ((native("poll", "/lib/libc.so.6"),), False),
    ],
    ids=[
        "pool-thread-waiting-for-work",
        "gthread-event-loop",
        "background-event-wait",
        "request-thread-waiting-on-a-condition-is-not-idle",
        "app-select-outside-gunicorn",
        "gevent-threadpool-worker-waiting",
        "request-in-app-code",
        "no-python-frames",
    ],
)
def test_idle_rules(frames: tuple, idle: bool) -> None:  # type: ignore[type-arg]
    assert (CATALOG.idle_rule(stack(*frames, tid=1)) is not None) is idle
