"""Throwaway PostgreSQL 15 server with TLS for integration tests."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import trustme

logger = logging.getLogger(__name__)

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVER_USER = "postgres"  # OS account the server runs as when we are root
SUPERUSER = "postgres"  # bootstrap database role; used only over the private unix socket
APP_USER = "app"
APP_DB = "app"
HOST = "127.0.0.1"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.05
_PORT_ATTEMPTS = 3  # the free-port probe can race with other processes binding the port
_LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class PgServer:
    """Connection details of a running test PostgreSQL server."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    ca_file: str

    def dsn(
        self,
        *,
        host: str | None = None,
        port: int | None = None,
        sslmode: str = "require",
        connect_timeout: int | None = None,
    ) -> str:
        """Return a libpq keyword DSN, optionally aimed at a proxy's host/port."""
        params: dict[str, str | int] = {
            "host": self.host if host is None else host,
            "port": self.port if port is None else port,
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
            "sslmode": sslmode,
            # With a root cert present libpq verifies the chain even for "require",
            # so TLS in tests is checked end to end, not just negotiated.
            "sslrootcert": self.ca_file,
        }
        if connect_timeout is not None:
            params["connect_timeout"] = connect_timeout
        return " ".join(f"{key}={_quote(str(value))}" for key, value in params.items())


def _quote(value: str) -> str:
    """Quote a libpq keyword value when it is empty or has spaces, quotes or backslashes."""
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _check_binaries() -> None:
    """Fail early with an install hint when the PostgreSQL 15 server binaries are absent."""
    names = ("initdb", "postgres", "pg_ctl", "pg_isready", "psql")
    missing = [name for name in names if not (PG_BIN / name).exists()]
    if missing:
        raise RuntimeError(
            f"PostgreSQL 15 binaries missing from {PG_BIN}: {', '.join(missing)}; "
            "install them with `apt-get install -y postgresql-15`"
        )


def _as_root() -> bool:
    """Return True when running as root, where initdb/postgres must drop privileges."""
    return os.geteuid() == 0


def _server_cmd(name: str, *args: str | os.PathLike[str]) -> list[str]:
    """Build argv for a PostgreSQL binary, via runuser when we are root (it refuses root)."""
    argv = [str(PG_BIN / name), *(str(a) for a in args)]
    return ["runuser", "-u", SERVER_USER, "--", *argv] if _as_root() else argv


def _give_to_server(*paths: Path) -> None:
    """Chown paths to the server account when root, so the postgres user can use them."""
    if not _as_root():
        return
    pw = pwd.getpwnam(SERVER_USER)
    for path in paths:
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _run(argv: Sequence[str]) -> None:
    """Run a setup command, raising with its output when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _log_tail(log_path: Path) -> str:
    """Return the last lines of the server log for error messages."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<server log unreadable: {exc}>"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def _write_tls(base: Path, workdir: Path) -> tuple[Path, Path, Path]:
    """Create a trustme CA and a 127.0.0.1/localhost server cert; return (ca, cert, key)."""
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST, "localhost")
    # The CA goes to workdir so clients can read it; cert and key live in the private
    # dir because the server user must read them and postgres demands a 0600 key.
    ca_file = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls_dir = base / "tls"
    tls_dir.mkdir(mode=0o700)
    cert_file = tls_dir / "server.crt"
    key_file = tls_dir / "server.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    _give_to_server(tls_dir, cert_file, key_file)
    return ca_file, cert_file, key_file


