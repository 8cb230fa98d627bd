"""The Pushgateway wrapper, and l2met log lines: for platforms where nobody can scrape one dyno.

On Heroku the router picks a dyno at random, so a Prometheus cannot reach one dyno's /metrics:
the agent pushes its registry instead (PUT, replacing its group) on an interval, from a thread of
its own (the sampling loop never waits on it), with a short timeout. Its group is
`{job="deadlock-agent", instance=<$DYNO or host name>}`; on a clean shutdown the group is
deleted, because the Pushgateway never forgets one by itself (no TTL, prometheus/pushgateway#19).
The gateway URL may carry credentials (userinfo): they go into a basic-auth header and never
appear in logs, metrics or errors. With l2met on, the same interval also writes one
`sample#…`/`count#…` line to stderr for Heroku log-drain users.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Mapping
from functools import partial
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, delete_from_gateway, push_to_gateway
from prometheus_client.exposition import basic_auth_handler, default_handler
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

JOB = "deadlock-agent"
RESULTS = ("ok", "timeout", "connection", "rejected", "server_error", "error")
FIRST_PUSH_AFTER = 2.0  # seconds: let the first sampling cycle finish before the first push
# Heroku splits log lines longer than 10000 bytes (devcenter "Limits", Logplex); ours are far
# shorter, and a long $DYNO or host name is cut rather than let a line be split.
L2MET_MAX = 10000
SOURCE_MAX = 200


# --- the gateway URL ---------------------------------------------------------------------------


def gateway_url(text: str) -> str:
    """An http(s) URL with a host; credentials in it are allowed. Raises ValueError."""
    try:
        parts = urlsplit(text.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("must be an http:// or https:// URL with a host") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a ?query or #fragment")
    return text.strip()


def _without_userinfo(parts: SplitResult) -> str:
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact(url: str) -> str:
    """The URL without user name and password: what logs may say."""
    return _without_userinfo(urlsplit(url))


def grouping_key(instance: str) -> dict[str, str]:
    """The group's labels besides job: the dyno ($DYNO, e.g. web.1) or host name."""
    return {"instance": instance}


# --- outcomes ----------------------------------------------------------------------------------


