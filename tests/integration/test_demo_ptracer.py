"""Yama on a stock Ubuntu laptop: the demo's py-spy, a sibling of the workers, is let in by them.

This machine may have no Yama, so its kernel would never deny us. What is real: gunicorn, the demo
app's workers (and a respawned one) making the prctl call and saying so, py-spy, and the demo.
What is simulated: the kernel's decision, by a py-spy stand-in that applies Yama's scope-1 rule
(the target must have named, with PR_SET_PTRACER, this py-spy or one of its ancestors) to what the
target worker announced, and prints real py-spy 0.4's permission error when the rule says no.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agent.demo.run import Gunicorn
from agent.errors import PtraceDenied
from agent.pyspy import PySpy, find_executable
from agent.types import WorkerRef

pytestmark = pytest.mark.integration

HAS_YAMA = Path("/proc/sys/kernel/yama").exists()
ANNOUNCED = re.compile(r"demo app: worker pid (\d+) called prctl\(PR_SET_PTRACER, (\w+)\): (.*)")

# Yama's rule for scope 1, applied to the worker's own announcement, read from its stderr (the
# gunicorn log file, reached through /proc/PID/fd/2). Scope 2 and above: denied, whatever it said.
FAKE_PY_SPY = """\
#!{python}
import os, re, sys
REAL = {real!r}
DENIED = "Permission Denied: Try running again with elevated permissions by going " \\
    "'sudo env \\"PATH=$PATH\\" !!'"

def ancestors():
    pid = os.getpid()
    while pid > 0:
        yield pid
        with open(f"/proc/{{pid}}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])

def tracer_named_by(target):
    try:
        with open(f"/proc/{{target}}/fd/2", errors="replace") as log:
            text = log.read()
    except OSError:
        return None
    found = re.search(rf"worker pid {{target}} called prctl\\(PR_SET_PTRACER, (\\w+)\\)", text)
    return found and found.group(1)

args = sys.argv[1:]
if "--pid" in args:
    target = int(args[args.index("--pid") + 1])
    named = tracer_named_by(target)
    scope = int(os.environ.get("FAKE_YAMA_SCOPE", "1"))
    ok = scope < 2 and named is not None and (
        named == "PR_SET_PTRACER_ANY" or int(named) in set(ancestors()))
    with open(os.environ.get("FAKE_PY_SPY_LOG", os.devnull), "a") as record:
        print("allowed" if ok else "denied", target, named, file=record)
    if not ok:
        print(DENIED, file=sys.stderr)
        sys.exit(1)
os.execv(REAL, [REAL, *args])
"""


@pytest.fixture
def fake_py_spy(tmp_path: Path) -> Path:
    """The py-spy stand-in under simulated Yama; it runs the real py-spy when Yama would allow."""
    real = find_executable("py-spy")
    assert real, "py-spy is a dependency of the agent: pip install -e '.[test]'"
    path = tmp_path / "py-spy"
    path.write_text(FAKE_PY_SPY.format(python=sys.executable, real=real))
    path.chmod(0o755)
    return path


def announcements(
    gunicorn: Gunicorn, pids: list[int], timeout: float = 10.0
) -> dict[int, tuple[str, str] | None]:
    """Each worker's announcement line: {pid: (tracer, outcome)}, waiting until all have one."""
    deadline = time.monotonic() + timeout
    while True:
        found = {
            int(m[1]): (m[2], m[3])
            for m in ANNOUNCED.finditer(gunicorn.log_path.read_text(errors="replace"))
        }
        if all(pid in found for pid in pids) or time.monotonic() > deadline:
            return {pid: found.get(pid) for pid in pids}
        time.sleep(0.05)


def ref(gunicorn: Gunicorn, pid: int) -> WorkerRef:
    return WorkerRef(pid, psutil.Process(pid).create_time(), gunicorn.pid)


def test_every_worker_allows_the_tracer_also_after_a_respawn(
    tmp_path: Path, fake_py_spy: Path
) -> None:
    gunicorn = Gunicorn(tmp_path, {"DEMO_PTRACER": str(os.getpid())}, threads=1)
    try:
        gunicorn.wait_ready(workers=2)
        first = gunicorn.worker_pids()
        outcome = "in effect" if HAS_YAMA else "not in effect (no Yama here, so nothing to allow)"
        expected = (str(os.getpid()), outcome)
        assert announcements(gunicorn, first) == dict.fromkeys(first, expected), gunicorn.log_tail()

        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not (respawned := set(gunicorn.worker_pids()) - set(first)):
            assert time.monotonic() < deadline, gunicorn.log_tail()
            time.sleep(0.05)
        (new,) = respawned
        assert announcements(gunicorn, [new]) == {new: expected}, gunicorn.log_tail()

        # This process named itself, so its child (the py-spy stand-in) may dump the new worker.
        pyspy = PySpy(str(fake_py_spy), timeout=10)
        pyspy.check()
        snapshot = pyspy.dump(ref(gunicorn, new), native=False)
        assert snapshot.threads, "py-spy saw no thread in the respawned worker"
    finally:
        gunicorn.stop()


@pytest.mark.parametrize("tracer", ["unset", "a-sibling"])
def test_a_worker_that_names_no_ancestor_is_denied_with_the_fix(
    tmp_path: Path, fake_py_spy: Path, tracer: str
) -> None:
    """The stand-in really applies the rule: no announcement, or a non-ancestor named, is denied."""
    sibling = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                               stdin=subprocess.PIPE)  # fmt: skip
    env = {} if tracer == "unset" else {"DEMO_PTRACER": str(sibling.pid)}
    gunicorn = Gunicorn(tmp_path, env, workers=1, threads=1)
    try:
        gunicorn.wait_ready(workers=1)
        (worker,) = gunicorn.worker_pids()
        named = announcements(gunicorn, [worker], timeout=0 if tracer == "unset" else 10)[worker]
        assert (named and named[0]) == (None if tracer == "unset" else str(sibling.pid))
        with pytest.raises(PtraceDenied) as denied:
            PySpy(str(fake_py_spy), timeout=10).dump(ref(gunicorn, worker), native=False)
        text = str(denied.value)
        assert "Permission Denied: Try running again" in text
        assert "ptrace_scope" in text
    finally:
        gunicorn.stop()
        sibling.kill()
        sibling.wait(5)


