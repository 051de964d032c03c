"""Per-VM YAML config -> a typed, validated :class:`VmConfig`.

Every problem is collected (not just the first), each naming file:line:column,
the key, and what would be valid, so ``hvcproxyd check`` can print them all at
once and a bad SIGHUP reload can say exactly why it was refused.
The format is documented in docs/config.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import yamlloc
from .errors import HvcproxydError
from .smccc import Conduit, uuid_to_regs
from .yamlloc import LocList, LocMap, Mark

if TYPE_CHECKING:
    from .handlers import Handler

DEFAULT_RUNTIME_DIR = Path("/run/hvcproxyd")
DEFAULT_TIMEOUT_MS = 1000
RULE_ACTIONS_BUILTIN = ("deny", "kvm")
_MISSING: Any = object()


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
            self.problem(key, f"must be a non-empty string, not {value!r}")
            return default if default is not _MISSING else None
        if choices is not None and value not in choices:
            self.problem(key, f"{value!r} is not valid; one of: {', '.join(choices)}")
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
            self.problem(key, f"must be an integer in {lo:#x}..{hi:#x}, not {value!r}")
            return default if default is not _MISSING else None
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, not {value!r}")
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
            value = _empty_map(self.mark_of(key))
        if not isinstance(value, LocMap):
            self.problem(key, f"must be a mapping, not {type(value).__name__}")
            return None
        return Section(value, self._key_path(key), self.problems)


def _empty_map(mark: Mark) -> LocMap:
    m = LocMap()
    m.mark, m.key_marks, m.value_marks = mark, {}, {}
    return m


@dataclass(slots=True)
class HandlerSpec:
    name: str
    type_name: str
    cls: type[Handler]
    options: Any
    timeout_s: float
    mark: Mark


@dataclass(frozen=True, slots=True)
class RuleSpec:
    index: int
    ranges: tuple[tuple[int, int], ...]
    conduits: frozenset[Conduit]
    vcpus: frozenset[int] | None
    action: str
    mark: Mark
    service: str | None = None

    @property
    def label(self) -> str:
        return f"rule {self.index + 1} ({self.mark})"


@dataclass(slots=True)
class VmConfig:
    path: Path
    name: str
    socket: Path
    qmp: Path | None
    timeout_s: float
    versions: dict[str, str]
    handlers: dict[str, HandlerSpec]
    rules: list[RuleSpec]
    table: Any  # rules.RuleTable; Any to keep the import one-way
    warnings: list[Problem] = field(default_factory=list)
    raw: LocMap | None = None


TOP_KEYS = ("vm", "socket", "qmp", "handler_timeout_ms", "versions", "handlers", "rules")


def load_config(path: str | os.PathLike[str], *, socket: str | None = None) -> VmConfig:
    """Read, validate and compile one VM's config, or raise ConfigError listing every problem."""
    from .handlers import available_handlers, load_handler_class
    from .rules import compile_rules, parse_rule
    from .services import SERVICE_NAMES

    path = Path(path)
    file_name = str(path)
    top = _empty_map(Mark(file_name, 1, 1))
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError([Problem(top.mark, "file", f"cannot read: {err.strerror}")]) from err
    try:
        doc = yamlloc.load(text, file_name)
    except yaml.YAMLError as err:
        pm = getattr(err, "problem_mark", None) or getattr(err, "mark", None)
        mark = Mark(file_name, pm.line + 1, pm.column + 1) if pm is not None else top.mark
        if isinstance(pm, Mark):
            mark = pm
        raise ConfigError([Problem(mark, "yaml", str(getattr(err, "problem", None) or err))]) from err
    if not isinstance(doc, LocMap):
        raise ConfigError([Problem(top.mark, "file", "must be a YAML mapping with keys: " + ", ".join(TOP_KEYS))])

    problems: list[Problem] = []
    s = Section(doc, "", problems)
    s.allow_keys(TOP_KEYS)
    name = s.string("vm") or "?"
    socket_path = Path(socket or s.string("socket", default=str(DEFAULT_RUNTIME_DIR / f"{name}.sock")))
    qmp_text = s.string("qmp", default=None)
    timeout_ms = s.integer("handler_timeout_ms", default=DEFAULT_TIMEOUT_MS, lo=1, hi=600_000)

    versions: dict[str, str] = {}
    vs = s.section("versions")
    if vs is not None:
        vs.allow_keys(SERVICE_NAMES)
        for key in vs.data:
            if key in SERVICE_NAMES:
                v = vs.string(key)
                if v is not None:
                    versions[key] = v

    handlers: dict[str, HandlerSpec] = {}
    hs = s.section("handlers")
    if hs is not None:
        known = sorted(available_handlers())
        for hname in hs.data:
            h = hs.section(hname)
            if h is None:
                continue
            if not isinstance(hname, str) or hname in RULE_ACTIONS_BUILTIN:
                hs.problem(str(hname), f"handler names must be strings other than {RULE_ACTIONS_BUILTIN}",
                           mark=hs.data.key_marks[hname])
                continue
            h.allow_keys(("type", "options", "timeout_ms"))
            htype = h.string("type", choices=known)
            h_timeout = h.integer("timeout_ms", default=timeout_ms, lo=1, hi=600_000)
            if htype is None:
                continue
            cls = load_handler_class(htype)
            assert cls is not None
            opts_section = h.section("options") or Section(_empty_map(h.data.mark), h.path + ".options",
                                                           problems)
            options = cls.parse_options(opts_section)
            handlers[hname] = HandlerSpec(hname, htype, cls, options, h_timeout / 1000, h.data.mark)

    rules: list[RuleSpec] = []
    raw_rules = s.raw("rules")
    if not isinstance(raw_rules, LocList):
        s.problem("rules", "is required: a list of rules (match, conduit, vcpus, action)",
                  mark=s.mark_of("rules"))
    else:
        for i, item in enumerate(raw_rules):
            if not isinstance(item, LocMap):
                problems.append(Problem(raw_rules.item_marks[i], f"rules[{i}]", "each rule must be a mapping"))
                continue
            rule = parse_rule(Section(item, f"rules[{i}]", problems), i, handlers)
            if rule is not None:
                rules.append(rule)

    table = None
    if not any(not p.warning for p in problems):
        table = compile_rules(rules, handlers, versions, problems, top_mark=doc.mark)
    errors = [p for p in problems if not p.warning]
    if errors:
        raise ConfigError(problems)
    return VmConfig(path, name, socket_path, Path(qmp_text) if qmp_text else None, timeout_ms / 1000,
                    versions, handlers, rules, table, [p for p in problems if p.warning], doc)
