"""The network and database entries of the catalog (agent/signatures.d/20-network.toml,
30-database.toml) on real captures: each entry matches its reproduction, and its near miss (the
same call with a timeout, an intentional wait, an idle consumer) matches nothing. Every thread is
given what /proc/PID/task/TID/syscall showed during the capture (tests/fixtures/pyspy/README.md),
parsed as the agent parses it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from builders import fixture

from agent.analysis import AnalysisSettings, IncidentBook, Tracker
from agent.procfs import parse_syscall, syscall_name
from agent.signatures import Candidate, load_catalog
from agent.types import (
    HangClass,
    ProcSample,
    StackSnapshot,
    ThreadActivity,
    WorkerState,
)

CATALOG = load_catalog()
BY_NAME = {s.name: s for s in CATALOG.signatures}
OURS = (
    "http_read_no_timeout", "tls_handshake_stall", "dns_resolution_stall", "urllib3_pool_blocked",
    "aws_credential_refresh_wait", "pg_lock_wait", "libpq_network_stall", "db_pool_exhausted",
    "redis_no_socket_timeout", "mysql_no_read_timeout",
)  # fmt: skip

# /proc/PID/task/TID/syscall of the threads that were not idle, read just before each dump.
RECV_NO_TIMEOUT = "45 0xb 0x7f6c24005da0 0x2000 0x0 0x0 0x0 0x7f6c2abe8940 0x7f6c30328974"
POLL_600S = "7 0x7f7dbd9e89a8 0x1 0x927c0 0x0 0x0 0x0 0x7f7dbd9e8940 0x7f7dc311a26f"
PROC: dict[str, dict[int, str]] = {
    "http_read_no_timeout": {14263: RECV_NO_TIMEOUT},
    "http_read_no_timeout_near_timeout": {14409: POLL_600S},
    "tls_handshake_stall": {
        14555: "0 0xb 0x7f1ac011f813 0x5 0x7f1acaa8f1e0 0x0 0x0 0x7f1ac5ee8740 0x7f1acb5162ec"},
    "tls_handshake_stall_near_timeout": {
        14563: "7 0x7f171b2e8b68 0x1 0x927c0 0x0 0x0 0x0 0x7f171b2e8b10 0x7f17210bb26f"},
    "dns_resolution_stall": {
        16161: "7 0x7fe3c64e7218 0x1 0x1388 0x0 0x0 0x6b09d9a0 0x7fe3c64e70d0 0x7fe3cbb1a26f"},
    "urllib3_pool_blocked": {
        14978: "202 0x7f18f0002190 0x189 0x0 0x0 0x0 0xffffffff 0x7f18f68e9030 0x7f18fbea3f16"},
    "urllib3_pool_blocked_near_pool_timeout": {
        14996: "202 0x7f3184000ba0 0x89 0x0 0x7f318c5e97f0 0x0 0xffffffff 0x7f318c5e9740 "
               "0x7f3191ca3f16"},
    "aws_credential_refresh_wait": {
        15018: "202 0x7ff874039680 0x189 0x0 0x0 0x0 0xffffffff 0x7ff87a9e7740 0x7ff8810a3f16",
        15016: "202 0x7ff874039680 0x189 0x0 0x0 0x0 0xffffffff 0x7ff87b1e8740 0x7ff8810a3f16",
        15013: "7 0x7ff87b9e9298 0x1 0x927c0 0x0 0x0 0x0 0x7ff87b9e9230 0x7ff88111a26f"},
    "aws_credential_refresh_wait_near_refresher_alone": {
        15025: "7 0x7fc3323e9298 0x1 0x927c0 0x0 0x0 0x0 0x7fc3323e9230 0x7fc337b1a26f"},
    "pg_lock_wait": {
        15294: "7 0x7f72f9be9678 0x1 0xffffffff 0x0 0x0 0x0 0x7f72f9be9630 0x7f72ff31a26f"},
    "pg_lock_wait_near_listen": {
        15322: "270 0xc 0x7f45e84dd6f0 0x0 0x0 0x7f45e84dd620 0x0 0x7f45e84dd610 0x7f45edb1c9ec"},
    "libpq_network_stall": {
        15499: "7 0x7f78188fe478 0x1 0xffffffff 0x4000 0x0 0x0 0x7f78188fe430 0x7f781df1a26f"},
    "db_pool_exhausted": {
        15790: "202 0x55ab95bb0840 0x89 0x0 0x7f6fc5efe4e0 0x0 0xffffffff 0x7f6fc5efe430 "
               "0x7f6fcb6a3f16"},
    "db_pool_exhausted_near_queue_consumer": {
        17513: "202 0x7fe434000ba0 0x189 0x0 0x0 0x0 0xffffffff 0x7fe4421e88c0 0x7fe4480a3f16",
        17511: "202 0x55ac7df67720 0x189 0x0 0x0 0x0 0xffffffff 0x7fe4429e9950 0x7fe4480a3f16"},
    "redis_no_socket_timeout": {
        14625: "45 0xb 0x7f1eb000a190 0x8000 0x0 0x0 0x0 0x7f1eb6ce9440 0x7f1ebc328974"},
    "redis_no_socket_timeout_near_timeout": {
        14694: "7 0x7f7d49ee94a8 0x1 0x927c0 0x0 0x0 0x0 0x7f7d49ee9440 0x7f7d4f51a26f"},
    "mysql_no_read_timeout": {
        14848: "45 0xb 0x7f2808046730 0x2000 0x0 0x0 0x0 0x7f280f4e9190 0x7f2814b28974"},
    "mysql_no_read_timeout_near_timeout": {
        14923: "7 0x7fbdd7ee91f8 0x1 0x927c0 0x0 0x0 0x0 0x7fbdd7ee9190 0x7fbddd51a26f"},
}  # fmt: skip
# The seed fixtures' waits (tests/fixtures/pyspy/README.md): libpq in poll(fd, 1, -1), the
# harvest thread's handshake in read(fd, buf, 5) with no timeout.
POLL_FOREVER = "7 0x7ffd5e0 0x1 0xffffffff 0x0 0x0 0x0 0x7ffd5a8 0x7f3c1e2d"
TLS_READ = "0 0xb 0x7f1ac011f813 0x5 0x7f1acaa8f1e0 0x0 0x0 0x7f1ac5ee8740 0x7f1acb5162ec"


def reading(tid: int, line: str | None) -> ThreadActivity:
    """A /proc reading of one blocked thread, from its syscall line (None: not read)."""
    number, point, timed = parse_syscall(line) if line else (None, None, False)
    return ThreadActivity(
        tid=tid, start_ticks=1, comm="gunicorn", state="S", cpu_ns=0, runs=0, syscall=number,
        wchan=None, blocked_at=point, timed_wait=timed, syscall_name=syscall_name(number),
    )  # fmt: skip


def seed_lines(snap: StackSnapshot) -> dict[int, str]:
    lines = {}
    for t in snap.threads:
        names = {f.function for f in t.frames}
        if "PQconnectdb" in names or any(f.file.endswith("psycopg2/__init__.py") for f in t.frames):
            lines[t.tid] = POLL_FOREVER
        elif "SSLSocket.do_handshake" in names:
            lines[t.tid] = TLS_READ
    return lines


def candidates(name: str, lines: dict[int, str] | None = None) -> list[Candidate]:
    """Each thread with its /proc reading, stuck unless an idle rule says it waits for work."""
    snap = fixture(name)
    lines = PROC.get(name.rsplit(".", 1)[0], {}) if lines is None else lines
    return [
        Candidate(t, reading(t.tid, lines.get(t.tid)), stuck=CATALOG.idle_rule(t) is None)
        for t in snap.threads
    ]


def matched(name: str, lines: dict[int, str] | None = None) -> set[str]:
    pool = candidates(name, lines)
    return {s.name for s in CATALOG.signatures if CATALOG.assign_roles(s, pool) is not None}


def test_the_catalog_has_every_entry_with_its_class_remedy_and_references() -> None:
    classes = {name: BY_NAME[name].hang_class for name in OURS}
    assert classes == {
        **dict.fromkeys(OURS, HangClass.STALL),
        "dns_resolution_stall": HangClass.BOUNDED_STALL,
        "aws_credential_refresh_wait": HangClass.BOUNDED_STALL,
        "db_pool_exhausted": HangClass.BOUNDED_STALL,
    }
    for name in OURS:
        sig = BY_NAME[name]
        assert sig.remedy and sig.summary and sig.references, name
        assert all(r.startswith("https://") for r in sig.references), name


@pytest.mark.parametrize("entry", OURS)
@pytest.mark.parametrize("view", ["native", "python"])
def test_each_entry_matches_its_real_capture_and_nothing_else_does(entry: str, view: str) -> None:
    expected = {entry}
    if entry == "pg_lock_wait" and view == "python":
        # psycopg2 is C: without native frames the waiting thread's innermost frame is the
        # caller's own code; the agent dumps suspects natively (the native fixture matches).
        expected = set()
    assert matched(f"{entry}.{view}") == expected


NEAR_MISSES = [
    "http_read_no_timeout_near_timeout",  # requests timeout=(5, 600): poll(fd, 1, 600000)
    "tls_handshake_stall_near_timeout",  # the handshake with a timeout: poll in PySSL_select
    "redis_no_socket_timeout_near_timeout",  # socket_timeout=600
    "mysql_no_read_timeout_near_timeout",  # read_timeout=600
    "urllib3_pool_blocked_near_pool_timeout",  # pool_timeout=600: futex op 0x89, timed
    "pg_lock_wait_near_listen",  # a LISTEN loop in select(): an intentional wait
    "db_pool_exhausted_near_queue_consumer",  # a stdlib queue consumer waiting for work
    "aws_credential_refresh_wait_near_refresher_alone",  # one refresher, nobody waiting on it
]


@pytest.mark.parametrize("name", NEAR_MISSES)
@pytest.mark.parametrize("view", ["native", "python"])
def test_near_misses_match_nothing(name: str, view: str) -> None:
    assert matched(f"{name}.{view}") == set()


def test_near_misses_match_nothing_even_if_every_thread_were_stuck() -> None:
    for name in NEAR_MISSES:
        snap = fixture(f"{name}.native")
        lines = PROC[name]
        pool = [Candidate(t, reading(t.tid, lines.get(t.tid)), stuck=True) for t in snap.threads]
        found = {s.name for s in CATALOG.signatures if CATALOG.assign_roles(s, pool) is not None}
        # The refresher alone is in an HTTP read with a 600 s timeout: no entry of ours either.
        assert found == set(), name


def test_without_a_syscall_reading_the_no_timeout_entries_claim_nothing() -> None:
    # "No timeout" is read from /proc; a thread whose syscall is unknown is not called forever.
    for entry in ("http_read_no_timeout", "tls_handshake_stall", "redis_no_socket_timeout",
                  "mysql_no_read_timeout", "urllib3_pool_blocked",
                  "libpq_network_stall"):  # fmt: skip
        assert matched(f"{entry}.native", lines={}) == set(), entry


def test_a_timed_wait_read_as_restart_syscall_after_a_dump_still_matches() -> None:
    # Cross-cutting fact 3: ptrace turns a timed futex/poll into restart_syscall (219).
    restarted = "219 0x55ab95bb0840 0x89 0x0 0x7f6fc5efe4e0 0x0 0xffffffff 0x7f6fc5efe430 0x7f6f"
    assert matched("db_pool_exhausted.native", {15790: restarted}) == {"db_pool_exhausted"}
    dns = "219 0x7fe3c64e7218 0x1 0x1388 0x0 0x0 0x6b09d9a0 0x7fe3c64e70d0 0x7fe3cbb1a26f"
    assert matched("dns_resolution_stall.native", {16161: dns}) == {"dns_resolution_stall"}


@pytest.mark.parametrize("view", ["native", "python"])
def test_the_seed_deadlock_keeps_its_name_alone(view: str) -> None:
    name = f"libpq_ssl_with_https.{view}"
    assert matched(name, seed_lines(fixture(name))) == {"libpq_ssl_with_https"}


@pytest.mark.parametrize("view", ["native", "python"])
def test_libpq_stuck_connecting_alone_is_a_network_stall(view: str) -> None:
    name = f"libpq_alone.{view}"
    assert matched(name, seed_lines(fixture(name))) == {"libpq_network_stall"}


def test_aws_roles_name_the_waiters_and_the_refresher() -> None:
    sig = BY_NAME["aws_credential_refresh_wait"]
    pool = candidates("aws_credential_refresh_wait.native")
    assigned = CATALOG.assign_roles(sig, pool)
    assert assigned is not None
    roles = dict(zip((r.name for r in sig.roles), (pool[i].stack.tid for i in assigned),
                     strict=True))  # fmt: skip
    assert roles["refresher"] == 15013
    assert roles["waiter"] in (15016, 15018)


SETTINGS = AnalysisSettings(stuck_after=5, suspect_after=2)


def judge(name: str, lines: dict[int, str]) -> tuple[WorkerState, list[str], list[str]]:
    """The real tracker's verdict on a capture, with each thread as /proc showed it and no
    progress since: (worker state, finding names, incident remedies)."""
    snap = fixture(name, at=2)
    tracker = Tracker(CATALOG, SETTINGS)
    tracker.retain([snap.worker])
    acts = tuple(reading(t.tid, lines.get(t.tid)) for t in snap.threads)
    tracker.observe_proc(ProcSample(snap.worker, 0.0, acts))
    tracker.observe_stacks(snap)
    tracker.observe_proc(replace(ProcSample(snap.worker, 10.0, ()), tids=frozenset(
        t.tid for t in snap.threads)))  # fmt: skip
    (report,) = tracker.judge(10.0)
    # A stall is an incident once it has lasted --stuck-incident-after (here: stuck-after).
    opened, _ = IncidentBook(stuck_incident_after=SETTINGS.stuck_after).update([report], 10.0)
    return (report.state, sorted(f.signature.name for f in report.findings),
            [i.remedy for i in opened])  # fmt: skip


@pytest.mark.parametrize("entry", OURS)
def test_the_tracker_calls_each_capture_stuck_with_its_cause_and_remedy(entry: str) -> None:
    state, findings, remedies = judge(f"{entry}.native", PROC[entry])
    assert state is WorkerState.STUCK
    assert findings == [entry]
    assert remedies == [BY_NAME[entry].remedy]


def test_the_tracker_still_calls_the_seed_deadlocked_by_its_own_name() -> None:
    snap = fixture("libpq_ssl_with_https.native")
    state, findings, _ = judge("libpq_ssl_with_https.native", seed_lines(snap))
    assert state is WorkerState.DEADLOCKED
    assert findings == ["libpq_ssl_with_https"]


def test_a_named_stall_is_an_incident_only_after_stuck_incident_after() -> None:
    """A 20 s query is named (pg_lock_wait: a long query looks the same from the client) but
    posts nothing until it has lasted --stuck-incident-after; a deadlock opens one at once."""
    snap = fixture("pg_lock_wait.native", at=2)
    tracker = Tracker(CATALOG, SETTINGS)
    tracker.retain([snap.worker])
    acts = tuple(reading(t.tid, PROC["pg_lock_wait"].get(t.tid)) for t in snap.threads)
    tracker.observe_proc(ProcSample(snap.worker, 0.0, acts))
    tracker.observe_stacks(snap)
    book = IncidentBook(stuck_incident_after=60.0)
    for now in (10.0, 30.0, 59.0):
        tracker.observe_proc(replace(ProcSample(snap.worker, now, ()), tids=frozenset(
            t.tid for t in snap.threads)))  # fmt: skip
        (report,) = tracker.judge(now)
        assert [f.signature.name for f in report.findings] == ["pg_lock_wait"]
        assert book.update([report], now) == ([], [])
    tracker.observe_proc(replace(ProcSample(snap.worker, 61.0, ()), tids=frozenset(
        t.tid for t in snap.threads)))  # fmt: skip
    (report,) = tracker.judge(61.0)
    opened, _ = book.update([report], 61.0)
    assert [i.signature_name for i in opened] == ["pg_lock_wait"]
    assert book.totals == {} and book.named == {"pg_lock_wait": 1}  # not a deadlock
