"""`--web.config.file`: TLS, mTLS, basic auth and response headers in the Prometheus exporters'
own format (exporter-toolkit's docs/web-configuration.md, as node_exporter reads it).

Parsing and validation are strict (an unknown key, a missing file, a key that does not load, a
password that is not a bcrypt hash: `ConfigError`, one line naming the file, never echoing a
hash). `BasicAuth` checks an Authorization header. What touches the disk is `load` (the YAML and
the certificates it names) and `WebConfigFile`, which re-loads the file when it, or a
certificate it names, changes; agent.server does the sockets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from agent.errors import ConfigError

log = logging.getLogger(__name__)

REALM = "deadlock-agent"
# Python's ssl cannot ask for a client certificate and then accept it unverified, so
# exporter-toolkit's RequestClientCert and RequireAnyClientCert are refused, not approximated.
CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
OLD_TLS_VERSIONS = ("TLS10", "TLS11")  # valid exporter-toolkit names, deprecated (RFC 8996)
# exporter-toolkit's allowed response headers (web/tls_config.go, http_server_config.headers).
HEADERS = (
    "Cache-Control", "Content-Security-Policy", "Strict-Transport-Security",
    "X-Content-Type-Options", "X-Frame-Options", "X-XSS-Protection",
)  # fmt: skip
# Keys of the format this agent does not implement: named as such, not as "unknown".
UNSUPPORTED_KEYS = {
    "tls_server_config": ("cert", "key", "client_ca", "client_allowed_sans", "cipher_suites",
                          "curve_preferences", "prefer_server_cipher_suites"),
    "": ("rate_limit",),
}  # fmt: skip
_BCRYPT = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
# Checked against when the user is unknown, so a wrong name costs as long as a wrong password
# (exporter-toolkit does the same). The hash of a random password nobody knows; cost 10.
_DUMMY_HASH = b"$2b$10$QyhyaboaA/rEsO/UktVzvOY239VacgZ/IWar4/AlGo1iCFsnrxhJ."
BCRYPT_MAX_PASSWORD = 72  # bytes bcrypt looks at
MAX_AUTHORIZATION = 4096  # bytes of header we look at; longer is refused unread
CACHE_SECONDS = 60.0
CACHE_ENTRIES = 64


class WebConfigError(ValueError):
    """One problem with the file, without the file's name (load adds it)."""


@dataclass(frozen=True)
class TlsSettings:
    """tls_server_config, with paths resolved against the config file's directory."""

    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"
    max_version: str | None = None

    def context(self) -> ssl.SSLContext:
        """A server SSLContext; raises WebConfigError when a file does not load."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = TLS_VERSIONS[self.min_version]
        if self.max_version is not None:
            context.maximum_version = TLS_VERSIONS[self.max_version]
        for name, path in (("cert_file", self.cert_file), ("key_file", self.key_file),
                           ("client_ca_file", self.client_ca_file)):  # fmt: skip
            if path is not None:
                _readable(f"tls_server_config.{name}", path)
        try:
            # The password callback keeps OpenSSL from prompting on a terminal for an
            # encrypted key: such a key just fails to load.
            context.load_cert_chain(self.cert_file, self.key_file, password=lambda: b"")
        except (ssl.SSLError, OSError) as err:
            raise WebConfigError(
                f"tls_server_config: cert_file {self.cert_file} and key_file {self.key_file} "
                f"are not a PEM certificate and its unencrypted private key "
                f"({_ssl_reason(err)})"
            ) from None
        context.verify_mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, OSError) as err:
                raise WebConfigError(
                    f"tls_server_config.client_ca_file {self.client_ca_file}: no PEM "
                    f"certificate in it ({_ssl_reason(err)})"
                ) from None
        return context

    def files(self) -> tuple[Path, ...]:
        """The files whose change means a reload."""
        found = (self.cert_file, self.key_file, self.client_ca_file)
        return tuple(p for p in found if p is not None)


@dataclass(frozen=True)
class WebConfig:
    """A validated web configuration; `ssl_context` is built when the file is loaded."""

    path: str
    tls: TlsSettings | None = None
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)  # name -> bcrypt hash
    headers: tuple[tuple[str, str], ...] = ()
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        """What the log says at startup: never a hash."""
        if self.tls is None:
            tls = "TLS off"
        else:
            tls = f"TLS on (min {self.tls.min_version}, {self.tls.client_auth_type})"
        auth = f"basic auth for {len(self.users)} user(s)" if self.users else "no basic auth"
        return f"{tls}, {auth}"


def parse(text: str, *, base: Path) -> WebConfig:
    """The YAML text as a WebConfig (no file is read; relative paths are against `base`)."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        # Only the position and the problem: the error's own text quotes the line, which may
        # hold a hash.
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise WebConfigError(f"not valid YAML{where}: {err.problem or err.context}") from None
    except yaml.YAMLError:
        raise WebConfigError("not valid YAML") from None
    if data is None:
        data = {}
    top = _mapping("the document", data)
    _known("", top, ("tls_server_config", "http_server_config", "basic_auth_users"))
    tls = _tls(top.get("tls_server_config"), base)
    users = _users(top.get("basic_auth_users"))
    headers = _http(top.get("http_server_config"))
    return WebConfig(path=str(base), tls=tls, users=users, headers=headers)


