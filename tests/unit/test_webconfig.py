"""agent/webconfig.py and the Guard in agent/server.py: the exporter-toolkit web config parsed
strictly (errors name the file, never a hash), basic auth (bcrypt, the cache, malformed headers),
reload on change; and the secrets surface: incident files private, no shell in agent/, no
locals in a dump."""

from __future__ import annotations

import base64
import io
import json
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import bcrypt
import pytest
from builders import deadlock_incident, fixture
from prometheus_client import CollectorRegistry

from agent.errors import ConfigError
from agent.incidents import IncidentStore, dump_record, dump_text
from agent.probe.worker import Probe
from agent.pyspy import PySpy, parse_dump
from agent.server import AgentApp, Guard
from agent.types import WorkerRef
from agent.webconfig import BasicAuth, WebConfigFile, load, parse, parse_basic

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-Pa55"
# Cost 4: the cheapest bcrypt, so the tests pay ~1 ms per check.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def write(tmp_path: Path, text: str, name: str = "web.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- parsing: what loads -----------------------------------------------------------------------


def test_basic_auth_users_load(tmp_path: Path) -> None:
    other = bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
    config = load(write(tmp_path, f"basic_auth_users:\n  alice: {HASH}\n  bob: '{other}'\n"))
    assert set(config.users) == {"alice", "bob"}
    assert config.tls is None and config.ssl_context is None
    assert HASH not in repr(config)
    assert config.describe() == "TLS off, basic auth for 2 user(s)"


@pytest.mark.parametrize(
    "text", ["", "---\n", "# nothing\n"], ids=["empty", "doc-start", "comment"]
)
def test_an_empty_file_configures_nothing(tmp_path: Path, text: str) -> None:
    config = load(write(tmp_path, text))
    assert config.users == {} and config.tls is None and config.headers == ()


def test_headers_and_http2_load(tmp_path: Path) -> None:
    config = load(write(tmp_path, "http_server_config:\n  http2: true\n  headers:\n"
                                  "    x-frame-options: deny\n"
                                  "    Strict-Transport-Security: max-age=31536000\n"))  # fmt: skip
    assert config.headers == (("X-Frame-Options", "deny"),
                              ("Strict-Transport-Security", "max-age=31536000"))  # fmt: skip


# --- parsing: what is refused, and how it says so -----------------------------------------------

BAD = {
    "bad-yaml": f"basic_auth_users:\n  alice: {HASH}\n   bob: [\n",
    "not-a-mapping": "- just\n- a list\n",
    "unknown-top-key": "basic_auth_user:\n  alice: x\n",
    "unsupported-rate-limit": "rate_limit:\n  interval: 1s\n",
    "plain-password": f"basic_auth_users:\n  alice: {PASSWORD}\n",
    "truncated-hash": f"basic_auth_users:\n  alice: {HASH[:-3]}\n",
    "md5-hash": "basic_auth_users:\n  alice: $apr1$abc$0123456789abcdefghijkl\n",
    "hash-not-a-string": "basic_auth_users:\n  alice: 12345\n",
    "colon-in-user": f"basic_auth_users:\n  'al:ice': {HASH}\n",
    "duplicate-user": f"basic_auth_users:\n  alice: {HASH}\n  alice: {HASH}\n",
    "tls-without-key": "tls_server_config:\n  cert_file: c.pem\n",
    "tls-missing-cert-file": "tls_server_config:\n  cert_file: nope.pem\n  key_file: nope.key\n",
    "tls-unknown-key": "tls_server_config:\n  cert_file: c\n  key_file: k\n  cert_flie: x\n",
    "tls-inline-cert": "tls_server_config:\n  cert: '-----BEGIN'\n  key_file: k\n",
    "tls-old-version": "tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS11\n",
    "tls-bad-version": "tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: TLS1.2\n",
    "tls-version-list": "tls_server_config:\n  cert_file: c\n  key_file: k\n  min_version: [1]\n",
    "tls-bad-auth-type": "tls_server_config:\n  cert_file: c\n  key_file: k\n"
                         "  client_auth_type: Sometimes\n",
    "tls-request-any": "tls_server_config:\n  cert_file: c\n  key_file: k\n"
                       "  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca\n",
    "tls-verify-without-ca": "tls_server_config:\n  cert_file: c\n  key_file: k\n"
                             "  client_auth_type: RequireAndVerifyClientCert\n",
    "tls-ca-without-policy": "tls_server_config:\n  cert_file: c\n  key_file: k\n"
                             "  client_ca_file: ca\n",
    "header-not-allowed": "http_server_config:\n  headers:\n    Set-Cookie: a=b\n",
    "http2-not-bool": "http_server_config:\n  http2: maybe\n",
}  # fmt: skip


