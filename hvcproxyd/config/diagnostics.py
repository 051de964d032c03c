"""Diagnostics that name a place in a config file, and typed views of its mappings.

Every layer that reads config (the VM's settings, the rules, each handler's
``options:``) reports through a :class:`Section`, so one pass collects every
problem with file:line:column, the key, and what would be valid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import HvcproxydError
from ..smccc import uuid_to_regs
from .source import LocMap, Mark

_MISSING: Any = object()
#: How much of a wrong value a message quotes.
SHOWN_CHARS = 60


def shown(value: Any) -> str:
    """``repr(value)`` for a message, cut to SHOWN_CHARS; never raises, even for an
    int too long to print in decimal (Python refuses past 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else f"<a {type(value).__name__}>"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 5] + " ...>"


@dataclass(frozen=True, slots=True)
class Problem:
    mark: Mark
    key: str
    message: str
    warning: bool = False

    def __str__(self) -> str:
        kind = "warning" if self.warning else "error"
        return f"{self.mark}: {kind}: {self.key}: {self.message}"


class ConfigError(HvcproxydError):
    """One or more problems in a config file; ``problems`` lists them in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.mark.line, p.mark.column))
        super().__init__("\n".join(str(p) for p in self.problems))


class Section:
    """A typed view of one mapping in the file that reports problems with positions.

    Getters never raise: they record a problem and return the default, so one
    pass finds every mistake.
    """

    def __init__(self, data: LocMap, path: str, problems: list[Problem]) -> None:
        self.data = data
        self.path = path
        self.problems = problems

    # -- reporting
    def _key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def mark_of(self, key: str) -> Mark:
        return self.data.value_marks.get(key, self.data.mark)

    def problem(self, key: str, message: str, *, warning: bool = False, mark: Mark | None = None) -> None:
        self.problems.append(Problem(mark or self.mark_of(key), self._key_path(key), message, warning))

    def allow_keys(self, keys: Iterable[str]) -> None:
        allowed = tuple(keys)
        for key in self.data:
            if key not in allowed:
                valid = ", ".join(allowed) if allowed else "none (this section takes no keys)"
                self.problems.append(Problem(self.data.key_marks[key], self._key_path(str(key)),
                                             f"unknown key; valid keys: {valid}"))

    # -- getters
    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def string(self, key: str, default: Any = _MISSING, choices: Iterable[str] | None = None) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                self.problem(key, "is required" + (f"; one of: {', '.join(choices)}" if choices else ""),
                             mark=self.data.mark)
                return None
            return default
        if isinstance(value, float) and math.isfinite(value):
            value = repr(value)  # an unquoted version such as 1.1
        if not isinstance(value, str) or not value:
            self.problem(key, f"must be a non-empty string, not {shown(value)}")
            return default if default is not _MISSING else None
        if choices is not None and value not in choices:
            self.problem(key, f"{shown(value)} is not valid; one of: {', '.join(choices)}")
            return default if default is not _MISSING else None
        return value

    def integer(self, key: str, default: Any = _MISSING, lo: int = 0, hi: int = (1 << 64) - 1) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                self.problem(key, f"is required (an integer {lo}..{hi})", mark=self.data.mark)
                return None
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            span = f"{lo}..{hi}" if hi < 1 << 24 else f"{lo:#x}..{hi:#x}"
            self.problem(key, f"must be an integer in {span}, not {shown(value)}")
            return default if default is not _MISSING else None
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, not {shown(value)}")
            return default
        return value

    def integers(self, key: str, *, min_len: int = 0, max_len: int = 1 << 20,
                 default: Any = _MISSING, lo: int = 0, hi: int = (1 << 64) - 1) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                self.problem(key, "is required (a list of integers)", mark=self.data.mark)
            return default if default is not _MISSING else []
        if (not isinstance(value, list) or not min_len <= len(value) <= max_len
                or not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in value)):
            self.problem(key, f"must be a list of {min_len}..{max_len} integers in {lo:#x}..{hi:#x}")
            return default if default is not _MISSING else []
        return list(value)

    def uid(self, key: str) -> tuple[int, int, int, int]:
        """A UUID string (SMCCC little-endian words) or a list of four u32 words."""
        value = self.data.get(key, _MISSING)
        if isinstance(value, str):
            try:
                return uuid_to_regs(value)
            except ValueError:
                pass
        elif isinstance(value, list):
            words = self.integers(key, min_len=4, max_len=4, hi=0xFFFF_FFFF, default=[0, 0, 0, 0])
            return (words[0], words[1], words[2], words[3])
        self.problem(key, "must be a UUID string such as 28b46fb6-2ec5-11e9-a9ca-4b564d003a74 "
                          "or a list of four 32-bit words", mark=self.mark_of(key))
        return (0, 0, 0, 0)

    def section(self, key: str, *, required: bool = False) -> Section | None:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if required:
                self.problem(key, "is required (a mapping)", mark=self.data.mark)
            return None
        if value is None:
            value = empty_map(self.mark_of(key))
        if not isinstance(value, LocMap):
            self.problem(key, f"must be a mapping, not {type(value).__name__}")
            return None
        return Section(value, self._key_path(key), self.problems)


def empty_map(mark: Mark) -> LocMap:
    """An empty mapping placed at ``mark``, for an absent optional section."""
    m = LocMap()
    m.mark, m.key_marks, m.value_marks = mark, {}, {}
    return m


__all__ = ["ConfigError", "Problem", "Section", "empty_map", "shown"]
