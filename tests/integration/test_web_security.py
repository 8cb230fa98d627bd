"""--web.config.file against real clients: basic auth with requests and curl on every endpoint,
TLS verified against a test CA (trustme), mTLS, malformed Authorization headers on raw sockets,
a bad file at startup (exit 2, one line), and secrets (Slack webhook, Pushgateway password,
basic auth password and hash) absent from logs, metrics, incident files and /incidents."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import requests
from builders import deadlock_incident, fixture
from harness import AgentProcess
from prometheus_client import CollectorRegistry
from promstack import FakeSlack

from agent.config import AgentConfig
from agent.demo.run import free_port
from agent.incidents import IncidentStore
from agent.metrics import AgentCollector
from agent.runtime import Agent
from agent.server import AgentApp, HttpServer
from agent.types import CycleReport
from agent.webconfig import WebConfigFile

pytestmark = pytest.mark.integration
trustme = pytest.importorskip("trustme", reason="trustme makes the test CAs (the demo extra)")

USER, PASSWORD = "prometheus", "scrape-Pa55word"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
ROUTES = ("/metrics", "/incidents", "/healthz")
CURL = shutil.which("curl")


@dataclass
class Certs:
    ca: Path  # signed the server's certificate
    other_ca: Path  # signed nothing of ours
    server_cert: Path
    server_key: Path
    client_ca: Path  # what client_ca_file names
    client: tuple[Path, Path]  # (cert, key) signed by client_ca
    stranger: tuple[Path, Path]  # (cert, key) signed by another CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca, other, client_ca, stranger_ca = (trustme.CA() for _ in range(4))

    def pem(blob: object, name: str) -> Path:
        blob.write_to_path(str(d / name))  # type: ignore[attr-defined]
        return d / name

    server = ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert("scraper@example.test")
    stranger = stranger_ca.issue_cert("stranger@example.test")
    return Certs(
        ca=pem(ca.cert_pem, "ca.pem"), other_ca=pem(other.cert_pem, "other-ca.pem"),
        server_cert=pem(server.cert_chain_pems[0], "server.pem"),
        server_key=pem(server.private_key_pem, "server.key"),
        client_ca=pem(client_ca.cert_pem, "client-ca.pem"),
        client=(pem(client.cert_chain_pems[0], "client.pem"),
                pem(client.private_key_pem, "client.key")),
        stranger=(pem(stranger.cert_chain_pems[0], "stranger.pem"),
                  pem(stranger.private_key_pem, "stranger.key")),
    )  # fmt: skip


def tls_yaml(certs: Certs, *, client_auth: str | None = None) -> str:
    text = (f"tls_server_config:\n  cert_file: {certs.server_cert}\n"
            f"  key_file: {certs.server_key}\n")  # fmt: skip
    if client_auth:
        text += f"  client_auth_type: {client_auth}\n  client_ca_file: {certs.client_ca}\n"
    return text


AUTH_YAML = f"basic_auth_users:\n  {USER}: {HASH}\n"


@contextlib.contextmanager
def served(tmp_path: Path, web_yaml: str, check_every: float = 1.0) -> Iterator[HttpServer]:
    """The real HttpServer on loopback behind the file, with a fresh cycle (/healthz 200)."""
    (tmp_path / "web.yml").write_text(web_yaml)
    registry = CollectorRegistry()
    report = CycleReport(finished_at=time.time(), duration=0.01, masters=(1,), workers=(),
                         complete=True, signatures=())  # fmt: skip
    registry.register(AgentCollector(lambda: report, version="t", py_spy_version="t"))
    app = AgentApp(registry, lambda: report, stale_after=3600,
                   store=IncidentStore(str(tmp_path / "incidents")))  # fmt: skip
    web = WebConfigFile(str(tmp_path / "web.yml"), check_every=check_every)
    server = HttpServer(app, "127.0.0.1:0", web=web)
    server.start()
    try:
        yield server
    finally:
        server.close()


def curl(*args: str) -> tuple[int, str, str]:
    """curl's exit code, the HTTP status it printed last, and the body."""
    if CURL is None:
        pytest.fail("curl is not installed: the tests check the agent with a second client")
    result = subprocess.run(
        [CURL, "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    body, _, code = result.stdout.rpartition("\n")
    return result.returncode, code, body


def assert_refused_without_detail(response: requests.Response) -> None:
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="deadlock-agent"'
    assert response.text == "Unauthorized\n"


# --- basic auth ---------------------------------------------------------------------------------


def test_basic_auth_with_requests_and_curl(tmp_path: Path) -> None:
    with served(tmp_path, AUTH_YAML) as server:
        for route in ROUTES:
            url = server.url + route
            assert_refused_without_detail(requests.get(url, timeout=5))
            assert_refused_without_detail(requests.get(url, auth=(USER, "wrong"), timeout=5))
            assert_refused_without_detail(requests.get(url, auth=("nobody", PASSWORD), timeout=5))
            ok = requests.get(url, auth=(USER, PASSWORD), timeout=5)
            assert ok.status_code == 200, (route, ok.text)

            assert curl(url) == (0, "401", "Unauthorized\n")
            assert curl("-u", f"{USER}:wrong", url) == (0, "401", "Unauthorized\n")
            code, status, body = curl("-u", f"{USER}:{PASSWORD}", url)
            assert (code, status) == (0, "200"), body
        assert "deadlock_agent_up" in requests.get(server.url + "/metrics", auth=(USER, PASSWORD),
                                                   timeout=5).text  # fmt: skip


# --- TLS and mTLS -------------------------------------------------------------------------------


def test_tls_is_verified_against_the_test_ca(
    tmp_path: Path, certs: Certs, capfd: pytest.CaptureFixture[str]
) -> None:
    with served(tmp_path, tls_yaml(certs) + AUTH_YAML) as server:
        assert server.url.startswith("https://127.0.0.1:")
        for route in ROUTES:
            url = server.url + route
            ok = requests.get(url, auth=(USER, PASSWORD), verify=str(certs.ca), timeout=5)
            assert ok.status_code == 200
            assert_refused_without_detail(requests.get(url, verify=str(certs.ca), timeout=5))
            with pytest.raises(requests.exceptions.SSLError):
                requests.get(url, auth=(USER, PASSWORD), verify=str(certs.other_ca), timeout=5)
            code, status, _ = curl("--cacert", str(certs.ca), "-u", f"{USER}:{PASSWORD}", url)
            assert (code, status) == (0, "200")
            code, _, _ = curl("--cacert", str(certs.other_ca), "-u", f"{USER}:{PASSWORD}", url)
            assert code == 60  # curl: peer certificate cannot be authenticated
        # Plain HTTP on the TLS port gets nothing, and the server goes on serving.
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
        assert requests.get(server.url + "/healthz", auth=(USER, PASSWORD), verify=str(certs.ca),
                            timeout=5).status_code == 200  # fmt: skip
    assert "Traceback" not in capfd.readouterr().err  # failed handshakes are the client's doing


def test_a_client_stalling_its_handshake_holds_up_nobody(tmp_path: Path, certs: Certs) -> None:
    with served(tmp_path, tls_yaml(certs)) as server, \
            socket.create_connection(("127.0.0.1", server.port), 5):  # says nothing
        started = time.monotonic()
        ok = requests.get(server.url + "/healthz", verify=str(certs.ca), timeout=5)
        assert ok.status_code == 200
        assert time.monotonic() - started < 2


def test_a_rotated_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    first, second = trustme.CA(), trustme.CA()
    for ca, name in ((first, "first"), (second, "second")):
        ca.cert_pem.write_to_path(str(tmp_path / f"{name}-ca.pem"))

    def install(ca: trustme.CA) -> None:
        leaf = ca.issue_cert("127.0.0.1")
        leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))

    install(first)
    text = "tls_server_config:\n  cert_file: both.pem\n  key_file: both.pem\n"
    with served(tmp_path, text, check_every=0.1) as server:
        url = server.url + "/healthz"
        assert requests.get(url, verify=str(tmp_path / "first-ca.pem"), timeout=5).ok
        install(second)
        time.sleep(0.2)
        assert requests.get(url, verify=str(tmp_path / "second-ca.pem"), timeout=5).ok
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url, verify=str(tmp_path / "first-ca.pem"), timeout=5)


