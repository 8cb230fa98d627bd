"""Throwaway Prometheus and Alertmanager servers, and a fake Slack, for integration tests.

Debian's `prometheus` (2.42) and `prometheus-alertmanager` (0.25) packages provide the binaries
(`scripts/test` installs them). Every server here listens on a free 127.0.0.1 port with its own
config and data directory under `workdir`, so whatever the packages' own services do (9090, 9093,
/var/lib/prometheus) cannot matter. Logs stay in `workdir` and are quoted in every error.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import queue
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.demo.run import free_port

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"  # Debian's name for the alertmanager binary
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_POLL = 0.1
_PORT_ATTEMPTS = 3  # the free-port probe can race with another process binding the port
_LOG_TAIL_CHARS = 4000
INSTALL_HINT = (
    "run scripts/test as root, or `apt-get install -y --no-install-recommends prometheus "
    "prometheus-alertmanager`"
)

Json = dict[str, Any]


def require_binary(name: str) -> str:
    """The binary's path; raise (never skip: CI must run these tests) when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not on PATH: {INSTALL_HINT}")
    return path


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
    except OSError as err:
        return f"<log unreadable: {err}>"


def _get_json(url: str, *, timeout: float = 5.0) -> Json:
    """GET a JSON document; HTTP errors still return their JSON body when there is one."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        try:
            return dict(json.loads(body))
        except ValueError:
            raise RuntimeError(f"GET {url}: HTTP {err.code}: {body[:500]}") from err


class _Server:
    """A server binary on a free loopback port: readiness by /-/ready, logs in workdir."""

    name = "server"

    def __init__(self, workdir: Path, argv_for_port: Callable[[int], list[str]]) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        try:
            self._start(argv_for_port)
        except BaseException:
            self.stop()  # a server that never got ready must not outlive the test either
            raise
        self.url = f"http://{HOST}:{self.port}"

    def _start(self, argv_for_port: Callable[[int], list[str]]) -> None:
        with self.log_path.open("ab") as log_file:
            for attempt in range(1, _PORT_ATTEMPTS + 1):
                self.port = free_port()
                self.proc = subprocess.Popen(
                    argv_for_port(self.port),
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
                if self._wait_ready():
                    return
                if attempt == _PORT_ATTEMPTS or "address already in use" not in self.log():
                    raise RuntimeError(
                        f"{self.name} exited {self.proc.returncode} during startup; "
                        f"log:\n{self.log()}"
                    )
                log.info("%s: port %d was taken before it bound it; retrying", self.name, self.port)

    def _wait_ready(self) -> bool:
        """Poll /-/ready; False if the process exited, raise on timeout."""
        assert self.proc is not None
        url = f"http://{HOST}:{self.port}/-/ready"
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
            time.sleep(_POLL)
        raise RuntimeError(
            f"{self.name} not ready on {HOST}:{self.port} after {READY_TIMEOUT:.0f}s; "
            f"log:\n{self.log()}"
        )

    def log(self) -> str:
        """The end of the server's log."""
        return _tail(self.log_path)

    def check_running(self) -> None:
        """Raise with the log if the server has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}; log:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it would not go, wait."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, proc.pid)
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def _api(self, path: str, **params: str) -> Json:
        self.check_running()
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return _get_json(f"{self.url}{path}{query}")


class Prom(_Server):
    """A running Prometheus, queried through its HTTP API."""

    name = "prometheus"

    def __init__(self, workdir: Path, config: Path, *, scrape_targets: Sequence[str]) -> None:
        binary = require_binary(PROMETHEUS)
        data = workdir / "data"
        self.scrape_targets = list(scrape_targets)
        super().__init__(
            workdir,
            lambda port: [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address={HOST}:{port}",
                "--storage.tsdb.retention.time=1h",
                # Re-send active alerts every second rather than every minute: one sent before
                # the Alertmanager was discovered is dropped, and a test cannot wait a minute.
                "--rules.alert.resend-delay=1s",
                "--log.level=info",
            ],
        )

    def _data(self, path: str, **params: str) -> Any:
        """An API call's `data`; raise with Prometheus' own error text on failure."""
        answer = self._api(path, **params)
        if answer.get("status") != "success":
            raise RuntimeError(
                f"Prometheus {path} {params}: {answer.get('errorType')}: {answer.get('error')}"
            )
        return answer["data"]

    def query(self, expr: str, *, at: float | None = None) -> list[Json]:
        """Instant query: the result's series (a scalar or string comes back as one series)."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        return _as_series(self._data("/api/v1/query", **params))

    def query_range(self, expr: str, *, start: float, end: float, step: float = 1.0) -> list[Json]:
        """Range query, as a Grafana time-series panel runs it: the series returned."""
        data = self._data(
            "/api/v1/query_range",
            query=expr,
            start=f"{start:.3f}",
            end=f"{end:.3f}",
            step=f"{step:g}",
        )
        return _as_series(data)

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """Values of a label, over every series or over those `match` selects."""
        params = {"match[]": match} if match else {}
        return list(self._data(f"/api/v1/label/{urllib.parse.quote(label)}/values", **params))

    def alerts(self) -> list[Json]:
        """Active alerts (pending and firing), as /api/v1/alerts lists them."""
        return list(self._data("/api/v1/alerts")["alerts"])

    def firing(self, alertname: str) -> list[Json]:
        """The alerts of that name currently firing."""
        return [
            a
            for a in self.alerts()
            if a["labels"].get("alertname") == alertname and a["state"] == "firing"
        ]

    def rule_groups(self) -> list[Json]:
        """Loaded rule groups, each with its rules' health and last error."""
        return list(self._data("/api/v1/rules")["groups"])

    def targets(self) -> list[Json]:
        """Active scrape targets."""
        return list(self._data("/api/v1/targets", state="active")["activeTargets"])

    def wait_for_targets_up(self, timeout: float = 30.0) -> list[Json]:
        """Wait until every configured target has been scraped successfully."""
        deadline = time.monotonic() + timeout
        targets: list[Json] = []
        while time.monotonic() < deadline:
            targets = self.targets()
            if len(targets) == len(self.scrape_targets) and all(
                t["health"] == "up" for t in targets
            ):
                return targets
            time.sleep(_POLL)
        raise AssertionError(
            f"targets not up after {timeout:g}s: "
            f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}\n"
            f"prometheus log:\n{self.log()}"
        )

    def wait_for_alert(
        self, alertname: str, *, state: str = "firing", timeout: float = 30.0
    ) -> list[Json]:
        """Wait until an alert of that name is in `state`; return those alerts."""
        deadline = time.monotonic() + timeout
        seen: list[Json] = []
        while time.monotonic() < deadline:
            seen = self.alerts()
            matching = [
                a for a in seen if a["labels"].get("alertname") == alertname and a["state"] == state
            ]
            if matching:
                return matching
            time.sleep(_POLL)
        raise AssertionError(
            f"{alertname} not {state} after {timeout:g}s; active alerts: {seen}\n"
            f"prometheus log:\n{self.log()}"
        )


