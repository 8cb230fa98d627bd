"""py-spy is found beside the agent's own Python when that venv is not on PATH.

As a systemd unit, a Dockerfile CMD or a Procfile runs it: `/srv/venv/bin/deadlock-agent watch`
with a PATH that lacks /srv/venv/bin, where pip put py-spy. A real venv, a real py-spy copied into
its bin/, a real agent process sampling a real Python process with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import site
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import Metrics, parse_metrics

from agent.demo.run import free_port
from agent.pyspy import find_executable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# A stand-in master with one Python child, pinned with --master-pid: the agent lists the child as
# a worker and dumps it with py-spy, which proves the py-spy it found runs.
MASTER = textwrap.dedent("""\
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    print(child.pid, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    child.kill()
    child.wait()
""")

# What pip writes as bin/deadlock-agent for [project.scripts] (pip's console-script template).
CONSOLE_SCRIPT = """\
#!{python}
import re
import sys
from agent.cli import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real venv (bin/python a symlink, as on Linux) holding py-spy and bin/deadlock-agent.

    The project and its dependencies come from this interpreter through a .pth file, so no
    package is downloaded and the venv works whether the tests run in a venv or not.
    """
    root = tmp_path_factory.mktemp("py-spy-lookup") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)  # fmt: skip
    bin_dir = root / "bin"
    assert (bin_dir / "python").is_symlink()
    [site_packages] = root.glob("lib/python*/site-packages")
    ours = [str(ROOT), *site.getsitepackages()]
    (site_packages / "deadlock_agent_test.pth").write_text("\n".join(ours) + "\n")
    py_spy = find_executable("py-spy")
    assert py_spy is not None, "py-spy is a dependency of the project: pip install -e '.[test]'"
    shutil.copy2(py_spy, bin_dir / "py-spy")
    script = bin_dir / "deadlock-agent"
    script.write_text(CONSOLE_SCRIPT.format(python=bin_dir / "python"))
    script.chmod(0o755)
    return root


@pytest.fixture
def master() -> Iterator[int]:
    """The pid of a Python process with one Python child."""
    proc = subprocess.Popen([sys.executable, "-c", MASTER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    child: int | None = None
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the master kills and reaps its child
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if child is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(child).kill()
        if proc.stdout is not None:
            proc.stdout.close()


def scrape(url: str) -> Metrics | None:
    """GET /metrics, or None while the agent is not serving yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return parse_metrics(response.read().decode())
    except OSError:
        return None


@pytest.mark.parametrize(
    "launcher", [("bin/deadlock-agent",), ("bin/python", "-m", "agent")],
    ids=["console-script", "python-m-agent"],
)  # fmt: skip
def test_py_spy_beside_the_venv_python_with_the_venv_off_path(
    tmp_path: Path, venv: Path, master: int, launcher: tuple[str, ...]
) -> None:
    empty = tmp_path / "empty-bin"  # PATH holds no py-spy at all
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PATH", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = str(empty)
    port = free_port()
    log_path = tmp_path / "agent.log"
    argv = [str(venv / launcher[0]), *launcher[1:], "watch",
            "--web.listen-address", f"127.0.0.1:{port}", "--master-pid", str(master),
            "--incidents.dir", str(tmp_path / "incidents"), "--interval", "0.5",
            "--stuck-after", "2", "--dump-interval", "1"]  # fmt: skip
    with log_path.open("ab") as log:
        agent = subprocess.Popen(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        last = None
        while time.monotonic() < deadline:
            if agent.poll() is not None:
                pytest.fail(f"agent exited {agent.returncode}:\n{log_path.read_text()[-3000:]}")
            last = scrape(f"http://127.0.0.1:{port}/metrics")
            if last is not None and (last.value("deadlock_agent_samples_total",
                                                method="pyspy") or 0) >= 1:  # fmt: skip
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no py-spy sample in 30 s; last scrape: {last}\n"
                        f"{log_path.read_text()[-3000:]}")  # fmt: skip
        assert last.value("deadlock_agent_up") == 1
        assert last.value("deadlock_agent_masters") == 1
        assert (last.value("deadlock_agent_sample_errors_total", reason="pyspy_missing") or 0) == 0
        version = subprocess.run(
            [str(venv / "bin" / "py-spy"), "--version"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.split()[-1]  # fmt: skip
        [build_info] = last.series("deadlock_agent_build_info")
        assert dict(build_info)["py_spy_version"] == version
        # The venv's py-spy, not one beside the interpreter bin/python links to.
        assert f"at {venv / 'bin' / 'py-spy'}" in log_path.read_text()
        assert sum(last.series("deadlock_agent_workers").values()) == 1  # the child, judged
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(5)
