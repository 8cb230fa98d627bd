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
from agent.types import FramePattern, IdleRule, Role, Signature, ThreadStack


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
        for j, role in enumerate(_tables(raw.get("role"), f"{where}.role")):
            rwhere = f"{where}.role[{j}]"
            stuck = role.get("stuck", False)
            if not isinstance(stuck, bool):
                raise SignatureError(f"{rwhere}.stuck: expected true or false, got {stuck!r}")
            parsed = Role(
                name=_text(role, "name", rwhere),
                any_of=_patterns(role.get("any_of"), f"{rwhere}.any_of"),
                all_of=_patterns(role.get("all_of"), f"{rwhere}.all_of"),
                none_of=_patterns(role.get("none_of"), f"{rwhere}.none_of"),
                stuck=stuck,
            )
            if not parsed.any_of and not parsed.all_of:
                raise SignatureError(f"{rwhere}: needs any_of or all_of")
            roles.append(parsed)
        if not roles:
            raise SignatureError(f"{where}: needs at least one role")
        if not any(role.stuck for role in roles):
            raise SignatureError(f"{where}: at least one role must be stuck = true")
        signatures.append(
            Signature(
                name=name,
                summary=_text(raw, "summary", where),
                remedy=_text(raw, "remedy", where),
                roles=tuple(roles),
            )
        )
    names = [s.name for s in signatures]
    if len(set(names)) != len(names):
        raise SignatureError(f"duplicate signature names in {names}")
    return Catalog(signatures=tuple(signatures), idle=tuple(idle))


def load_catalog(text: str | None = None) -> Catalog:
    """Load the packaged signatures.toml (or the given TOML text)."""
    if text is None:
        text = resources.files("agent").joinpath("signatures.toml").read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SignatureError(f"signatures TOML: {err}") from err
    return parse_catalog(data)


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
        return {
            regex: re.compile(regex)
            for p in patterns
            for regex in (p.function, p.file, p.module)
            if regex is not None
        }

    @property
    def names(self) -> tuple[str, ...]:
        """Every signature name, in table order."""
        return tuple(s.name for s in self.signatures)

    def frame_matches(self, pattern: FramePattern, stack: ThreadStack, index: int) -> bool:
        """Whether frame `index` of the stack matches every key of the pattern."""
        frame = stack.frames[index]
        compiled = self._compiled
        if pattern.function is not None and not compiled[pattern.function].search(frame.function):
            return False
        if pattern.file is not None and (
            frame.native or not compiled[pattern.file].search(frame.file)
        ):
            return False
        return pattern.module is None or (
            frame.module is not None and bool(compiled[pattern.module].search(frame.module))
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

    def role_matches(self, role: Role, stack: ThreadStack) -> bool:
        """Whether the stack's frames fit the role (stuck-ness is the caller's business)."""
        if role.any_of and not self._any_frame(role.any_of, stack):
            return False
        if not all(self._any_frame((p,), stack) for p in role.all_of):
            return False
        return not self._any_frame(role.none_of, stack)

    def assign_roles(
        self, signature: Signature, candidates: Sequence[tuple[ThreadStack, bool]]
    ) -> tuple[int, ...] | None:
        """Give each role a distinct thread (index into candidates, whose bool is "stuck")."""
        fits = [
            [
                i
                for i, (stack, stuck) in enumerate(candidates)
                if (stuck or not role.stuck) and self.role_matches(role, stack)
            ]
            for role in signature.roles
        ]

        def search(role_index: int, taken: tuple[int, ...]) -> tuple[int, ...] | None:
            if role_index == len(fits):
                return taken
            for i in fits[role_index]:
                if i not in taken:
                    found = search(role_index + 1, (*taken, i))
                    if found is not None:
                        return found
            return None

        return search(0, ())
