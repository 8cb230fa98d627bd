"""The seed's hang found with ptrace really denied: gunicorn runs as `nobody`, the agent as
another uid (root's, with CAP_SYS_PTRACE, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped), so
neither py-spy (blocking or --nonblocking: /proc/PID/mem is refused too) nor /proc/PID/syscall
works from outside. `--sampler=auto` must find that out, fall back to the in-process probe, and
raise the seed's incident from Python frames and the probe's own /proc view.

Needs root to switch uids (CI runs as root). The interpreter under /root is unreadable to
`nobody`, so gunicorn's Python is bind-mounted elsewhere in a private mount namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from harness import AgentProcess, running_app
from pgserver import PgServer

from agent.probe import ENV_PREFIX, probe_environ

pytestmark = pytest.mark.integration

NOBODY = 65534
STUCK_AFTER = 5.0
SIG = "libpq_ssl_with_https"
# The agent: root's uid, without the capabilities that would let it trace or read anyone's files.
AGENT_SETPRIV = [
    "setpriv", f"--groups={NOBODY}", "--inh-caps=-all",
    "--bounding-set=-sys_ptrace,-dac_override,-dac_read_search", "--",
]  # fmt: skip


def as_nobody() -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all", "--"]  # fmt: skip


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory both uids can reach (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.fail("this test switches uids and must run as root (CI does)")
    path = Path(tempfile.mkdtemp(prefix="deadlock-agent-noptrace-", dir="/tmp"))
    path.chmod(0o755)
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def nobody_python(mount: Path) -> tuple[list[str], str]:
    """A command line running this interpreter as nobody, and its sys.prefix there: directly
    if nobody can, else from a bind mount of its prefix in a private mount namespace (exec'd,
    so the pid is Python's)."""
    probe = [*as_nobody(), sys.executable, "-c", "import agent, gunicorn, psycopg2"]
    if subprocess.run(probe, capture_output=True, check=False, timeout=30).returncode == 0:
        return [*as_nobody(), sys.executable], sys.prefix
    if sys.prefix != sys.base_prefix:
        pytest.fail(f"nobody cannot run {sys.executable} (a venv under a private directory?)")
    mount.mkdir()
    relative = Path(sys.executable).relative_to(sys.prefix)
    # A shared-library build finds its libpython through an rpath under the prefix: point the
    # loader at the mount, or it silently loads the system's libpython of the same version.
    inner = [*as_nobody(), "env", f"LD_LIBRARY_PATH={mount / 'lib'}", str(mount / relative)]
    script = f"mount --bind {sys.prefix} {mount} && exec " + " ".join(inner) + ' "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"], str(mount)


def test_seed_hang_found_by_the_probe_when_ptrace_is_denied(
    shared_dir: Path, tmp_path: Path, postgres: PgServer
) -> None:
    probes = shared_dir / "probes"
    probes.mkdir(mode=0o2770)
    probes.chmod(0o2770)  # setgid: sockets get the group, which the agent is in
    os.chown(probes, NOBODY, NOBODY)
    python, prefix = nobody_python(shared_dir / "python")
    check = [*python, "-c", "import agent, gunicorn, psycopg2; print(agent.__file__)"]
    found = subprocess.run(check, capture_output=True, text=True, check=False, timeout=30)
    assert found.returncode == 0, f"nobody cannot import the agent: {found.stderr}"

    env = probe_environ(os.environ, str(probes))
    env = {k: v for k, v in env.items() if os.environ.get(k) != v}
    env["DEADLOCK_AGENT_PROBE_GROUP"] = "1"
    env[ENV_PREFIX] = prefix  # the bootstrap checks it runs in the interpreter it was set up for
    # nobody's home: libpq stats ~/.postgresql/postgresql.crt, and EACCES under /root fails
    # every connection at once (a fast error, not the hang).
    env["HOME"] = str(shared_dir)
    with running_app(shared_dir, postgres, python=python, env=env) as app:
        master = app.gunicorn.pid
        workers = app.gunicorn.worker_pids()
        assert all(psutil.Process(p).uids().real == NOBODY for p in [master, *workers])
        # ptrace really is denied to the agent's credentials, both ways py-spy reads memory.
        for extra in ([], ["--nonblocking"]):
            denied = subprocess.run(
                [*AGENT_SETPRIV, "py-spy", "dump", "--pid", str(workers[0]), *extra],
                capture_output=True, text=True, check=False, timeout=30,
            )  # fmt: skip
            assert denied.returncode != 0, denied.stdout
            assert "ermission" in denied.stderr + denied.stdout, denied
        wait_for_sockets(probes, workers, log=app.gunicorn.log_tail)
        for sock in probes.glob("*.sock"):
            assert sock.stat().st_mode & 0o777 == 0o660, oct(sock.stat().st_mode)

        agent = AgentProcess(
            tmp_path,
            ["--master-pid", str(master), "--sampler", "auto", "--probe-dir", str(probes),
             "--stuck-after", str(STUCK_AFTER), "--interval", "1"],
            prefix=AGENT_SETPRIV,
        )  # fmt: skip
        try:
            agent.wait_for(
                "workers watched through their probes",
                lambda m: (m.value("deadlock_agent_samples_total", method="probe") or 0) >= 1
                and (m.value("deadlock_agent_workers", state="ok") or 0) >= 2,
                timeout=30,
            )
            # The healthy twin first, through the probe: the same frames (psycopg2.connect over
            # TLS, the harvest thread's SSLSocket.do_handshake) on a busy app that works, for
            # twice --stuck-after. Nothing may be called stuck or deadlocked.
            app.traffic(["/db", "/slow?seconds=2"], concurrency=8)
            healthy_until = time.monotonic() + 2 * STUCK_AFTER
            while time.monotonic() < healthy_until:
                m = agent.scrape()
                assert (m.value("deadlock_agent_workers", state="deadlocked") or 0) == 0, m
                assert (m.value("deadlock_agent_workers", state="stuck") or 0) == 0, m
                time.sleep(0.5)
            assert agent.get_json("/incidents") == [], agent.log()[-3000:]
            app.stop_traffic()
            assert app.results.get(200, 0) >= 8, app.results  # it really served, busily
            assert (agent.scrape().value("deadlock_agent_samples_total", method="probe") or 0) > 1
            app.database.stall()
            app.harvest.stall()
            fault_at = time.monotonic()
            app.traffic(["/db"], concurrency=16)
            m, _ = agent.wait_for(
                SIG,
                lambda m: (m.value("deadlock_agent_deadlocked_workers", signature=SIG) or 0)
                >= 1,
                timeout=STUCK_AFTER + 20,
            )
            print(f"{SIG} found by the probe {time.monotonic() - fault_at:.1f}s after the fault")
            assert (m.value("deadlock_agent_samples_total", method="pyspy") or 0) == 0
            assert (m.value("deadlock_agent_samples_total", method="pyspy_native") or 0) == 0
            records = [json.loads(p.read_text()) for p in agent.incidents_dir.glob("*.json")]
            seed = [r for r in records if r.get("signature") == SIG]
            assert seed, records
            assert seed[0]["sampled_by"] == ["probe"], seed[0]
            text = "\n".join(p.read_text() for p in agent.incidents_dir.glob("*.txt"))
            assert "native frames (libpq, OpenSSL) cannot be seen from inside" in text
            assert "sampling its workers with the in-process probe" in agent.log()
        finally:
            app.database.heal()
            app.harvest.heal()
            agent.stop()


def wait_for_sockets(
    directory: Path, workers: list[int], log: Callable[[], str], timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((directory / f"{pid}.sock").exists() for pid in workers):
            return
        time.sleep(0.1)
    names = sorted(p.name for p in directory.iterdir())
    raise AssertionError(f"no probe sockets for {workers}: {names}\n{log()}")

