"""Which libpq, OpenSSL, psycopg and CPython a worker runs, from the files it maps. Pure.

procfs reads /proc/PID/maps (and the site-packages listings, through /proc/PID/root); this
module only parses names. What it is for: the seed's hang has two causes that look the same
from the outside. With OpenSSL < 1.1, libpq installs OpenSSL locking callbacks around connect
and close, and can swap them out while another thread is inside OpenSSL: the historical
lock-callback deadlock. OpenSSL 1.1 removed those callbacks (it locks internally), so with it
libpq installs none and the same stacks mean a server or proxy that never completes the TLS
handshake. https://www.postgresql.org/docs/current/libpq-ssl.html#LIBPQ-SSL-INITIALIZE
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# libpq-<auditwheel hash>.so.5.17 (a psycopg2-binary wheel) or libpq.so.5.15 (the system's):
# maps name the real file, whose last number is the PostgreSQL release it came with.
_LIBPQ = re.compile(r"(^|/)libpq(-[0-9a-f]{8})?\.so\.5\.(\d+)(\.\d+)*$")
# libssl.so.3, libssl.so.1.1, libssl.so.1.0.0/1.0.2, libssl.so.10 (RHEL 7's 1.0.2), libssl.so.0.9.8
_OPENSSL = re.compile(r"(^|/)lib(ssl|crypto)(-[0-9a-f]{8})?\.so\.([\d.]+[a-z]?)$")
_LIBPYTHON = re.compile(r"(^|/)libpython(3\.\d+)[a-z]*\.so")
_PYTHON_EXE = re.compile(r"(^|/)python(3\.\d+)$")
_EXTENSION = re.compile(r"\.cpython-3(\d+)[a-z]*-")
# The compiled core of each driver, and the dist-info names its version can be read from.
_DRIVERS: Mapping[str, tuple[re.Pattern[str], tuple[str, ...]]] = {
    "psycopg2": (re.compile(r"^(.*)/psycopg2/_psycopg[^/]*\.so$"), ("psycopg2", "psycopg2_binary")),
    "psycopg": (
        re.compile(r"^(.*)/(psycopg_binary|psycopg_c)/[^/]*\.so$"),
        ("psycopg", "psycopg_binary", "psycopg_c"),
    ),
}
#: RHEL's sonames: libssl.so.10 is OpenSSL 1.0.2, libssl.so.6 is 0.9.8.
_RHEL_SONAME = {"10": "1.0", "6": "0.9.8"}


def openssl_family(soname_version: str) -> str:
    """An OpenSSL soname's suffix as a release family: "3", "1.1", "1.0", "0.9.8"."""
    if soname_version in _RHEL_SONAME:
        return _RHEL_SONAME[soname_version]
    if soname_version.startswith("1.0"):
        return "1.0"
    return soname_version


def libpq_major(minor: int) -> str:
    """The PostgreSQL release of libpq.so.5.<minor>: 5.10 and later are 10 and later; before
    that 5.9 was 9.6, 5.8 9.5 ... 5.3 9.0."""
    if minor >= 10:
        return str(minor)
    if minor >= 3:
        return f"9.{minor - 3}"
    return f"8.{minor + 2}"  # 5.2 was 8.4, 5.1 8.3


def _older(family: str, than: tuple[int, ...]) -> bool:
    parts = tuple(int(p) for p in re.findall(r"\d+", family))
    return parts < than


@dataclass(frozen=True)
class Versions:
    """What one worker has mapped, as versions. None: not mapped (or not found)."""

    libpq: str | None = None  # the PostgreSQL release of the mapped libpq ("17", "9.6")
    openssl: tuple[str, ...] = ()  # every OpenSSL mapped, as families ("3", "1.1")
    libpq_openssl: str | None = None  # the one libpq uses: beside it, else the oldest mapped
    psycopg2: str | None = None
    psycopg: str | None = None
    cpython: str | None = None  # major.minor
    files: Mapping[str, str] = field(default_factory=dict)  # what each was read from

    @property
    def lock_callbacks_possible(self) -> bool | None:
        """Whether libpq can install OpenSSL locking callbacks (OpenSSL < 1.1); None: unknown."""
        if self.libpq is None or self.libpq_openssl is None:
            return None
        return _older(self.libpq_openssl, (1, 1))

    def as_dict(self) -> dict[str, str]:
        """The versions found, by component (JSON-ready; absent ones left out)."""
        found = {
            "libpq": self.libpq,
            "openssl": ", ".join(self.openssl) or None,
            "libpq_openssl": self.libpq_openssl,
            "psycopg2": self.psycopg2,
            "psycopg": self.psycopg,
            "cpython": self.cpython,
        }
        return {name: value for name, value in found.items() if value is not None}