def _configure(data: Path, sock_dir: Path, cert_file: Path, key_file: Path) -> None:
    """Write postgresql.conf additions and a pg_hba.conf that only admits TLS over TCP."""
    settings = {
        "listen_addresses": f"'{HOST}'",
        "unix_socket_directories": f"'{sock_dir}'",
        "max_connections": "100",
        # Durability is pointless for a throwaway cluster and costs seconds per test run.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "ssl": "on",
        "ssl_cert_file": f"'{cert_file}'",
        "ssl_key_file": f"'{key_file}'",
        "password_encryption": "'scram-sha-256'",
    }
    # Appending keeps the files' postgres ownership; later settings override initdb's.
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("\n# test harness overrides\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    # Trust is confined to the private unix socket used for setup; TCP needs TLS plus
    # a password, so a plaintext TCP connection matches no line and is rejected.
    (data / "pg_hba.conf").write_text(
        f"local all all trust\nhostssl all all {HOST}/32 scram-sha-256\n"
    )


def _start(data: Path, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Launch the postmaster in the foreground in its own process group."""
    # A new session lets teardown SIGKILL runuser, postmaster and backends together.
    return subprocess.Popen(
        _server_cmd("postgres", "-D", data, "-p", str(port)),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> bool:
    """Poll pg_isready over TCP until ready; False if the server exited, raise on timeout."""
    deadline = time.monotonic() + READY_TIMEOUT
    argv = [str(PG_BIN / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-t", "1"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if subprocess.run(argv, check=False).returncode == 0:
            return True
        time.sleep(_POLL_INTERVAL)
    raise RuntimeError(
        f"PostgreSQL not ready on {HOST}:{port} after {READY_TIMEOUT:.0f}s; "
        f"log tail:\n{_log_tail(log_path)}"
    )


def _stop(proc: subprocess.Popen[bytes], data: Path) -> None:
    """Fast-stop the server with pg_ctl, falling back to SIGKILL of its process group."""
    if proc.poll() is not None:
        return
    try:
        wait = str(int(STOP_TIMEOUT))
        subprocess.run(
            _server_cmd("pg_ctl", "stop", "-D", data, "-m", "fast", "-w", "-t", wait),
            capture_output=True,
            check=True,
            timeout=STOP_TIMEOUT + 5,
        )
        proc.wait(timeout=10)
    except (subprocess.SubprocessError, OSError):
        logger.warning("pg_ctl stop failed for %s; killing process group %d", data, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _create_app_role(sock_dir: Path, port: int, password: str) -> None:
    """Create the app login role and its database over the trusted unix socket."""
    psql = [str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    psql += ["-h", str(sock_dir), "-p", str(port), "-U", SUPERUSER, "-d", "postgres"]
    # Separate -c flags run as separate transactions, which CREATE DATABASE requires.
    # The password is token_urlsafe output, so it needs no SQL escaping.
    _run(
        [
            *psql,
            "-c",
            f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{password}'",
            "-c",
            f"CREATE DATABASE {APP_DB} OWNER {APP_USER}",
        ]
    )


@contextlib.contextmanager
def running_postgres(workdir: Path) -> Iterator[PgServer]:
    """Run a TLS-only PostgreSQL 15 on a free 127.0.0.1 port for the duration of the block."""
    _check_binaries()
    workdir.mkdir(parents=True, exist_ok=True)
    # pytest's tmp dirs are 0700 root-owned, so the cluster lives in a /tmp dir the server
    # user owns; the short path also keeps the unix socket under the 107-byte limit.
    base = Path(tempfile.mkdtemp(prefix="pgtest-"))
    proc: subprocess.Popen[bytes] | None = None
    data = base / "data"
    log_path = workdir / "postgres.log"
    try:
        sock_dir = base / "sock"
        sock_dir.mkdir(mode=0o700)
        _give_to_server(base, sock_dir)
        ca_file, cert_file, key_file = _write_tls(base, workdir)
        _run(
            _server_cmd(
                "initdb",
                "-D",
                data,
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
        )
        _configure(data, sock_dir, cert_file, key_file)

        started = time.monotonic()
        # We open the log as ourselves so it lands in workdir even though the server
        # user cannot write there; postmaster logs to the inherited stderr.
        with log_path.open("ab") as log:
            for attempt in range(1, _PORT_ATTEMPTS + 1):
                port = _free_port()
                proc = _start(data, port, log)
                if _wait_ready(proc, port, log_path):
                    break
                tail = _log_tail(log_path)
                if attempt == _PORT_ATTEMPTS or "could not bind" not in tail:
                    raise RuntimeError(
                        f"PostgreSQL exited with {proc.returncode} during startup; "
                        f"log tail:\n{tail}"
                    )
                logger.info("port %d was taken before postgres bound it; retrying", port)

        password = secrets.token_urlsafe(18)
        _create_app_role(sock_dir, port, password)
        logger.info(
            "PostgreSQL ready on %s:%d in %.2fs (data %s, log %s)",
            HOST,
            port,
            time.monotonic() - started,
            data,
            log_path,
        )
        yield PgServer(
            host=HOST,
            port=port,
            user=APP_USER,
            password=password,
            dbname=APP_DB,
            ca_file=str(ca_file),
        )
    finally:
        try:
            if proc is not None:
                _stop(proc, data)
        finally:
            shutil.rmtree(base, ignore_errors=True)
