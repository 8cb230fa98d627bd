"""agent.versions: versions from mapped file names, and the note on the seed's hang. Pure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.versions import (
    Versions,
    dist_version,
    driver_dirs,
    libpq_major,
    mapped_files,
    openssl_family,
    parse_versions,
    tls_note,
)

SITE = "/v/site-packages"
# Lines of a real /proc/PID/maps of a gunicorn gthread worker running agent.demo.app
# (psycopg2-binary 2.9.13, CPython 3.11.7 from pyenv), trimmed to one line per file.
MAPS = f"""\
55d0c0a00000-55d0c0a01000 r--p 00000000 00:2f 1835 /root/.pyenv/versions/3.11.7/bin/python3.11
7f1c0000-7f1c0021 rw-p 00000000 00:00 0
7f1c000000-7f1c0a0000 r-xp 00010000 00:2f 2001 {SITE}/psycopg2_binary.libs/libpq-a17e3caa.so.5.17
7f1c100000-7f1c180000 r-xp 00020000 00:2f 2002 {SITE}/psycopg2_binary.libs/libssl-8bd944e8.so.3
7f1c200000-7f1c400000 r-xp 00050000 00:2f 2003 {SITE}/psycopg2_binary.libs/libcrypto-fb8d5b21.so.3
7f1c500000-7f1c540000 r-xp 10000 00:2f 2004 {SITE}/psycopg2/_psycopg.cpython-311-x86_64-linux-gnu.so
7f1c600000-7f1c680000 r-xp 00020000 08:01 3001 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c700000-7f1c900000 r-xp 00050000 08:01 3002 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f1ca00000-7f1cc00000 r-xp 00100000 00:2f 1900 /root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0
7f1cd00000-7f1cd01000 r-xp 00000000 00:2f 1901 /root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0
7ffd5e000000-7ffd5e021000 rw-p 00000000 00:00 0                          [stack]
"""


def test_mapped_files_are_each_path_once_without_pseudo_mappings() -> None:
    files = mapped_files(MAPS + "7f00-7f01 r--p 0 00:2f 9 /tmp/gone.so (deleted)\n")
    assert files[0] == "/root/.pyenv/versions/3.11.7/bin/python3.11"
    assert files.count("/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0") == 1
    assert "[stack]" not in files and "/tmp/gone.so" in files
    assert len(files) == 9


def test_a_real_psycopg2_binary_worker() -> None:
    files = mapped_files(MAPS)
    assert driver_dirs(files) == {"psycopg2": SITE}
    listing = ["psycopg2", "psycopg2_binary-2.9.13.dist-info", "psycopg2_binary.libs", "six.py"]
    v = parse_versions(files, {SITE: listing})
    assert v.as_dict() == {
        "libpq": "17", "openssl": "3", "libpq_openssl": "3", "psycopg2": "2.9.13",
        "cpython": "3.11",
    }  # fmt: skip
    assert v.lock_callbacks_possible is False
    assert v.files["libpq"].endswith("libpq-a17e3caa.so.5.17")


@pytest.mark.parametrize(
    ("soname", "family"),
    [("3", "3"), ("1.1", "1.1"), ("1.0.0", "1.0"), ("1.0.2", "1.0"), ("10", "1.0"),
     ("0.9.8", "0.9.8")],
    ids=["openssl3", "1.1", "debian-1.0.0", "1.0.2", "rhel7-libssl.so.10", "0.9.8"],
)  # fmt: skip
def test_openssl_soname_families(soname: str, family: str) -> None:
    assert openssl_family(soname) == family


@pytest.mark.parametrize(
    ("minor", "major"),
    [(17, "17"), (10, "10"), (9, "9.6"), (8, "9.5"), (3, "9.0"), (2, "8.4")],
    ids=["17", "10", "9.6", "9.5", "9.0", "8.4"],
)
def test_libpq_soname_minor_is_the_postgresql_release(minor: int, major: str) -> None:
    assert libpq_major(minor) == major


def test_the_openssl_beside_libpq_is_the_one_it_uses() -> None:
    """A wheel's libpq with its own old OpenSSL, next to the system's OpenSSL 3."""
    v = parse_versions((
        "/usr/bin/python3.8",
        f"{SITE}/psycopg2_binary.libs/libpq-9a2c2b84.so.5.9",
        f"{SITE}/psycopg2_binary.libs/libssl-cd1d6220.so.1.0.0",
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    ))  # fmt: skip
    assert (v.libpq, v.libpq_openssl, v.openssl, v.cpython) == ("9.6", "1.0", ("1.0", "3"), "3.8")
    assert v.lock_callbacks_possible is True


def test_a_system_libpq_with_the_oldest_openssl_mapped() -> None:
    v = parse_versions((
        "/usr/lib/x86_64-linux-gnu/libpq.so.5.15",
        "/opt/lib/libssl.so.1.1",
        "/opt/other/libssl.so.3",
        "/srv/venv/lib/python3.12/site-packages/psycopg_binary/_psycopg.cpython-312-x86_64-linux-gnu.so",
    ))  # fmt: skip
    assert (v.libpq, v.libpq_openssl, v.cpython) == ("15", "1.1", "3.12")
    assert v.psycopg is None  # no listing: the version is not guessed
    assert v.lock_callbacks_possible is False


@pytest.mark.parametrize(
    ("names", "projects", "version"),
    [
        (["psycopg2_binary-2.9.13.dist-info"], ("psycopg2", "psycopg2_binary"), "2.9.13"),
        (["psycopg2-2.8.6-py3.6.egg-info"], ("psycopg2",), "2.8.6"),
        (["psycopg-3.3.9.dist-info", "psycopg_binary-3.3.9.dist-info"], ("psycopg",), "3.3.9"),
        (["psycopg2_binary.libs", "psycopg2"], ("psycopg2", "psycopg2_binary"), None),
    ],
    ids=["dist-info", "egg-info", "psycopg3", "none"],
)
def test_dist_version(names: list[str], projects: tuple[str, ...], version: str | None) -> None:
    assert dist_version(names, projects) == version


def test_no_libpq_no_note() -> None:
    assert tls_note(Versions(openssl=("3",), cpython="3.11")) is None


def test_note_modern_stall_with_openssl_1_1_or_later() -> None:
    note = tls_note(Versions(libpq="17", openssl=("3",), libpq_openssl="3"))
    assert note is not None
    assert "is not possible in this build" in note
    assert "this is the modern stall: a server or proxy not completing the TLS handshake" in note
    assert "connect_timeout and keepalives" in note


def test_note_historical_deadlock_with_openssl_before_1_1() -> None:
    note = tls_note(Versions(libpq="9.6", openssl=("1.0",), libpq_openssl="1.0"))
    assert note is not None
    assert "the historical lock-callback deadlock is possible in this build" in note
    assert "modern stall" not in note


def test_note_when_libpq_openssl_is_unknown() -> None:
    note = tls_note(Versions(libpq="16"))
    assert note is not None and "cannot tell" in note


def test_the_incident_store_keeps_versions_and_the_note(tmp_path: Path) -> None:
    from builders import deadlock_incident

    from agent.incidents import IncidentStore

    store = IncidentStore(str(tmp_path))
    incident = deadlock_incident()
    found = parse_versions(mapped_files(MAPS), {SITE: ["psycopg2_binary-2.9.13.dist-info"]})
    store.save(incident, None, found)
    record = store.get(incident.id)
    assert record is not None
    assert record["versions"]["libpq"] == "17" and record["versions"]["psycopg2"] == "2.9.13"
    assert "modern stall" in record["version_note"]
    text = store.get_text(incident.id) or ""
    assert "Versions: libpq 17" in text and "Note: libpq 17 with OpenSSL 3" in text
    store.save(replace(incident, resolved_at=20.0), None)  # a resolution keeps them
    again = store.get(incident.id)
    assert again is not None and again["versions"] == record["versions"]