def load(path: str) -> WebConfig:
    """Read, parse and check the file (and load its certificates); raises ConfigError."""
    try:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise WebConfigError(f"cannot read it: {err.strerror or err}") from None
        except UnicodeDecodeError:
            raise WebConfigError("not UTF-8 text") from None
        parsed = parse(text, base=Path(path).resolve().parent)
        context = parsed.tls.context() if parsed.tls is not None else None
    except WebConfigError as err:
        message = " ".join(str(err).split())  # one line, whatever a library said
        raise ConfigError(f"--web.config.file {path}: {message}") from None
    return WebConfig(path, parsed.tls, parsed.users, parsed.headers, context)


class WebConfigFile:
    """The configuration in force: loaded at start (a bad file is a ConfigError), then again
    whenever the file or a certificate it names changes (size, mtime, inode), checked at most
    every `check_every` seconds. A changed file that does not load makes `current()` None
    (requests are refused, as exporter-toolkit does) until it loads again."""

    def __init__(
        self, path: str, *, check_every: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._clock = clock
        self._check_every = check_every
        self._lock = threading.Lock()
        self._config: WebConfig | None = load(path)
        self._stamp = self._stat(self._config)
        self._checked = clock()
        self.tls = self._config.tls is not None  # fixed for the life of the listener

    def describe(self) -> str:
        """What the log says of the configuration in force."""
        config = self._config
        return config.describe() if config is not None else "not loaded (requests refused)"

    def current(self) -> WebConfig | None:
        """The configuration for this request, or None while the file is broken."""
        now = self._clock()
        if now - self._checked < self._check_every:
            return self._config
        with self._lock:
            if now - self._checked < self._check_every:
                return self._config
            self._checked = now
            stamp = self._stat(self._config)
            if stamp == self._stamp:
                return self._config
            self._stamp = stamp
            try:
                config = load(self.path)
                if (config.tls is not None) != self.tls:
                    raise ConfigError(
                        f"--web.config.file {self.path}: turning TLS on or off needs a restart"
                    )
            except ConfigError as err:
                log.error("%s; refusing every request until it is fixed", err)
                self._config = None
            else:
                log.info("reloaded --web.config.file %s: %s", self.path, config.describe())
                self._config = config
                self._stamp = self._stat(config)
            return self._config

    def _stat(self, config: WebConfig | None) -> tuple[tuple[int, int, int] | None, ...]:
        files = [Path(self.path)]
        if config is not None and config.tls is not None:
            files.extend(config.tls.files())
        return tuple(_stamp(p) for p in files)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class BasicAuth:
    """Checks `Authorization: Basic …` against bcrypt hashes. A verified (user, password) is
    remembered for `cache_seconds` by the password's SHA-256, so a scrape every 15 s does not
    pay bcrypt's ~50 ms each time (exporter-toolkit caches likewise)."""

    def __init__(
        self,
        users: Mapping[str, bytes],
        *,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        checkpw: Callable[[bytes, bytes], bool] = bcrypt.checkpw,
    ) -> None:
        self._users = dict(users)
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._checkpw = checkpw
        self._verified: dict[tuple[str, bytes], float] = {}
        self._lock = threading.Lock()

    def allows(self, header: str | None) -> bool:
        """True when the header carries a configured user's password. Never raises."""
        credentials = parse_basic(header)
        if credentials is None:
            return False
        user, password = credentials
        key = (user, hashlib.sha256(password).digest())
        now = self._clock()
        with self._lock:
            until = self._verified.get(key)
        if until is not None and now < until:
            return True
        if len(password) > BCRYPT_MAX_PASSWORD:
            return False  # bcrypt < 5 would check only the first 72 bytes; 5 raises
        hashed = self._users.get(user)
        # Always one bcrypt check, known user or not: the time says nothing about the name.
        try:
            ok = self._checkpw(password, hashed if hashed is not None else _DUMMY_HASH)
        except ValueError:  # a hash bcrypt cannot read after all
            ok = False
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                if len(self._verified) >= CACHE_ENTRIES:
                    self._verified.clear()
                self._verified[key] = now + self._cache_seconds
        return ok


def parse_basic(header: str | None) -> tuple[str, bytes] | None:
    """`Basic base64(user:password)` -> (user, password), or None for anything else.

    WSGI hands header values over as latin-1 text; user names must be UTF-8."""
    if not header or len(header) > MAX_AUTHORIZATION:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip().encode("ascii"), validate=True)
        user_bytes, sep, password = raw.partition(b":")
        user = user_bytes.decode("utf-8")
    except (UnicodeError, binascii.Error, ValueError):
        return None
    if not sep:
        return None
    return user, password


