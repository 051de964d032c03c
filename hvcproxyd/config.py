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
            span = f"{lo}..{hi}" if hi < 1 << 24 else f"{lo:#x}..{hi:#x}"
            self.problem(key, f"must be an integer in {span}, not {value!r}")
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
    vmm: VmmAuth = field(default_factory=lambda: VmmAuth())
    control_socket: Path | None = None
    metrics: MetricsConfig | None = None
    log_calls: bool = False


# ----------------------------------------------------------------- operations keys
# How the daemon is run and watched (docs/config.md, "Operations keys"): who may
# connect as the VMM, the control and metrics sockets, per-call logging.  None of
# them changes what a guest sees.

OPS_KEYS = ("vmm", "control_socket", "metrics", "log_calls")


@dataclass(frozen=True, slots=True)
class VmmAuth:
    """Who may connect as the VMM (SO_PEERCRED) and the VMM's own call timeout.

    A name stays a name and is resolved at each connection, so a user created
    after the daemon started is honoured and a deleted one is not."""

    uid: int | str | None = None
    gid: int | str | None = None
    timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint: a UNIX socket, or ``listen`` on loopback TCP."""

    socket: Path | None = None
    listen: tuple[str, int] | None = None
    group: int | str | None = None


def resolve_id(value: int | str, kind: str) -> int | None:
    """A uid (kind "user") or gid (kind "group") from a number or a name; None if unknown."""
    if isinstance(value, int):
        return value
    import grp
    import pwd

    try:
        return pwd.getpwnam(value).pw_uid if kind == "user" else grp.getgrnam(value).gr_gid
    except KeyError:
        return None


@dataclass(slots=True)
class _Ops:
    vmm: VmmAuth
    control_socket: Path
    metrics: MetricsConfig | None
    log_calls: bool


def _ident(s: Section, key: str, kind: str) -> int | str | None:
    value = s.raw(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 0xFFFF_FFFF:
        return value
    if not isinstance(value, str) or not value:
        s.problem(key, f"must be a {kind} name or a number 0..{0xFFFF_FFFE}, not {value!r}")
        return None
    if resolve_id(value, kind) is None:
        s.problem(key, f"there is no {kind} {value!r} on this host; connections are refused until it exists",
                  warning=True)
    return value


def _loopback(s: Section, key: str) -> tuple[str, int] | None:
    import ipaddress

    text = s.string(key)
    if text is None:
        return None
    host, _, port = text.rpartition(":")
    host = "127.0.0.1" if host == "localhost" else host.removeprefix("[").removesuffix("]")
    try:
        ok = ipaddress.ip_address(host).is_loopback and 1 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        s.problem(key, f"must be HOST:PORT with a loopback HOST (127.0.0.1:9830, [::1]:9830), not {text!r}: "
                       "the endpoint has no authentication, so it is never offered beyond this host")
        return None
    return host, int(port)


def _parse_ops(s: Section, socket_path: Path, handlers: dict[str, HandlerSpec]) -> _Ops:
    vmm = VmmAuth()
    v = s.section("vmm")
    if v is not None:
        v.allow_keys(("uid", "gid", "timeout_ms"))
        vmm = VmmAuth(_ident(v, "uid", "user"), _ident(v, "gid", "group"),
                      v.integer("timeout_ms", default=None, lo=1, hi=3_600_000))
    if vmm.timeout_ms is not None:
        for spec in handlers.values():
            if spec.timeout_s * 1000 >= vmm.timeout_ms:
                s.problems.append(Problem(
                    spec.mark, f"handlers.{spec.name}.timeout_ms",
                    f"{spec.timeout_s * 1000:.0f} ms is not shorter than vmm.timeout_ms ({vmm.timeout_ms} ms): the "
                    "VMM gives up on a slow call first and the handler's answer is lost; keep handler timeouts "
                    "below the VMM's", warning=True))

    control = Path(s.string("control_socket", default=str(socket_path.with_suffix(".ctl"))))
    if control == socket_path:
        s.problem("control_socket", "must differ from socket (the VMM's)")

    metrics: MetricsConfig | None = MetricsConfig(socket=socket_path.with_suffix(".metrics"))
    raw = s.raw("metrics", _MISSING)
    if raw is False:
        metrics = None
    elif raw is True:
        s.problem("metrics", "is on by default (a UNIX socket beside the VMM's); give a mapping "
                             "(socket, listen, group) or false to turn it off")
    elif raw is not _MISSING:
        m = s.section("metrics")
        if m is not None:
            m.allow_keys(("socket", "listen", "group"))
            listen = None
            if m.has("listen"):
                if m.has("socket"):
                    m.problem("listen", "give socket or listen, not both")
                listen = _loopback(m, "listen")
                if listen is not None:
                    m.problem("listen", "TCP needs the unit's network sandbox opened: install "
                                        "systemd/metrics-tcp.conf as a drop-in (PrivateNetwork=no, "
                                        "RestrictAddressFamilies= with AF_INET/AF_INET6)", warning=True)
            sock = m.string("socket", default=str(socket_path.with_suffix(".metrics")))
            metrics = MetricsConfig(None if listen else Path(sock), listen, _ident(m, "group", "group"))
            if metrics.socket in (socket_path, control):
                m.problem("socket", "must differ from socket and control_socket")

    log_calls = s.flag("log_calls", False)
    if log_calls:
        s.problem("log_calls", "logs every call at INFO; the guest sets the rate, and journald drops what exceeds "
                               "its rate limit, other services' messages included; prefer `hvcproxyd trace`",
                  warning=True)
    return _Ops(vmm, control, metrics, log_calls)


TOP_KEYS = ("vm", "socket", "qmp", "handler_timeout_ms", "versions", "handlers", "rules", *OPS_KEYS)


def load_config(path: str | os.PathLike[str], *, socket: str | None = None) -> VmConfig:
    """Read, validate and compile one VM's config, or raise ConfigError listing every problem."""
    from .handlers import load_handler_class
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
        for hname in hs.data:
            h = hs.section(hname)
            if h is None:
                continue
            if not isinstance(hname, str) or hname in RULE_ACTIONS_BUILTIN:
                hs.problem(str(hname), f"handler names must be strings other than {RULE_ACTIONS_BUILTIN}",
                           mark=hs.data.key_marks[hname])
                continue
            h.allow_keys(("type", "options", "timeout_ms"))
            htype = h.string("type")
            h_timeout = h.integer("timeout_ms", default=timeout_ms, lo=1, hi=600_000)
            if htype is None:
                continue
            try:
                cls = load_handler_class(htype)
            except LookupError as err:
                h.problem("type", str(err))
                continue
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

    ops = _parse_ops(s, socket_path, handlers)

    table = None
    if not any(not p.warning for p in problems):
        table = compile_rules(rules, handlers, versions, problems, top_mark=doc.mark)
    errors = [p for p in problems if not p.warning]
    if errors:
        raise ConfigError(problems)
    return VmConfig(path, name, socket_path, Path(qmp_text) if qmp_text else None, timeout_ms / 1000,
                    versions, handlers, rules, table, [p for p in problems if p.warning], doc,
                    vmm=ops.vmm, control_socket=ops.control_socket, metrics=ops.metrics, log_calls=ops.log_calls)