class PushStats:
    """Push outcomes by result and the time of the last good push, read at scrape time."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter(dict.fromkeys(RESULTS, 0))
        self._last_ok: float | None = None
        self._lock = threading.Lock()

    def count(self, result: str, *, at: float) -> None:
        """Add one outcome (at: Unix time)."""
        with self._lock:
            self._counts[result] += 1
            if result == "ok":
                self._last_ok = at

    def snapshot(self) -> tuple[dict[str, int], float | None]:
        """({result: count}, every result present; Unix time of the last good push or None)."""
        with self._lock:
            return dict(self._counts), self._last_ok


def classify(err: BaseException) -> tuple[str, str]:
    """(result label, cause for the log) of a failed request: never the URL or its userinfo."""
    if isinstance(err, urllib.error.HTTPError):
        result = "rejected" if err.code < 500 else "server_error"
        return result, f"HTTP {err.code}"
    reason: object = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return "timeout", "timed out"
    if isinstance(reason, OSError):
        return "connection", type(reason).__name__  # refused, reset, DNS (gaierror), TLS
    if isinstance(reason, BaseException):
        return "error", type(reason).__name__
    return "error", type(err).__name__  # a URLError whose reason is text


# --- l2met -------------------------------------------------------------------------------------

# (key in the line, sample name, labels): instantaneous values, logged as sample#.
L2MET_SAMPLES: tuple[tuple[str, str, Mapping[str, str]], ...] = (
    ("up", "deadlock_agent_up", {}),
    ("masters", "deadlock_agent_masters", {}),
    ("workers_ok", "deadlock_agent_workers", {"state": "ok"}),
    ("workers_stuck", "deadlock_agent_workers", {"state": "stuck"}),
    ("workers_deadlocked", "deadlock_agent_workers", {"state": "deadlocked"}),
    ("workers_spinning", "deadlock_agent_workers", {"state": "spinning"}),
    ("threads_stuck", "deadlock_agent_threads", {"state": "stuck"}),
    ("request_capacity_ratio", "deadlock_agent_request_capacity_ratio", {}),
)
L2MET_UNITS = {"oldest_stuck_thread": "s"}
# Counters, logged as count# of their increase since the last line (l2met sums counts).
L2MET_COUNTS: tuple[tuple[str, str, Callable[[Mapping[str, str]], bool]], ...] = (
    ("incidents", "deadlock_agent_hangs_detected_total", lambda labels: True),
    ("sample_errors", "deadlock_agent_sample_errors_total",
     lambda labels: labels.get("reason") not in ("vanished", "native_unwind")),
)  # fmt: skip


def l2met_values(registry: Collector) -> dict[str, float]:
    """The values an l2met line reports, from one collection of the registry."""
    wanted = {(name, tuple(sorted(labels.items()))): key for key, name, labels in L2MET_SAMPLES}
    values: dict[str, float] = {}
    for family in registry.collect():
        for s in family.samples:
            key = wanted.get((s.name, tuple(sorted(s.labels.items()))))
            if key is not None:
                values[key] = s.value
            if s.name == "deadlock_agent_oldest_stuck_thread_seconds":
                values["oldest_stuck_thread"] = s.value
            for count_key, name, include in L2MET_COUNTS:
                if s.name == name and include(s.labels):
                    values[count_key] = values.get(count_key, 0.0) + s.value
    return values


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}".rstrip("0")


def l2met_line(values: Mapping[str, float], previous: Mapping[str, float], *, source: str) -> str:
    """One log line in the l2met convention (github.com/ryandotsmith/l2met/wiki/Usage). Pure.

    sample# for gauges, count# for the increase of each counter since `previous` (a counter
    that went down, a restart, counts from zero); source= names the dyno."""
    parts = []
    for key, _, _ in L2MET_SAMPLES:
        if key in values:
            parts.append(f"sample#deadlock_agent.{key}={_number(values[key])}")
    if "oldest_stuck_thread" in values:
        parts.append(f"sample#deadlock_agent.oldest_stuck_thread="
                     f"{_number(values['oldest_stuck_thread'])}s")  # fmt: skip
    for key, _, _ in L2MET_COUNTS:
        if key in values:
            now, before = values[key], previous.get(key, 0.0)
            increase = now - before if now >= before else now
            parts.append(f"count#deadlock_agent.{key}={_number(increase)}")
    clean = "".join(c if c.isprintable() and not c.isspace() else "_" for c in source)
    parts.append(f"source={clean[:SOURCE_MAX] or 'unknown'}")
    return " ".join(parts)


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# --- the pusher --------------------------------------------------------------------------------


class Pusher:
    """Pushes `registry` to a Pushgateway (and/or logs an l2met line) every `interval` seconds
    from a daemon thread; `close()` stops it and deletes the group, both within a bound."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        instance: str,
        gateway: str | None = None,
        interval: float = 15.0,
        timeout: float = 3.0,
        l2met: bool = False,
        job: str = JOB,
        first_push_after: float = FIRST_PUSH_AFTER,
        emit: Callable[[str], None] = _stderr,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.instance = instance
        self.job = job
        self.interval = interval
        self.timeout = timeout
        self.l2met = l2met
        self.first_push_after = min(first_push_after, interval)
        self.stats = PushStats()
        self._emit = emit
        self._clock = clock
        self._gateway: str | None = None
        self._handler: Callable[..., Callable[[], None]] = default_handler
        self.where: str | None = None  # the gateway without credentials, for logs
        if gateway is not None:
            parts = urlsplit(gateway)
            self._gateway = _without_userinfo(parts)
            self.where = self._gateway
            if parts.username is not None:
                self._handler = partial(
                    _auth_handler, username=unquote(parts.username),
                    password=unquote(parts.password or ""),
                )  # fmt: skip
        self._stop = threading.Event()
        self._failing: set[str] = set()  # causes logged since the last good push
        self._failures = 0
        self._previous: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="pusher", daemon=True)

    @property
    def group(self) -> str:
        """The group's path on the gateway, for logs and runbooks."""
        key = "".join(f"/{k}/{v}" for k, v in sorted(grouping_key(self.instance).items()))
        return f"/metrics/job/{self.job}{key}"

    def start(self) -> None:
        """Start the background thread."""
        if self._gateway is not None:
            log.info("pushing metrics to %s%s every %gs (timeout %gs)",
                     self.where, self.group, self.interval, self.timeout)  # fmt: skip
        if self.l2met:
            log.info("logging an l2met line every %gs (source=%s)", self.interval, self.instance)
        self._thread.start()

    def close(self) -> None:
        """Stop pushing and delete the group: at most one push and one delete, each within
        the timeout, so this returns within about 2 x timeout (the thread is a daemon)."""
        self._stop.set()
        if not self._thread.is_alive():
            return
        self._thread.join(2 * self.timeout + 1.0)
        if self._thread.is_alive():
            log.warning("pushgateway did not answer in time at shutdown; group %s may be left on "
                        "%s", self.group, self.where)  # fmt: skip

    def push_once(self) -> None:
        """One push (and l2met line); outcomes counted, never raises."""
        if self.l2met:
            try:
                values = l2met_values(self.registry)
                self._emit(l2met_line(values, self._previous, source=self.instance))
                self._previous = values
            except Exception:  # a log line must never stop the pushes
                log.exception("l2met line failed; continuing")
        if self._gateway is None:
            return
        try:
            push_to_gateway(self._gateway, job=self.job, registry=self.registry,
                            grouping_key=grouping_key(self.instance), timeout=self.timeout,
                            handler=self._handler)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - counted and logged by cause; the loop goes on
            result, cause = classify(err)
            self.stats.count(result, at=self._clock())
            self._failures += 1
            if cause not in self._failing:
                self._failing.add(cause)
                log.warning("push to %s failed (%s); counting failures, retrying every %gs",
                            self.where, cause, self.interval)  # fmt: skip
            return
        self.stats.count("ok", at=self._clock())
        if self._failing:
            log.info("push to %s works again after %d failed", self.where, self._failures)
            self._failing.clear()
            self._failures = 0

    def delete(self) -> bool:
        """Delete the group; True when the gateway said so. Never raises."""
        if self._gateway is None:
            return True
        try:
            delete_from_gateway(self._gateway, job=self.job,
                                grouping_key=grouping_key(self.instance), timeout=self.timeout,
                                handler=self._handler)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - shutting down: say so and go on
            log.warning("could not delete group %s from %s (%s): it stays there until deleted "
                        "(curl -X DELETE)", self.group, self.where, classify(err)[1])  # fmt: skip
            return False
        log.info("deleted group %s from %s", self.group, self.where)
        return True

    def _run(self) -> None:
        due = time.monotonic() + self.first_push_after
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            due = max(due + self.interval, time.monotonic())
            try:
                self.push_once()
            except Exception:  # the pusher thread must outlive any surprise
                log.exception("pusher failed; continuing")
        if self._gateway is not None:
            self.delete()


def _auth_handler(
    url: str,
    method: str,
    timeout: float | None,
    headers: list[tuple[str, str]],
    data: bytes,
    *,
    username: str,
    password: str,
) -> Callable[[], None]:
    """prometheus_client's basic-auth handler with the URL's userinfo."""
    handler: Callable[[], None] = basic_auth_handler(
        url, method, timeout, headers, data, username=username, password=password
    )
    return handler