def test_tls_1_2_is_the_minimum(tmp_path: Path, certs: Certs) -> None:
    def handshake(port: int, highest: ssl.TLSVersion) -> str:
        context = ssl.create_default_context(cafile=str(certs.ca))
        context.maximum_version = highest
        with socket.create_connection(("127.0.0.1", port), 5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:  # fmt: skip
            return str(tls.version())

    with served(tmp_path, tls_yaml(certs)) as server:
        assert handshake(server.port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    (tmp_path / "incidents").mkdir(exist_ok=True)
    with served(tmp_path, tls_yaml(certs) + "  min_version: TLS13\n") as server:
        assert handshake(server.port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        with pytest.raises(ssl.SSLError):
            handshake(server.port, ssl.TLSVersion.TLSv1_2)


def test_mtls_refuses_clients_without_a_certificate_of_the_client_ca(
    tmp_path: Path, certs: Certs
) -> None:
    with served(tmp_path, tls_yaml(certs, client_auth="RequireAndVerifyClientCert")) as server:
        url = server.url + "/metrics"
        ca = str(certs.ca)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url, verify=ca, timeout=5)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url, verify=ca, cert=tuple(map(str, certs.stranger)), timeout=5)
        ok = requests.get(url, verify=ca, cert=tuple(map(str, certs.client)), timeout=5)
        assert ok.status_code == 200 and "deadlock_agent_up" in ok.text

        cert, key = map(str, certs.client)
        assert curl("--cacert", ca, "--cert", cert, "--key", key, url)[:2] == (0, "200")
        assert curl("--cacert", ca, url)[0] != 0
        cert, key = map(str, certs.stranger)
        assert curl("--cacert", ca, "--cert", cert, "--key", key, url)[0] != 0


# --- a bad file at startup ----------------------------------------------------------------------

BAD_FILES = {
    "bad-yaml": "basic_auth_users:\n  a: b\n   c: [\n",
    "unknown-key": "basic_auth_users: {}\ntls_config: {}\n",
    "missing-cert-file": "tls_server_config:\n  cert_file: /nonexistent/cert.pem\n"
                         "  key_file: /nonexistent/key.pem\n",
    "plain-text-password": f"basic_auth_users:\n  {USER}: {PASSWORD}\n",
}  # fmt: skip


@pytest.mark.parametrize("text", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_web_config_file_exits_2_with_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(text)
    for how, env in (("flag", {}), ("env", {"DEADLOCK_AGENT_WEB_CONFIG_FILE": str(path)})):
        argv = [sys.executable, "-m", "agent", "watch", "--incidents.dir", str(tmp_path / "i")]
        if how == "flag":
            argv += ["--web.config.file", str(path)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                                env={**os.environ, **env})  # fmt: skip
        assert result.returncode == 2, (how, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, (how, lines)
        assert lines[0].startswith("deadlock-agent: error: --web.config.file ")
        assert str(path) in lines[0]
        assert PASSWORD not in result.stderr and "Traceback" not in result.stderr
        assert result.stdout == ""


# --- a real `watch`: malformed headers, and no secret anywhere ----------------------------------

RAW_REQUESTS = {
    "no-auth": b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    "non-utf8": b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xff\xfe\x80\r\n\r\n",
    "non-utf8-credentials": b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
                            + base64.b64encode(b"\xff\xfe:\x80") + b"\r\n\r\n",
    "bad-base64": b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Basic ===\r\n\r\n",
    "other-scheme": b"GET /incidents HTTP/1.1\r\nHost: x\r\nAuthorization: Digest x=y\r\n\r\n",
    "huge": b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + b"A" * 70_000
            + b"\r\n\r\n",
    "big-but-legal": b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + b"A" * 60_000
                     + b"\r\n\r\n",
    "two-headers": b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic a\r\n"
                   b"Authorization: Basic b\r\n\r\n",
    "garbage-request-line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
}  # fmt: skip


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_real_agent_bad_headers_and_no_secret_in_its_output(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(AUTH_YAML)
    push_password = "PushGw-Secret-42"
    # Pinned to a "master" with no workers: the agent must not sample gunicorns it finds on
    # this machine (other tests' apps).
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with FakeSlack() as slack:
        webhook = slack.url_for("/services/T0AGENT/B0AGENT/SlackHookSecret123")
        agent = AgentProcess(
            tmp_path,
            ["--web.config.file", str(web), "--log-level", "debug", "--interval", "0.5",
             "--master-pid", str(idle.pid),
             "--stuck-after", "1", "--push-interval", "0.5", "--push-timeout", "0.4"],
            env={"SLACK_WEBHOOK_URL": webhook,  # a port nobody listens on: pushes fail, logged
                 "DEADLOCK_AGENT_PUSH_GATEWAY": f"http://pusher:{push_password}@127.0.0.1:"
                                                f"{free_port()}"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while True:
                assert agent.proc.poll() is None, agent.log()
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(agent.url + "/metrics", auth=(USER, PASSWORD),
                                    timeout=2).status_code == 200:  # fmt: skip
                        break
                assert time.monotonic() < deadline, agent.log()
                time.sleep(0.1)
            for name, request in RAW_REQUESTS.items():
                reply = raw_exchange(agent.port, request)
                if reply.startswith(b"HTTP/"):
                    status = reply.split(b"\r\n", 1)[0].split()[1]
                else:  # not even a request line: http.server answers as HTTP/0.9, body only
                    status = b"400" if b"Error code: 400" in reply else reply[:80]
                assert status in (b"400", b"401", b"431"), (name, reply[:200])
                assert len(reply) < 1024, (name, len(reply))
                assert b"Traceback" not in reply
            time.sleep(1.2)  # two push attempts fail and are logged
            outputs = {
                "metrics": requests.get(agent.url + "/metrics", auth=(USER, PASSWORD),
                                        timeout=5).text,
                "incidents": requests.get(agent.url + "/incidents", auth=(USER, PASSWORD),
                                          timeout=5).text,
                "landing": requests.get(agent.url + "/", auth=(USER, PASSWORD), timeout=5).text,
            }  # fmt: skip
            assert 'deadlock_agent_pushes_total{result="connection"}' in outputs["metrics"]
        finally:
            code = agent.stop()
            idle.kill()
            idle.wait(5)
        log = agent.log()
    assert code == 0, log
    assert "push to http://127.0.0.1:" in log  # the failure is logged, without the user
    assert "basic auth for 1 user(s)" in log
    assert "Traceback" not in log
    masters = re.findall(r"gunicorn masters: (.*)", log)
    assert masters == [f"[{idle.pid}]"], masters  # nobody else's gunicorn was sampled
    for where, text in {"log": log, **outputs}.items():
        for secret in ("SlackHookSecret123", "B0AGENT", push_password, "pusher:", PASSWORD,
                       HASH, HASH[7:]):  # fmt: skip
            assert secret not in text, (where, secret)


def test_no_secret_in_logs_metrics_or_incident_files_when_an_incident_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process, so a real incident can be handed to the real listeners and store."""
    monkeypatch.setenv("DEADLOCK_TEST_CANARY", "EnvCanary-77")  # the environment stays out
    web = tmp_path / "web.yml"
    web.write_text(AUTH_YAML)
    caplog.set_level(logging.DEBUG)
    with FakeSlack() as slack:
        path = "/services/T0AGENT/B0AGENT/SlackHookSecret123"
        config = AgentConfig(listen_address="127.0.0.1:0", web_config_file=str(web),
                             incidents_dir=str(tmp_path / "incidents"),
                             slack_webhook_url=slack.url_for(path))  # fmt: skip
        agent = Agent.create(config, host="test-host")
        agent.server.start()
        try:
            incident = deadlock_incident()
            for listener in agent.monitor.listeners:
                listener(incident)
            agent.store.save(incident, fixture("libpq_ssl_with_https.native", at=10))
            slack.wait_for(lambda post: post.path == path, timeout=10)
            auth = (USER, PASSWORD)
            outputs = {
                "metrics": requests.get(agent.server.url + "/metrics", auth=auth, timeout=5).text,
                "list": requests.get(agent.server.url + "/incidents", auth=auth, timeout=5).text,
                "incident": requests.get(f"{agent.server.url}/incidents/{incident.id}.txt",
                                         auth=auth, timeout=5).text,
            }  # fmt: skip
            assert incident.id in outputs["list"]
            assert 'deadlock_agent_notifications_total{channel="slack",result="sent"} 1.0' in (
                outputs["metrics"]
            )
            assert requests.get(agent.server.url + "/metrics", timeout=5).status_code == 401
        finally:
            agent.close()
    files = {p.name: p.read_text() for p in (tmp_path / "incidents").iterdir()}
    assert len(files) == 2
    for name in files:
        mode = stat.S_IMODE((tmp_path / "incidents" / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE((tmp_path / "incidents").stat().st_mode) == 0o700
    captured = capfd.readouterr()
    # Every logger (urllib3's too) but the fake Slack's own, which logs the path it was sent.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name != "promstack")
    assert "deadlock_detected" in logged  # the incident was logged: there is text to search
    texts = {"log": logged, "stdout": captured.out, "stderr": captured.err, **outputs, **files}
    for where, text in texts.items():
        for secret in ("SlackHookSecret123", "B0AGENT", PASSWORD, HASH, HASH[7:],
                       "EnvCanary-77"):  # fmt: skip
            assert secret not in text, (where, secret)
