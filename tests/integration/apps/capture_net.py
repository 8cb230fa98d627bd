"""Capture the network/database fixtures: `python tests/integration/apps/capture_net.py OUTDIR
[SCENARIO ...]`. Each scenario starts gunicorn (gthread, 1 worker x 4 threads) on netapp.py, sends
its requests, waits until the request thread has blocked, reads every thread's
/proc/PID/task/TID/{syscall,wchan} *before* dumping (a dump turns a timed wait into
restart_syscall), then saves `py-spy dump --json [--native]` as
OUTDIR/<scenario>.{native,python}.json and prints what /proc showed for each thread but the main
one (the gthread loop)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from harness import py_spy_dump  # noqa: E402
from peers import EndlessChunkedServer, SilentServer  # noqa: E402
from pgserver import PgServer, running_postgres  # noqa: E402

from agent.demo.run import Gunicorn, get  # noqa: E402

# scenario: (route and query with {port}, requests to send at once, the route's function,
# the peer it needs)
SCENARIOS: dict[str, tuple[str, int, str, str]] = {
    "http_read_no_timeout": ("/http?port={port}", 1, "_http", "silent"),
    "http_read_no_timeout_near_timeout": ("/http?port={port}&timeout=600", 1, "_http", "silent"),
    "tls_handshake_stall": ("/https?port={port}", 1, "_http", "silent"),
    "tls_handshake_stall_near_timeout": ("/https?port={port}&timeout=600", 1, "_http", "silent"),
    "redis_no_socket_timeout": ("/redis?port={port}", 1, "_redis", "silent"),
    "redis_no_socket_timeout_near_timeout": ("/redis?port={port}&timeout=600", 1, "_redis",
                                             "silent"),
    "mysql_no_read_timeout": ("/mysql?port={port}", 1, "_mysql", "silent"),
    "mysql_no_read_timeout_near_timeout": ("/mysql?port={port}&timeout=600", 1, "_mysql",
                                           "silent"),
    "urllib3_pool_blocked": ("/urllib3_pool?port={port}", 1, "_urllib3_pool", "chunked"),
    "urllib3_pool_blocked_near_pool_timeout": ("/urllib3_pool?port={port}&pool_timeout=600", 1,
                                               "_urllib3_pool", "chunked"),
    "pg_lock_wait": ("/pg_update?hold=120", 1, "_pg_update", "pg"),
    "pg_lock_wait_near_listen": ("/pg_listen?seconds=120", 1, "_pg_listen", "pg"),
    "libpq_network_stall": ("/pg_update?hold=0", 1, "_pg_update", "pg_silent"),
    "db_pool_exhausted": ("/sqla?hold=120", 1, "_sqla", "pg"),
    "db_pool_exhausted_near_queue_consumer": ("/queue_consumer", 1, "_queue_consumer", "none"),
    "aws_credential_refresh_wait": ("/aws?port={port}", 3, "_aws", "silent"),
    "aws_credential_refresh_wait_near_refresher_alone": ("/aws?port={port}", 1, "_aws", "silent"),
}  # fmt: skip


def proc_threads(pid: int) -> dict[int, tuple[str, str]]:
    """Every thread's (syscall line, wchan), read now."""
    seen = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            syscall = (task / "syscall").read_text().strip()
            wchan = (task / "wchan").read_text().strip()
        except OSError:
            continue
        seen[int(task.name)] = (syscall, wchan)
    return seen


@contextmanager
def peer(kind: str, postgres: Callable[[], PgServer]) -> Iterator[dict[str, str]]:
    """The peer a scenario talks to: its port, and the DSN for the database routes."""
    if kind in ("silent", "chunked", "pg_silent"):
        server = SilentServer() if kind != "chunked" else EndlessChunkedServer()
        server.start()
        try:
            env = {"port": str(server.port)}
            if kind == "pg_silent":  # a database that accepts and never answers
                env["dsn"] = postgres().dsn(port=server.port)
            yield env
        finally:
            server.close()
    elif kind == "pg":
        yield {"port": "0", "dsn": postgres().dsn()}
    else:
        yield {"port": "0"}


