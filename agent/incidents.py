"""The incident evidence store: one JSON and one text file per incident, in a bounded directory.

The filesystem is this module's external system. Files survive agent restarts; the oldest are
dropped once the count or byte cap is passed. A write failure is logged and counted by the
caller, never raised into the sampling loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.render import incident_record, incident_text, top_frames
from agent.types import Incident, StackSnapshot
from agent.versions import Versions, tls_note

log = logging.getLogger(__name__)

DEFAULT_DIR = str(Path(tempfile.gettempdir()) / "deadlock-agent-incidents")
DEFAULT_MAX_COUNT = 200
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


def dump_record(snapshot: StackSnapshot | None) -> dict[str, Any] | None:
    """Every thread of the captured dump, every frame."""
    if snapshot is None:
        return None
    return {
        "taken_at": round(snapshot.taken_at, 3),
        "native": snapshot.native,
        "threads": [
            {
                "tid": t.tid,
                "name": t.name,
                "frames": [
                    {"function": f.function, "file": f.file, "line": f.line, "module": f.module}
                    for f in t.frames
                ],
            }
            for t in snapshot.threads
        ],
    }


def dump_text(snapshot: StackSnapshot | None) -> str:
    """The captured dump as a reader wants it: each thread, its frames, innermost first."""
    if snapshot is None:
        return "(no dump could be captured)\n"
    kind = "native + Python" if snapshot.native else "Python"
    lines = [f"Full dump ({kind} frames), {len(snapshot.threads)} threads:"]
    for thread in snapshot.threads:
        lines.append(f"\n  Thread {thread.name or '?'} (tid {thread.tid})")
        lines.extend(f"      {frame}" for frame in top_frames(thread, limit=10_000))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class StoredIncident:
    """What the listing shows of one stored incident."""

    id: str
    first_seen: float
    summary: dict[str, Any]


class IncidentStore:
    """Keeps incident evidence under `directory`, within `max_count` files and `max_bytes`."""

    def __init__(
        self,
        directory: str = DEFAULT_DIR,
        *,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.directory = Path(directory)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # the loop writes, HTTP threads read
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _make_private(self.directory)
        self._prune()

    def _paths(self, incident_id: str) -> tuple[Path, Path]:
        return self.directory / f"{incident_id}.json", self.directory / f"{incident_id}.txt"

    def save(
        self,
        incident: Incident,
        snapshot: StackSnapshot | None,
        versions: Versions | None = None,
    ) -> None:
        """Write (or rewrite, on resolution) the incident's files, then enforce the caps.

        `versions`: what the worker maps (agent.versions), kept as `versions` and
        `version_note` when the incident opens."""
        record = incident_record(incident)
        record["first_seen_iso"] = _iso(incident.first_seen)
        record["versions"] = versions.as_dict() if versions is not None else None
        record["version_note"] = tls_note(versions) if versions is not None else None
        json_path, text_path = self._paths(incident.id)
        with self._lock:
            # A resolution rewrite keeps the dump captured when the incident opened. Read, not
            # exists() then read: the file can be pruned or removed in between.
            old = self._load(json_path) if snapshot is None else None
            if old is not None:
                record["dump"] = old.get("dump")
                if versions is None:
                    record["versions"] = old.get("versions")
                    record["version_note"] = old.get("version_note")
                text_tail = _text_dump_part(text_path)
            else:
                record["dump"] = dump_record(snapshot)
                text_tail = dump_text(snapshot)
            head = incident_text(incident) + "\n" + _versions_text(record) + "\n"
            _atomic_write(json_path, json.dumps(record, indent=1, sort_keys=True))
            _atomic_write(text_path, head + text_tail)
            self._prune()

    def _prune(self) -> None:
        entries = []
        for path in self.directory.glob("*.json"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            text = path.with_suffix(".txt")
            size = stat.st_size + _size(text)
            entries.append((stat.st_mtime_ns, path.name, path, text, size))
        entries.sort()  # oldest first
        total = sum(e[4] for e in entries)
        while entries and (len(entries) > self.max_count or total > self.max_bytes):
            _, _, path, text, size = entries.pop(0)
            for victim in (path, text):
                with contextlib.suppress(FileNotFoundError):
                    victim.unlink()
            total -= size

    @staticmethod
    def _load(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def list(self) -> list[StoredIncident]:
        """Every stored incident, newest first."""
        found = []
        with self._lock:
            paths = list(self.directory.glob("*.json"))
        for path in paths:
            data = self._load(path)
            if data is None:
                continue
            summary = {k: v for k, v in data.items() if k not in ("dump", "remedy", "threads")}
            found.append(StoredIncident(path.stem, float(data.get("first_seen") or 0), summary))
        found.sort(key=lambda s: (s.first_seen, s.id), reverse=True)
        return found

    def get(self, incident_id: str) -> dict[str, Any] | None:
        """The full JSON record of one incident, or None."""
        if not _ID.match(incident_id):
            return None
        return self._load(self._paths(incident_id)[0])

    def get_text(self, incident_id: str) -> str | None:
        """The readable text of one incident, or None."""
        if not _ID.match(incident_id):
            return None
        try:
            return self._paths(incident_id)[1].read_text(encoding="utf-8")
        except OSError:
            return None

    def usage(self) -> tuple[int, int]:
        """(incidents stored, bytes used) right now."""
        files = [p for p in self.directory.iterdir() if p.suffix in (".json", ".txt")]
        # Unlocked: the loop may prune a file between iterdir() and stat(); it then counts 0.
        return sum(1 for p in files if p.suffix == ".json"), sum(_size(p) for p in files)


def _versions_text(record: dict[str, Any]) -> str:
    """The versions lines of the text file (empty when none were read)."""
    found = record.get("versions")
    if not found:
        return ""
    lines = ["  Versions: " + ", ".join(f"{k} {v}" for k, v in found.items())]
    if record.get("version_note"):
        lines.append(f"  Note: {record['version_note']}")
    return "\n".join(lines) + "\n"


def _size(path: Path) -> int:
    """The file's size, or 0 when it is gone (no exists() first: that races with removal)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _text_dump_part(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return dump_text(None)
    marker = "Full dump ("
    index = text.find(marker)
    return text[index:] if index >= 0 else dump_text(None)


def _make_private(directory: Path) -> None:
    """The evidence names code, hosts and pids: the directory 0700 and its files 0600 (an
    existing directory too, when it is ours; another owner's is left alone, with a warning)."""
    info = directory.stat()
    if info.st_uid != os.geteuid():
        log.warning("incident directory %s belongs to uid %s, not to this agent: its "
                    "permissions are left as they are", directory, info.st_uid)  # fmt: skip
        return
    if info.st_mode & 0o077:
        directory.chmod(0o700)
    for path in directory.iterdir():
        if path.suffix in (".json", ".txt") and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.chmod(0o600)


def _atomic_write(path: Path, text: str) -> None:
    # Readers (the HTTP server) never see half a file; nobody but the agent's user reads it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)  # a leftover tmp file keeps its old mode otherwise
        out.write(text)
    tmp.replace(path)