def mapped_files(maps: str) -> tuple[str, ...]:
    """The files a /proc/PID/maps text maps, each once, in order (no [heap], no anonymous)."""
    seen: dict[str, None] = {}
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            path = fields[5].removesuffix(" (deleted)")
            seen.setdefault(path, None)
    return tuple(seen)


def driver_dirs(files: Iterable[str]) -> dict[str, str]:
    """The site-packages directory of each mapped database driver (psycopg2, psycopg), whose
    listing says its version (see dist_version)."""
    found: dict[str, str] = {}
    for path in files:
        for driver, (pattern, _) in _DRIVERS.items():
            match = pattern.match(path)
            if match and driver not in found:
                found[driver] = match.group(1)
    return found


def dist_version(names: Iterable[str], projects: Sequence[str]) -> str | None:
    """A project's version from a site-packages listing: "psycopg2_binary-2.9.13.dist-info"."""
    for name in sorted(names):
        for project in projects:
            prefix = f"{project}-"
            if name.startswith(prefix) and name.endswith((".dist-info", ".egg-info")):
                version = name[len(prefix) :].rsplit(".", 1)[0]
                if version[:1].isdigit():
                    return version.split("-py", 1)[0]  # egg-info: 2.8.6-py3.6
    return None


def parse_versions(
    files: Sequence[str], listings: Mapping[str, Sequence[str]] | None = None
) -> Versions:
    """Versions from the mapped files, and from `listings` (driver_dirs' directories, listed)."""
    listings = listings or {}
    where: dict[str, str] = {}
    libpq = libpq_dir = cpython = None
    ssl: dict[str, str] = {}  # path -> family
    for path in files:
        if libpq is None and (m := _LIBPQ.search(path)):
            libpq, libpq_dir = libpq_major(int(m.group(3))), path.rsplit("/", 1)[0]
            where["libpq"] = path
        elif m := _OPENSSL.search(path):
            ssl[path] = openssl_family(m.group(4))
        if cpython is None and (
            (m := _LIBPYTHON.search(path)) or (m := _PYTHON_EXE.search(path))
        ):
            cpython, where["cpython"] = m.group(2), path
    if cpython is None:  # an embedded or renamed interpreter: its extension modules say
        for path in files:
            if m := _EXTENSION.search(path):
                cpython, where["cpython"] = f"3.{m.group(1)}", path
                break
    families = tuple(sorted(set(ssl.values()), key=_sort_key))
    beside = [f for p, f in ssl.items() if libpq_dir is not None and p.startswith(libpq_dir + "/")]
    libpq_openssl = None
    if libpq is not None and (beside or families):
        libpq_openssl = (beside or list(families))[0]
    drivers: dict[str, str | None] = {}
    for driver, directory in driver_dirs(files).items():
        version = dist_version(listings.get(directory, ()), _DRIVERS[driver][1])
        drivers[driver] = version
        if version is not None:
            where[driver] = directory
    if ssl:
        where["openssl"] = ", ".join(ssl)
    return Versions(
        libpq=libpq,
        openssl=families,
        libpq_openssl=libpq_openssl,
        psycopg2=drivers.get("psycopg2"),
        psycopg=drivers.get("psycopg"),
        cpython=cpython,
        files=where,
    )


def _sort_key(family: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", family))


def tls_note(versions: Versions) -> str | None:
    """What the build says about the seed's hang (libpq stuck in TLS setup beside another
    OpenSSL user); None when the worker has no libpq mapped."""
    if versions.libpq is None:
        return None
    build = f"libpq {versions.libpq} with OpenSSL {versions.libpq_openssl or 'unknown'}"
    possible = versions.lock_callbacks_possible
    if possible is None:
        return (
            f"{build}: cannot tell whether the historical lock-callback deadlock is possible "
            "(no OpenSSL mapped beside libpq); with OpenSSL >= 1.1 a hang in libpq's TLS setup "
            "is a server or proxy not completing the handshake: set connect_timeout and "
            "keepalives."
        )
    if possible:
        return (
            f"{build}: the historical lock-callback deadlock is possible in this build (libpq "
            "installs OpenSSL locking callbacks only with OpenSSL < 1.1, and swaps them while "
            "other threads are inside OpenSSL); upgrade to a libpq built against OpenSSL >= 1.1, "
            "and set connect_timeout and keepalives."
        )
    return (
        f"{build}: the historical lock-callback deadlock is not possible in this build (OpenSSL "
        ">= 1.1 locks internally; libpq installs no callbacks); this is the modern stall: a "
        "server or proxy not completing the TLS handshake. Set connect_timeout and keepalives "
        "(e.g. connect_timeout=10 keepalives_idle=30) so it fails instead of hanging."
    )