def capture(name: str, out: Path, workdir: Path, postgres: Callable[[], PgServer]) -> None:
    """Run one scenario and save its two dumps; print the route thread's /proc reading."""
    route, count, _function, kind = SCENARIOS[name]
    with peer(kind, postgres) as env:
        gunicorn = Gunicorn(
            workdir, {"NETAPP_DSN": env.get("dsn", "")}, worker_class="gthread", workers=1,
            threads=4, extra_args=("--pythonpath", str(HERE), "--timeout", "300"),
            app="netapp:app",
        )  # fmt: skip
        try:
            gunicorn.wait_ready(workers=1)
            (worker,) = gunicorn.worker_pids()
            url = gunicorn.url + route.format(port=env["port"])
            for _ in range(count):
                threading.Thread(target=get, args=(url, 300), daemon=True).start()
                time.sleep(0.3)
            time.sleep(3)
            before = proc_threads(worker)
            python = py_spy_dump(worker, native=False)
            native = py_spy_dump(worker, native=True)
            (out / f"{name}.python.json").write_text(python)
            (out / f"{name}.native.json").write_text(native)
            for thread in json.loads(python):
                if thread["thread_name"] != "MainThread":
                    tid = thread["os_thread_id"]
                    syscall, wchan = before.get(tid, ("?", "?"))
                    inner = thread["frames"][0]
                    print(f"{name}: tid {tid} {thread.get('thread_name')}: syscall "
                          f"{syscall!r} wchan {wchan}; innermost {inner['name']} "
                          f"({inner['filename']})")  # fmt: skip
        finally:
            gunicorn.stop()


# A resolver that never answers, without touching the host: gunicorn runs in its own network and
# mount namespaces (unshare, as root), with /etc/resolv.conf bind-mounted to "nameserver
# 127.0.0.1" and a UDP socket on 127.0.0.1:53 that reads nothing. Its socket is a unix one.
DNS_SHELL = """\
ip link set lo up && mount --bind "$RESOLV" /etc/resolv.conf || exit 1
python -c 'import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
s.bind(("127.0.0.1", 53)); time.sleep(3600)' &
exec python -m gunicorn -k gthread -w 1 --threads 4 --timeout 300 --bind "unix:$SOCK" \
  --control-socket "$CTL" --pythonpath "$APPS" netapp:app
"""


def capture_dns(name: str, out: Path, workdir: Path) -> None:
    """The dns_resolution_stall scenario, in a network namespace of its own."""
    import http.client
    import os
    import socket
    import subprocess

    import psutil

    resolv = workdir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:2\n")
    sock_path = workdir / "dns.sock"
    env = {**os.environ, "RESOLV": str(resolv), "SOCK": str(sock_path),
           "CTL": str(workdir / "dns-ctl.sock"), "APPS": str(HERE)}  # fmt: skip
    shell = subprocess.Popen(["unshare", "-n", "-m", "sh", "-c", DNS_SHELL], env=env)
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)

        def request() -> None:
            conn = http.client.HTTPConnection("localhost", timeout=300)
            conn.sock = socket.socket(socket.AF_UNIX)
            conn.sock.connect(str(sock_path))
            conn.request("GET", "/dns?host=upstream.example.com&timeout=1")
            conn.getresponse().read()

        threading.Thread(target=request, daemon=True).start()
        time.sleep(2)
        # unshare and sh exec, so the shell's pid is gunicorn's master.
        master = psutil.Process(shell.pid)
        worker = next(c.pid for c in master.children() if "gunicorn" in " ".join(c.cmdline()))
        before = proc_threads(worker)
        python = py_spy_dump(worker, native=False)
        native = py_spy_dump(worker, native=True)
        (out / f"{name}.python.json").write_text(python)
        (out / f"{name}.native.json").write_text(native)
        for thread in json.loads(python):
            if any(f["name"].endswith("_dns") for f in thread["frames"]):
                tid = thread["os_thread_id"]
                print(f"{name}: tid {tid} {thread.get('thread_name')}: /proc {before.get(tid)}")
    finally:
        for child in psutil.Process(shell.pid).children(recursive=True):
            child.kill()
        shell.kill()
        shell.wait(10)


def main() -> None:
    """Capture the named scenarios (all by default) into the directory given."""
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    names = sys.argv[2:] or list(SCENARIOS)
    with ExitStack() as stack, TemporaryDirectory() as tmp:
        started: list[PgServer] = []

        def postgres() -> PgServer:
            if not started:
                started.append(stack.enter_context(running_postgres(Path(tmp) / "pg")))
            return started[0]

        for name in names:
            if name == "dns_resolution_stall":
                capture_dns(name, out, Path(tmp))
            else:
                capture(name, out, Path(tmp), postgres)


if __name__ == "__main__":
    main()