def _as_series(data: Json) -> list[Json]:
    if data["resultType"] in ("vector", "matrix"):
        return list(data["result"])
    return [{"metric": {}, "value": data["result"]}]  # scalar or string


class AM(_Server):
    """A running Alertmanager."""

    name = "alertmanager"

    def __init__(self, workdir: Path, config: Path) -> None:
        binary = require_binary(ALERTMANAGER)
        storage = workdir / "data"
        super().__init__(
            workdir,
            lambda port: [
                binary,
                f"--config.file={config}",
                f"--storage.path={storage}",
                f"--web.listen-address={HOST}:{port}",
                "--cluster.listen-address=",  # no gossip: a single, private instance
                "--log.level=debug",  # it logs each notification attempt: useful on failure
            ],
        )

    def alerts(self) -> list[Json]:
        """Alerts Alertmanager holds (API v2)."""
        self.check_running()
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as response:
            return list(json.load(response))


def _write_yaml(path: Path, document: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False))
    return path


def _host_port(target: str) -> str:
    """'http://127.0.0.1:19808/' or '127.0.0.1:19808' -> '127.0.0.1:19808'."""
    parsed = urllib.parse.urlsplit(target if "//" in target else f"//{target}")
    return parsed.netloc


@contextlib.contextmanager
def running_prometheus(
    workdir: Path,
    *,
    scrape_targets: list[str],
    rule_files: list[Path],
    alertmanager_url: str | None,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    job: str = "deadlock-agent",
) -> Iterator[Prom]:
    """Run Prometheus scraping `scrape_targets` (job `job`), evaluating `rule_files`, sending
    alerts to `alertmanager_url`; raise if a rule file does not load."""
    workdir.mkdir(parents=True, exist_ok=True)
    config: Json = {
        "global": {
            "scrape_interval": scrape_interval,
            # Must not exceed the interval (the 10 s default would, and is a config error).
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [_host_port(t) for t in scrape_targets]}],
            }
        ],
    }
    if alertmanager_url is not None:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [_host_port(alertmanager_url)]}]}]
        }
    config_path = _write_yaml(workdir / "prometheus.yml", config)
    prom: Prom | None = None
    try:
        prom = Prom(workdir, config_path, scrape_targets=scrape_targets)
        bad = [
            (rule["name"], rule.get("lastError"))
            for group in prom.rule_groups()
            for rule in group["rules"]
            if rule.get("health") == "err"
        ]
        if bad:
            raise RuntimeError(f"rules failed to evaluate: {bad}\nlog:\n{prom.log()}")
        yield prom
    finally:
        if prom is not None:
            prom.stop()