@pytest.mark.parametrize("text", BAD.values(), ids=BAD.keys())
def test_bad_files_are_one_line_naming_the_file_and_no_secret(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"--web.config.file {path}: ")
    assert "\n" not in message
    assert PASSWORD not in message
    assert HASH[7:] not in message  # not even the salt and digest
    assert HASH[7:-3] not in message


@pytest.mark.parametrize(
    ("text", "says"),
    [(BAD["plain-password"], "not a bcrypt hash"), (BAD["unknown-top-key"], "unknown key"),
     (BAD["tls-missing-cert-file"], "No such file"), (BAD["bad-yaml"], "line 3"),
     (BAD["duplicate-user"], "twice"), (BAD["tls-old-version"], "RFC 8996"),
     (BAD["unsupported-rate-limit"], "not supported")],
    ids=["plain-password", "unknown-key", "missing-file", "yaml-position", "duplicate",
         "old-tls", "unsupported"],
)  # fmt: skip
def test_errors_say_what_is_wrong(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        load(write(tmp_path, text))


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load(str(tmp_path / "absent.yml"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        (tmp_path / "latin.yml").write_bytes(b"basic_auth_users:\n  \xe9: x\n")
        load(str(tmp_path / "latin.yml"))


def test_a_key_that_does_not_load_is_refused(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme", reason="trustme makes the test certificates")
    leaf = trustme.CA().issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    (tmp_path / "k.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    text = "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n"
    with pytest.raises(ConfigError, match="not a PEM certificate and its unencrypted"):
        load(write(tmp_path, text))
    leaf.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    config = load(write(tmp_path, text))  # relative paths: against the file's directory
    assert config.ssl_context is not None
    assert config.tls is not None and config.tls.key_file == tmp_path / "k.pem"


# --- basic auth ---------------------------------------------------------------------------------

MALFORMED = {
    "none": None,
    "empty": "",
    "bearer": "Bearer abc",
    "basic-only": "Basic",
    "not-base64": "Basic !!!!",
    "no-colon": "Basic " + base64.b64encode(b"alice").decode(),
    "non-utf8-user": "Basic " + base64.b64encode(b"\xff\xfe:pw").decode(),
    "latin1-header": "Basic \xe9\xe9\xe9\xe9",
    "huge": "Basic " + "A" * 100_000,
    "nul-password": "Basic " + base64.b64encode(b"alice:\x00").decode(),
    "long-password": basic("alice", "x" * 200),
}


@pytest.mark.parametrize("header", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_headers_are_refused_without_raising(header: str | None) -> None:
    assert not BasicAuth({"alice": HASH.encode()}).allows(header)


def test_parse_basic() -> None:
    assert parse_basic(basic("alice", "a:b:c")) == ("alice", b"a:b:c")
    assert parse_basic("basic " + base64.b64encode(b"\xc3\xa9:pw").decode()) == ("é", b"pw")


def test_right_password_wrong_password_unknown_user() -> None:
    auth = BasicAuth({"alice": HASH.encode()})
    assert auth.allows(basic("alice", PASSWORD))
    assert not auth.allows(basic("alice", PASSWORD + "x"))
    assert not auth.allows(basic("bob", PASSWORD))
    assert not auth.allows(basic("Alice", PASSWORD))


def test_verified_passwords_are_cached_briefly_and_failures_never() -> None:
    calls: list[bytes] = []
    now = [0.0]

    def checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return bcrypt.checkpw(password, hashed)

    auth = BasicAuth({"alice": HASH.encode()}, cache_seconds=60, clock=lambda: now[0],
                     checkpw=checkpw)  # fmt: skip
    for _ in range(3):
        assert auth.allows(basic("alice", PASSWORD))
    assert len(calls) == 1
    for _ in range(2):
        assert not auth.allows(basic("alice", "wrong"))
    assert len(calls) == 3  # a failure is checked every time
    now[0] = 61.0
    assert auth.allows(basic("alice", PASSWORD))
    assert len(calls) == 4  # expired: bcrypt again


def test_an_unknown_user_costs_a_bcrypt_check_too() -> None:
    calls: list[bytes] = []

    def checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return bcrypt.checkpw(password, hashed)

    assert not BasicAuth({"alice": HASH.encode()}, checkpw=checkpw).allows(basic("bob", "pw"))
    assert len(calls) == 1 and calls[0] != HASH.encode()
    # The stand-in hash is checked for the time it takes, never as a way in.
    assert not BasicAuth({}, checkpw=lambda p, h: True).allows(basic("bob", "pw"))


# --- the Guard, through WSGI --------------------------------------------------------------------


def call(app: Callable[..., Any], path: str, authorization: str | None = None,
         ) -> tuple[int, dict[str, str], str]:  # fmt: skip
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET",
                               "wsgi.input": io.BytesIO()}  # fmt: skip
    setup_testing_defaults(environ)
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response)).decode()
    return int(seen["status"].split()[0]), seen["headers"], body


def guarded(tmp_path: Path, text: str, **kwargs: Any) -> tuple[Guard, WebConfigFile]:
    web = WebConfigFile(write(tmp_path, text), **kwargs)
    app = AgentApp(CollectorRegistry(), lambda: None, stale_after=10,
                   store=IncidentStore(str(tmp_path / "incidents")))  # fmt: skip
    return Guard(app, web), web


@pytest.mark.parametrize("path", ["/metrics", "/incidents", "/healthz", "/", "/nope"])
def test_every_route_needs_credentials(tmp_path: Path, path: str) -> None:
    guard, _ = guarded(tmp_path, f"basic_auth_users:\n  alice: {HASH}\n")
    for header in (None, basic("alice", "wrong"), "Basic %%%"):
        code, headers, body = call(guard, path, header)
        assert code == 401
        assert headers["WWW-Authenticate"] == 'Basic realm="deadlock-agent"'
        assert body == "Unauthorized\n"
    code, _, _ = call(guard, path, basic("alice", PASSWORD))
    assert code != 401


def test_configured_headers_go_on_every_response(tmp_path: Path) -> None:
    guard, _ = guarded(tmp_path, f"basic_auth_users:\n  alice: {HASH}\nhttp_server_config:\n"
                                 "  headers:\n    X-Content-Type-Options: nosniff\n")  # fmt: skip
    assert call(guard, "/metrics")[1]["X-Content-Type-Options"] == "nosniff"  # the 401 too
    code, headers, _ = call(guard, "/metrics", basic("alice", PASSWORD))
    assert code == 200 and headers["X-Content-Type-Options"] == "nosniff"


def test_a_changed_file_is_reloaded_and_a_broken_one_refuses_everything(tmp_path: Path) -> None:
    now = [0.0]
    guard, web = guarded(tmp_path, f"basic_auth_users:\n  alice: {HASH}\n", clock=lambda: now[0])
    assert call(guard, "/healthz", basic("alice", PASSWORD))[0] == 503  # no cycle yet: past auth
    write(tmp_path, f"basic_auth_users:\n  bob: {HASH}\n")
    assert call(guard, "/healthz", basic("alice", PASSWORD))[0] == 503  # not checked yet
    now[0] = 2.0
    assert call(guard, "/healthz", basic("alice", PASSWORD))[0] == 401
    assert call(guard, "/healthz", basic("bob", PASSWORD))[0] == 503
    write(tmp_path, "basic_auth_users:\n  bob: hunter2hunter2\n")
    now[0] = 4.0
    code, _, body = call(guard, "/healthz", basic("bob", PASSWORD))
    assert (code, body) == (500, "Internal Server Error\n")
    assert web.current() is None
    write(tmp_path, f"basic_auth_users:\n  bob: {HASH}\n  carol: {HASH}\n")
    now[0] = 6.0
    assert call(guard, "/healthz", basic("bob", PASSWORD))[0] == 503


# --- the secrets surface ------------------------------------------------------------------------


def test_incident_directory_and_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "incidents"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    (directory / "old.json").write_text("{}")
    (directory / "old.json").chmod(0o644)
    store = IncidentStore(str(directory))
    store.save(deadlock_incident(), fixture("libpq_ssl_with_https.native", at=10))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert len(files) == 3
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    fresh = IncidentStore(str(tmp_path / "a" / "new"))
    assert stat.S_IMODE(fresh.directory.stat().st_mode) == 0o700


SHELL = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|subprocess\.getoutput|"
                   r"subprocess\.getstatusoutput|os\.exec\w*p\w*\(|pty\.spawn")  # fmt: skip


def test_no_shell_anywhere_in_agent() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "agent").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if SHELL.search(line)
    ]
    assert offenders == []
    assert SHELL.search("subprocess.run(cmd, shell=True)")  # the pattern itself catches one