# --- validation ---------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (Go's yaml.UnmarshalStrict does, too)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise WebConfigError(
                f"key {key!r} appears twice (line {key_node.start_mark.line + 1})"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates
)


def _mapping(where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise WebConfigError(f"{where} must be a mapping of names to values")
    return value


def _known(section: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in data:
        if key in allowed:
            continue
        name = f"{section}.{key}" if section else key
        if key in UNSUPPORTED_KEYS.get(section, ()):
            raise WebConfigError(f"{name} is not supported by deadlock-agent")
        raise WebConfigError(f"unknown key {name} (known: {', '.join(allowed)})")


def _string(where: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise WebConfigError(f"{where} must be a non-empty string")
    return value


def _tls(value: object, base: Path) -> TlsSettings | None:
    if value is None:
        return None
    data = _mapping("tls_server_config", value)
    section = "tls_server_config"
    _known(section, data, ("cert_file", "key_file", "client_auth_type", "client_ca_file",
                           "min_version", "max_version"))  # fmt: skip
    for needed in ("cert_file", "key_file"):
        if needed not in data:
            raise WebConfigError(f"{section}.{needed} is required")
    auth = data.get("client_auth_type", "NoClientCert")
    for key in ("client_auth_type", "min_version", "max_version"):
        if key in data and not isinstance(data[key], str):
            raise WebConfigError(f"{section}.{key} must be a string")
    if auth in UNSUPPORTED_CLIENT_AUTH:
        raise WebConfigError(
            f"{section}.client_auth_type {auth} is not supported (Python's ssl module cannot "
            "accept an unverified client certificate): use VerifyClientCertIfGiven or "
            "RequireAndVerifyClientCert with client_ca_file"
        )
    if auth not in CLIENT_AUTH_TYPES:
        raise WebConfigError(
            f"{section}.client_auth_type {auth!r} is not one of {', '.join(CLIENT_AUTH_TYPES)}"
        )
    ca = data.get("client_ca_file")
    if auth == "NoClientCert" and ca is not None:
        # exporter-toolkit: "Client CA's have been configured without a Client Auth Policy".
        raise WebConfigError(f"{section}.client_ca_file is set but client_auth_type is "
                             "NoClientCert: set client_auth_type too")  # fmt: skip
    if auth != "NoClientCert" and ca is None:
        raise WebConfigError(f"{section}.client_auth_type {auth} needs client_ca_file")
    versions: dict[str, str | None] = {}
    for key, default in (("min_version", "TLS12"), ("max_version", None)):
        name = data.get(key, default)
        if name in OLD_TLS_VERSIONS:
            raise WebConfigError(f"{section}.{key} {name} is not offered: TLS 1.0 and 1.1 are "
                                 "deprecated (RFC 8996); use TLS12 or TLS13")  # fmt: skip
        if name is not None and name not in TLS_VERSIONS:
            raise WebConfigError(
                f"{section}.{key} {name!r} is not one of {', '.join(TLS_VERSIONS)}"
            )
        versions[key] = name
    low, high = versions["min_version"] or "TLS12", versions["max_version"]
    if high is not None and TLS_VERSIONS[high] < TLS_VERSIONS[low]:
        raise WebConfigError(f"{section}.max_version is below min_version")

    def path(key: str) -> Path:
        found = Path(_string(f"{section}.{key}", data[key]))
        return found if found.is_absolute() else base / found

    return TlsSettings(
        cert_file=path("cert_file"), key_file=path("key_file"), client_auth_type=auth,
        client_ca_file=path("client_ca_file") if ca is not None else None,
        min_version=low, max_version=high,
    )  # fmt: skip


def _users(value: object) -> dict[str, bytes]:
    if value is None:
        return {}
    data = _mapping("basic_auth_users", value)
    users = {}
    for user, hashed in data.items():
        if not user or ":" in user:
            raise WebConfigError(f"basic_auth_users: user name {user!r} must be non-empty "
                                 "and without ':'")  # fmt: skip
        # Never echo the value: it is a hash, or by mistake the password itself.
        if not isinstance(hashed, str) or not _BCRYPT.match(hashed.strip()):
            raise WebConfigError(
                f"basic_auth_users: the password of user {user!r} is not a bcrypt hash "
                "($2b$… or $2y$…: make one with `htpasswd -nBC 10 USER`, or bcrypt.hashpw as "
                "the README's Security section shows)"
            )
        cost = int(_BCRYPT.match(hashed.strip()).group(1))  # type: ignore[union-attr]
        if not 4 <= cost <= 31:
            raise WebConfigError(f"basic_auth_users: the bcrypt cost of user {user!r} is "
                                 f"{cost}, outside 4-31")  # fmt: skip
        users[user] = hashed.strip().encode("ascii")
    return users


def _http(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    data = _mapping("http_server_config", value)
    _known("http_server_config", data, ("http2", "headers"))
    if "http2" in data and not isinstance(data["http2"], bool):
        raise WebConfigError("http_server_config.http2 must be true or false")
    # http2: accepted for node_exporter configs; this server speaks HTTP/1.1 either way.
    headers = _mapping("http_server_config.headers", data.get("headers") or {})
    found = []
    for name, given in headers.items():
        canonical = next((h for h in HEADERS if h.lower() == name.lower()), None)
        if canonical is None:
            raise WebConfigError(f"http_server_config.headers: {name!r} is not one of "
                                 f"{', '.join(HEADERS)}")  # fmt: skip
        text = _string(f"http_server_config.headers.{canonical}", given)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise WebConfigError(f"http_server_config.headers.{canonical}: control characters")
        found.append((canonical, text))
    return tuple(found)


def _readable(where: str, path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise WebConfigError(f"{where} {path}: {err.strerror or err}") from None
    os.close(fd)
    if path.is_dir():
        raise WebConfigError(f"{where} {path}: is a directory")


def _ssl_reason(err: Exception) -> str:
    if isinstance(err, ssl.SSLError) and err.reason:
        return str(err.reason)
    return getattr(err, "strerror", None) or type(err).__name__