@contextlib.contextmanager
def running_alertmanager(workdir: Path, *, slack_url: str) -> Iterator[AM]:
    """Run Alertmanager routing every alert to one Slack receiver posting to `slack_url`."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "route": {
            "receiver": "slack",
            # One notification group per alert and instance, flushed within a second or two.
            "group_by": ["alertname", "instance"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "slack",
                "slack_configs": [
                    {"api_url": slack_url, "channel": "#alerts", "send_resolved": True}
                ],
            }
        ],
    }
    config_path = _write_yaml(workdir / "alertmanager.yml", config)
    am: AM | None = None
    try:
        am = AM(workdir, config_path)
        yield am
    finally:
        if am is not None:
            am.stop()


# --- a fake Slack -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """How FakeSlack answers one request: status, body, extra headers, after a delay."""

    status: int = 200
    body: bytes = b"ok"
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0

    @classmethod
    def retry_after(cls, seconds: float | str, status: int = 429) -> Response:
        """Slack's rate limiting: 429 with a Retry-After header."""
        return cls(status=status, body=b"rate_limited", headers={"Retry-After": str(seconds)})


@dataclass(frozen=True)
class Post:
    """One request FakeSlack received."""

    path: str
    headers: Mapping[str, str]
    body: bytes
    received_at: float  # time.time()
    answered: Response

    @property
    def json(self) -> Any:
        """The body parsed as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def text(self) -> str:
        """A Slack payload's top-level "text" ("" when there is none)."""
        payload = self.json
        if isinstance(payload, dict) and isinstance(payload.get("text"), str):
            return str(payload["text"])
        return ""


class FakeSlack:
    """A threaded loopback HTTP server standing in for Slack's incoming webhooks.

    It records every POST (path, headers, body) in `posts` and answers from scripted responses:
    first those queued for the request's path, then those queued for any path, else 200 "ok".
    """

    def __init__(self) -> None:
        self.posts: list[Post] = []
        self._changed = threading.Condition()
        self._any: queue.SimpleQueue[Response] = queue.SimpleQueue()
        self._by_path: dict[str, queue.SimpleQueue[Response]] = {}
        self._server = http.server.ThreadingHTTPServer((HOST, 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-slack", daemon=True
        )

    def __enter__(self) -> FakeSlack:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def url_for(self, path: str) -> str:
        """The webhook URL for a path, e.g. url_for("/agent")."""
        return self.url + path

    def enqueue(self, *responses: Response, path: str | None = None) -> None:
        """Answer the next requests (to `path`, or to any path) with these, in order."""
        target = self._any if path is None else self._by_path.setdefault(path, queue.SimpleQueue())
        for response in responses:
            target.put(response)

    def posts_to(self, path: str) -> list[Post]:
        """The POSTs received on a path so far."""
        with self._changed:
            return [p for p in self.posts if p.path == path]

    def wait_for(
        self, predicate: Callable[[Post], bool], timeout: float, *, count: int = 1
    ) -> list[Post]:
        """Wait until `count` POSTs satisfy `predicate`; return all that do."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matching = [p for p in self.posts if predicate(p)]
                remaining = deadline - time.monotonic()
                if len(matching) >= count:
                    return matching
                if remaining <= 0:
                    raise AssertionError(
                        f"FakeSlack: {len(matching)} of {count} expected POSTs after {timeout:g}s;"
                        f" received:\n{self.describe()}"
                    )
                self._changed.wait(remaining)

    def describe(self) -> str:
        """Every POST so far, one per line (for assertion messages)."""
        return (
            "\n".join(f"  {p.path} -> {p.answered.status}: {p.body[:300]!r}" for p in self.posts)
            or "  (none)"
        )

    def _next_response(self, path: str) -> Response:
        for source in (self._by_path.get(path), self._any):
            if source is not None:
                with contextlib.suppress(queue.Empty):
                    return source.get_nowait()
        return Response()

    def _record(self, post: Post) -> None:
        with self._changed:
            self.posts.append(post)
            self._changed.notify_all()

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self._body()
                path = urllib.parse.urlsplit(self.path).path
                response = fake._next_response(path)
                fake._record(
                    Post(
                        path=path,
                        headers=dict(self.headers.items()),
                        body=body,
                        received_at=time.time(),
                        answered=response,
                    )
                )
                if response.delay:
                    time.sleep(response.delay)
                self.send_response(response.status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(response.body)))
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(response.body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline().strip():  # trailers, up to the empty line
                    pass
                return b"".join(chunks)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("fake slack: %s", format % args)

        return Handler