def test_py_spy_never_runs_with_locals() -> None:
    seen: list[list[str]] = []

    def runner(argv: Any, *, timeout: float) -> tuple[int, str, str]:
        seen.append(list(argv))
        return 0, "[]", ""

    spy = PySpy("/bin/true", runner=runner)
    spy.executable = "/bin/true"
    worker = WorkerRef(1, 1.0, 0)
    for native, nonblocking in ((False, False), (True, False), (False, True)):
        spy.dump(worker, native=native, nonblocking=nonblocking)
    assert len(seen) == 3
    assert all(not {"--locals", "-L"} & set(argv) for argv in seen)


def test_locals_in_py_spy_output_never_reach_the_evidence() -> None:
    local = {"name": "token", "addr": 1, "arg": False, "repr": "'TOPSECRET'"}
    frame = {"name": "handler", "filename": "/app/views.py", "module": None,
             "short_filename": "views.py", "line": 3, "locals": [local]}  # fmt: skip
    dump = json.dumps([{"thread_id": 1, "os_thread_id": 11, "thread_name": "MainThread",
                        "active": False, "owns_gil": False, "frames": [frame]}])  # fmt: skip
    snap = parse_dump(dump, worker=WorkerRef(1, 1.0, 0), taken_at=0.0, native=False)
    assert snap.threads and "handler" in dump_text(snap)
    assert "TOPSECRET" not in json.dumps(dump_record(snap)) + dump_text(snap)


