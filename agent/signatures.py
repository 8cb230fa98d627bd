"""Signatures and idle rules: loaded from TOML, matched against stacks. Pure: no I/O but loading."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any

from agent.errors import SignatureError
from agent.types import (
    FramePattern,
    HangClass,
    IdleRule,
    Role,
    Signature,
    ThreadActivity,
    ThreadStack,
    Wait,
)

ROLE_KEYS = frozenset(
    {"name", "any_of", "all_of", "none_of", "stuck", "spinning", "syscall", "wait", "thread",
     "absent"}
)  # fmt: skip
SIGNATURE_KEYS = frozenset(
    {"name", "summary", "remedy", "class", "references", "role", "proof"}
)
PROOFS = ("cycle", "orphan")


def _pattern(raw: Any, where: str) -> FramePattern:
    if not isinstance(raw, Mapping) or not raw:
        raise SignatureError(f"{where}: a frame pattern is a table with function/file/module")
    unknown = set(raw) - {"function", "file", "module"}
    if unknown:
        raise SignatureError(f"{where}: unknown pattern keys {sorted(unknown)}")
    for key, value in raw.items():
        try:
            re.compile(value)
        except (re.error, TypeError) as err:
            raise SignatureError(f"{where}.{key}: bad regular expression {value!r}: {err}") from err
    return FramePattern(**{key: str(value) for key, value in raw.items()})


def _patterns(raw: Any, where: str) -> tuple[FramePattern, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SignatureError(f"{where}: expected a list of frame patterns")
    return tuple(_pattern(item, f"{where}[{i}]") for i, item in enumerate(raw))


def _text(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SignatureError(f"{where}: missing {key!r}")
    return value.strip()


def _tables(raw: Any, where: str) -> list[Mapping[str, Any]]:
    # `[signature]` (one table) instead of `[[signature]]` (an array of tables) is an easy slip.
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(item, Mapping) for item in raw):
        raise SignatureError(f"{where}: expected [[{where}]] (an array of tables)")
    return raw


def _flag(raw: Mapping[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise SignatureError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _role(role: Mapping[str, Any], where: str) -> Role:
    unknown = set(role) - ROLE_KEYS
    if unknown:
        raise SignatureError(f"{where}: unknown keys {sorted(unknown)}")
    syscall = role.get("syscall", [])
    if isinstance(syscall, str):
        syscall = [syscall]
    if not isinstance(syscall, list) or not all(isinstance(n, str) and n for n in syscall):
        raise SignatureError(f"{where}.syscall: expected syscall names, got {syscall!r}")
    wait = role.get("wait")
    if wait is not None and wait not in {w.value for w in Wait}:
        raise SignatureError(f"{where}.wait: expected one of {[w.value for w in Wait]}")
    thread = role.get("thread")
    if thread is not None:
        try:
            re.compile(thread)
        except (re.error, TypeError) as err:
            raise SignatureError(f"{where}.thread: bad regular expression {thread!r}") from err
    parsed = Role(
        name=_text(role, "name", where),
        any_of=_patterns(role.get("any_of"), f"{where}.any_of"),
        all_of=_patterns(role.get("all_of"), f"{where}.all_of"),
        none_of=_patterns(role.get("none_of"), f"{where}.none_of"),
        stuck=_flag(role, "stuck", where),
        spinning=_flag(role, "spinning", where),
        syscall=tuple(syscall),
        wait=Wait(wait) if wait is not None else None,
        thread=thread,
        absent=_flag(role, "absent", where),
    )
    if not parsed.any_of and not parsed.all_of:
        raise SignatureError(f"{where}: needs any_of or all_of")
    if parsed.absent and (parsed.stuck or parsed.spinning):
        raise SignatureError(f"{where}: an absent role cannot be stuck or spinning")
    return parsed


def parse_catalog(data: Mapping[str, Any]) -> Catalog:
    """Build a Catalog from parsed TOML; raises SignatureError naming the bad entry."""
    idle = []
    for i, raw in enumerate(_tables(data.get("idle"), "idle")):
        where = f"idle[{i}]"
        idle.append(
            IdleRule(
                name=_text(raw, "name", where),
                top=_pattern(raw.get("top"), f"{where}.top"),
                under=_pattern(raw["under"], f"{where}.under") if "under" in raw else None,
                unless_under=(
                    _pattern(raw["unless_under"], f"{where}.unless_under")
                    if "unless_under" in raw
                    else None
                ),
            )
        )
    signatures = []
    for i, raw in enumerate(_tables(data.get("signature"), "signature")):
        where = f"signature[{i}]"
        name = _text(raw, "name", where)
        roles = []
        where = f"{where}({name})"
        unknown = set(raw) - SIGNATURE_KEYS
        if unknown:
            raise SignatureError(f"{where}: unknown keys {sorted(unknown)}")
        for j, role in enumerate(_tables(raw.get("role"), f"{where}.role")):
            roles.append(_role(role, f"{where}.role[{j}]"))
        proof = raw.get("proof")
        if proof is not None and (proof not in PROOFS or roles):
            raise SignatureError(f"{where}.proof: one of {list(PROOFS)}, and no roles with it")
        if not roles and proof is None:
            raise SignatureError(f"{where}: needs at least one role")
        if roles and not any(role.stuck or role.spinning for role in roles):
            raise SignatureError(f"{where}: at least one role must be stuck or spinning = true")
        kind = raw.get("class", HangClass.DEADLOCK.value)
        if kind not in {c.value for c in HangClass}:
            raise SignatureError(f"{where}.class: expected one of {[c.value for c in HangClass]}")
        references = raw.get("references", [])
        if not isinstance(references, list) or not all(
            isinstance(r, str) and r.startswith("https://") for r in references
        ):
            raise SignatureError(f"{where}.references: expected a list of https:// links")
        signatures.append(
            Signature(
                name=name,
                summary=_text(raw, "summary", where),
                remedy=_text(raw, "remedy", where),
                roles=tuple(roles),
                hang_class=HangClass(kind),
                references=tuple(references),
                proof=proof,
            )
        )
    names = [s.name for s in signatures]
    if len(set(names)) != len(names):
        raise SignatureError(f"duplicate signature names in {names}")
    return Catalog(signatures=tuple(signatures), idle=tuple(idle))


def load_catalog(text: str | None = None) -> Catalog:
    """Load the packaged catalog (or the given TOML text): signatures.toml (idle rules and the
    core signatures), then every signatures.d/*.toml in name order (one file per family of
    hangs), their tables concatenated."""
    if text is not None:
        return parse_catalog(_parse(text, "signatures TOML"))
    package = resources.files("agent")
    files = [package.joinpath("signatures.toml")]
    extra = package.joinpath("signatures.d")
    if extra.is_dir():
        files.extend(sorted((f for f in extra.iterdir() if f.name.endswith(".toml")),
                            key=lambda f: f.name))  # fmt: skip
    merged: dict[str, list[Any]] = {"idle": [], "signature": []}
    for file in files:
        data = _parse(file.read_text(encoding="utf-8"), file.name)
        unknown = set(data) - set(merged)
        if unknown:
            raise SignatureError(f"{file.name}: unknown tables {sorted(unknown)}")
        for key, tables in merged.items():
            tables.extend(_tables(data.get(key), key))
    return parse_catalog(merged)


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SignatureError(f"{where}: {err}") from err


@dataclass(frozen=True)
class Candidate:
    """A thread that may fill a role: its stack, what /proc says of it, and its verdict."""

    stack: ThreadStack
    activity: ThreadActivity | None = None
    stuck: bool = False
    spinning: bool = False


@dataclass(frozen=True)
class Catalog:
    """The signature and idle-rule tables, with their regular expressions compiled once."""

    signatures: tuple[Signature, ...]
    idle: tuple[IdleRule, ...]

    @cached_property
    def _compiled(self) -> dict[str, re.Pattern[str]]:
        patterns: list[FramePattern] = []
        for rule in self.idle:
            patterns.extend(p for p in (rule.top, rule.under, rule.unless_under) if p)
        for sig in self.signatures:
            for role in sig.roles:
                patterns.extend((*role.any_of, *role.all_of, *role.none_of))
                if role.thread is not None:
                    patterns.append(FramePattern(function=role.thread))
        return {
            regex: re.compile(regex)
            for p in patterns
            for regex in (p.function, p.file, p.module)
            if regex is not None
        }

    def proven(self, proof: str) -> Signature | None:
        """The signature a lock proof of this kind ("cycle", "orphan") is reported under."""
        return next((s for s in self.signatures if s.proof == proof), None)

    @property
    def names(self) -> tuple[str, ...]:
        """Every signature name, in table order."""
        return tuple(s.name for s in self.signatures)

    def frame_matches(self, pattern: FramePattern, stack: ThreadStack, index: int) -> bool:
        """Whether frame `index` of the stack matches every key of the pattern."""
        frame = stack.frames[index]
        regex = self._regex
        if pattern.function is not None and not regex(pattern.function).search(frame.function):
            return False
        if pattern.file is not None and (
            frame.native or not regex(pattern.file).search(frame.file)
        ):
            return False
        return pattern.module is None or (
            frame.module is not None and bool(regex(pattern.module).search(frame.module))
        )

    def _any_frame(self, patterns: Iterable[FramePattern], stack: ThreadStack) -> bool:
        return any(
            self.frame_matches(p, stack, i) for p in patterns for i in range(len(stack.frames))
        )

    def idle_rule(self, stack: ThreadStack) -> IdleRule | None:
        """The idle rule the stack matches, judged from its innermost Python frame."""
        top = next((i for i, f in enumerate(stack.frames) if not f.native), None)
        if top is None:
            return None
        below = range(top + 1, len(stack.frames))
        for rule in self.idle:
            if not self.frame_matches(rule.top, stack, top):
                continue
            if rule.under is not None and not any(
                self.frame_matches(rule.under, stack, i) for i in below
            ):
                continue
            if rule.unless_under is not None and any(
                self.frame_matches(rule.unless_under, stack, i) for i in below
            ):
                continue
            return rule
        return None

    def role_matches(
        self, role: Role, stack: ThreadStack, activity: ThreadActivity | None = None
    ) -> bool:
        """Whether the thread fits the role: its frames, and where given its syscall, how it
        waits and its name (stuck-ness is the caller's business). A role that asks about the
        syscall never fits a thread whose syscall is unknown."""
        if role.syscall and (activity is None or activity.syscall_name not in role.syscall):
            return False
        if role.wait is not None and (
            activity is None
            or activity.syscall_name is None
            or (role.wait is Wait.TIMED) != activity.timed_wait
        ):
            return False
        if role.thread is not None:
            names = [n for n in (stack.name, activity.comm if activity else None) if n]
            if not any(self._regex(role.thread).search(n) for n in names):
                return False
        if role.any_of and not self._any_frame(role.any_of, stack):
            return False
        if not all(self._any_frame((p,), stack) for p in role.all_of):
            return False
        return not self._any_frame(role.none_of, stack)

    def _regex(self, text: str) -> re.Pattern[str]:
        """The compiled expression (a pattern from outside the catalog is compiled here)."""
        found = self._compiled.get(text)
        return found if found is not None else re.compile(text)

    def assign_roles(
        self,
        signature: Signature,
        candidates: Sequence[Candidate],
        others: Sequence[Candidate] = (),
    ) -> tuple[int, ...] | None:
        """Give each role a distinct thread (an index into candidates); None when the roles
        cannot all be filled, or when a thread matches an absent role (candidates and
        `others`, every other thread of the worker with a known stack, but those assigned)."""
        if signature.proof is not None:
            return None  # proven from memory (agent.locks), never from frames
        present = [r for r in signature.roles if not r.absent]
        fits = [
            [
                i
                for i, c in enumerate(candidates)
                if (c.stuck or not role.stuck)
                and (c.spinning or not role.spinning)
                and self.role_matches(role, c.stack, c.activity)
            ]
            for role in present
        ]
        absent = [r for r in signature.roles if r.absent]

        def clear(taken: tuple[int, ...]) -> bool:
            chosen = {id(candidates[i]) for i in taken}
            rest = [c for c in (*candidates, *others) if id(c) not in chosen]
            return not any(
                self.role_matches(role, c.stack, c.activity) for role in absent for c in rest
            )

        def search(role_index: int, taken: tuple[int, ...]) -> tuple[int, ...] | None:
            if role_index == len(fits):
                return taken if clear(taken) else None
            for i in fits[role_index]:
                if i not in taken:
                    found = search(role_index + 1, (*taken, i))
                    if found is not None:
                        return found
            return None

        return search(0, ())