@pytest.mark.parametrize("scope", [1, 2], ids=["yama-1-app-allows", "yama-2-admin-only"])
def test_the_demo_under_simulated_yama(tmp_path: Path, fake_py_spy: Path, scope: int) -> None:
    """Scope 1: the workers name the demo, its py-spy gets in, the hang is detected. Scope 2: no
    PR_SET_PTRACER helps; the demo says so in one line naming ptrace_scope, and exits 1 early."""
    record = tmp_path / "py-spy.log"
    demo = subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", "--duration", "40", "--fault-after", "1",
         "--stuck-after", "2", "--py-spy", str(fake_py_spy),
         "--web.listen-address", "127.0.0.1:0", "--incidents.dir", str(tmp_path / "incidents")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "FAKE_YAMA_SCOPE": str(scope), "FAKE_PY_SPY_LOG": str(record)},
    )  # fmt: skip
    assert demo.stdout is not None
    lines = []
    try:
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("[demo] DETECTED"):
                demo.send_signal(signal.SIGINT)  # seen: no need to keep /metrics up
        code = demo.wait(20)
        stderr = demo.stderr.read() if demo.stderr else ""
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(5)
    out = "".join(lines)
    decisions = [line.split() for line in record.read_text().splitlines()]
    assert decisions, f"the py-spy stand-in never ran\n{out}\n{stderr[-3000:]}"
    if scope == 1:
        assert code == 0, f"{out}\n{stderr[-3000:]}"
        assert "DEADLOCK libpq_ssl_with_https in gunicorn worker" in out
        # Every dump was allowed, because each worker named the demo itself.
        assert {(verdict, named) for verdict, _, named in decisions} == {
            ("allowed", str(demo.pid))
        }, decisions
    else:
        assert code == 1, f"{out}\n{stderr[-3000:]}"
        assert "DETECTED" not in out
        denied = [line for line in lines if line.startswith("[demo] py-spy was denied access")]
        assert len(denied) == 1, out
        assert "kernel.yama.ptrace_scope" in denied[0]
        assert "Permission Denied" in stderr  # the agent's own error line, with py-spy's words