def test_the_probe_dump_has_no_locals(tmp_path: Path) -> None:
    ready, done = threading.Event(), threading.Event()

    def holder() -> None:
        token = "TOPSECRET-in-a-local"  # noqa: F841 - what a dump must not show
        ready.set()
        done.wait(5)

    thread = threading.Thread(target=holder, name="holder")
    thread.start()
    try:
        ready.wait(5)
        reply = Probe(str(tmp_path)).dump()
    finally:
        done.set()
        thread.join()
    text = json.dumps(reply)
    assert "holder" in text
    assert "TOPSECRET" not in text


def test_the_readme_example_parses() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Security"):]
    start = section.index("```yaml\n") + len("```yaml\n")
    example = section[start : section.index("```\n", start)]
    config = parse(example, base=Path("/etc/deadlock-agent"))
    assert config.tls is not None
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert set(config.users) == {"prometheus"}
    assert dict(config.headers)["X-Content-Type-Options"] == "nosniff"


def test_passwords_past_bcrypts_72_bytes_are_refused_whatever_bcrypt_says() -> None:
    auth = BasicAuth({"alice": HASH.encode()}, checkpw=lambda p, h: True)
    assert auth.allows(basic("alice", "x" * 72))
    assert not auth.allows(basic("alice", "x" * 73))
