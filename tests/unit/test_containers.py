"""The Dockerfile and the Kubernetes example: the fields a sidecar needs to work at all (same pid
namespace, CAP_SYS_PTRACE, the agent's port on every interface, the scrape annotations)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from agent.server import DEFAULT_PORT

ROOT = Path(__file__).resolve().parents[2]


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, one entry per occurrence (continuation lines joined)."""
    found: dict[str, list[str]] = {}
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            found.setdefault(instruction.upper(), []).append(rest.strip())
    return found


def test_the_dockerfile_builds_a_small_image_that_serves_the_default_port() -> None:
    d = dockerfile()
    assert len(d["FROM"]) == 1 and d["FROM"][0].startswith("python:3."), d["FROM"]
    assert d["FROM"][0].endswith("-slim"), "a small, conventional base"
    assert any("pip install" in run and "--no-cache-dir" in run for run in d["RUN"]), d["RUN"]
    assert d["EXPOSE"] == [str(DEFAULT_PORT)]
    assert d["ENTRYPOINT"] == ['["deadlock-agent"]']
    (cmd,) = d["CMD"]
    args = yaml.safe_load(cmd)  # the JSON (exec) form
    assert args[:1] == ["watch"]
    assert args[args.index("--web.listen-address") + 1] == f"0.0.0.0:{DEFAULT_PORT}"
    assert "ENV" not in d or not any("WEBHOOK" in e or "PASSWORD" in e for e in d["ENV"])


def test_the_dockerfile_comment_shows_the_docker_run_that_works() -> None:
    text = (ROOT / "Dockerfile").read_text()
    line = next(li for li in text.splitlines() if "docker run" in li)
    argv = shlex.split(line.lstrip("# "))
    assert "--pid=container:web" in argv and argv[
        argv.index("--cap-add") : argv.index("--cap-add") + 2
    ] == ["--cap-add", "SYS_PTRACE"]
    assert f"{DEFAULT_PORT}:{DEFAULT_PORT}" in argv


def pod() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "examples" / "kubernetes-pod.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_the_kubernetes_pod_shares_the_pid_namespace_with_ptrace_for_the_sidecar_only() -> None:
    spec = pod()["spec"]
    assert spec["shareProcessNamespace"] is True
    containers = {c["name"]: c for c in spec["containers"]}
    agent = containers["deadlock-agent"]
    assert agent["securityContext"]["capabilities"]["add"] == ["SYS_PTRACE"]
    assert agent["args"][0] == "watch"
    listen = agent["args"][agent["args"].index("--web.listen-address") + 1]
    assert listen == f"0.0.0.0:{DEFAULT_PORT}"
    assert {"name": "metrics", "containerPort": DEFAULT_PORT} in agent["ports"]
    assert agent["readinessProbe"]["httpGet"]["path"] == "/healthz"
    others = [c for name, c in containers.items() if name != "deadlock-agent"]
    assert others, "the app runs in the same pod"
    for container in others:
        assert "SYS_PTRACE" not in str(container.get("securityContext", {}))
    assert any("gunicorn" in " ".join(c.get("command", [])) for c in others)


def test_the_kubernetes_pod_is_scraped_on_the_agents_port() -> None:
    annotations = pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(DEFAULT_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_readme_points_at_the_example_and_says_what_blocks_ptrace() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "examples/kubernetes-pod.yaml" in readme
    assert "docker run --pid=container:web --cap-add SYS_PTRACE" in readme
    assert "seccomp" in readme and "Yama" in readme and "AppArmor" in readme
