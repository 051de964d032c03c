"""A VM's own settings: its name, sockets, timeouts, pinned versions, and the
operations keys (docs/config.md).  Handlers and rules are parsed above this
layer (:mod:`hvcproxyd.core.vmconfig`), which needs the plugins and the rule
compiler; this module needs neither.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
import yaml.reader

from ..smccc.services import SERVICE_NAMES
from ..unixsock import group_members, group_name, resolve_id
from . import source
from .diagnostics import ConfigError, Problem, Section, shown
from .source import LocMap, Mark

DEFAULT_RUNTIME_DIR = Path("/run/hvcproxyd")
#: What the unit reserves with StateDirectory=; each VM keeps its state in a directory of its name below.
DEFAULT_STATE_DIR = Path("/var/lib/hvcproxyd")
FSYNC_POLICIES = ("always", "batch", "never")
DEFAULT_TIMEOUT_MS = 1000
_MISSING = object()

# ----------------------------------------------------------------- operations keys
# How the daemon is run and watched (docs/config.md, "Operations keys"): who may
# connect as the VMM, the control and metrics sockets, per-call logging.  None of
# them changes what a guest sees.

OPS_KEYS = ("vmm", "control_socket", "metrics", "log_calls")
#: The keys this layer reads; handlers and rules are read by the layer above.
SETTINGS_KEYS = ("vm", "socket", "qmp", "handler_timeout_ms", "versions", "state", *OPS_KEYS)


@dataclass(frozen=True, slots=True)
class VmmAuth:
    """Who may connect as the VMM (SO_PEERCRED) and the VMM's own call timeout.

    ``uids`` is the recommended form: QEMU runs as its own user.  A name stays a
    name and is resolved at each connection, so a user created after the daemon
    started is honoured and a deleted one is not."""

    uids: tuple[int | str, ...] = ()
    gid: int | str | None = None
    timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint: a UNIX socket, or ``listen`` on loopback TCP."""

    socket: Path | None = None
    listen: tuple[str, int] | None = None
    group: int | str | None = None


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Durable state (docs/operations.md, "Durable state"): the base directory
    (the VM's own is ``dir/<vm>``) and when the journal is fsynced."""

    dir: Path = DEFAULT_STATE_DIR
    fsync: str = "batch"


@dataclass(slots=True)
class _Ops:
    vmm: VmmAuth
    control_socket: Path
    metrics: MetricsConfig | None
    log_calls: bool


@dataclass(slots=True)
class VmSettings:
    """Everything in a VM's config but its handlers and rules."""

    path: Path
    name: str
    socket: Path
    qmp: Path | None
    timeout_s: float
    versions: dict[str, str]
    vmm: VmmAuth
    control_socket: Path
    metrics: MetricsConfig | None
    log_calls: bool
    #: None: no ``state:`` section, handler state lives in memory only.
    state: StateConfig | None


def _ident(s: Section, key: str, kind: str) -> int | str | None:
    value = s.raw(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 0xFFFF_FFFF:
        return value
    if not isinstance(value, str) or not value:
        s.problem(key, f"must be a {kind} name or a number 0..{0xFFFF_FFFE}, not {shown(value)}")
        return None
    if not value.isprintable():
        # pwd/grp would refuse a NUL (ValueError), and no account name has control characters.
        s.problem(key, f"{value!r} has a control character (such as NUL); a {kind} name never does")
        return None
    if resolve_id(value, kind) is None:
        s.problem(key, f"there is no {kind} {value!r} on this host; connections are refused until it exists",
                  warning=True)
    return value


def _uids(s: Section) -> tuple[int | str, ...]:
    """``uid``: one user, or a list of users, allowed to connect as the VMM."""
    raw = s.raw("uid")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        one = _ident(s, "uid", "user")
        return () if one is None else (one,)
    if not raw:
        s.problem("uid", "must name at least one user (or leave uid out)")
        return ()
    out: list[int | str] = []
    for value in raw:
        one = _ident(Section(_single("uid", value, s), s.path, s.problems), "uid", "user")
        if one is not None:
            out.append(one)
    return tuple(out)


def _single(key: str, value: object, s: Section) -> LocMap:
    """A one-key mapping at ``key``'s place, so a list item is checked like a scalar."""
    m = LocMap({key: value})
    m.mark, m.key_marks, m.value_marks = s.data.mark, dict(s.data.key_marks), dict(s.data.value_marks)
    return m


#: Groups whose members are many users and services: a VMM check by primary gid
#: admits every one of them (``sg GROUP`` makes it the primary group).
BROAD_GROUPS = frozenset({"kvm", "users", "staff", "libvirt", "adm", "sudo", "wheel", "disk", "video"})


def _warn_broad_group(s: Section, gid: int | str) -> None:
    name = gid if isinstance(gid, str) else group_name(gid)
    members = group_members(gid)
    if name in BROAD_GROUPS or len(members) > 1:
        s.problem("gid", f"admits any process whose primary group is {name or gid!r}, which every member of it "
                         f"can arrange (sg {name or gid}){': ' + ', '.join(members[:5]) if members else ''}; "
                         "prefer vmm.uid with QEMU's own user", warning=True)


def _loopback(s: Section, key: str) -> tuple[str, int] | None:
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


def _parse_ops(s: Section, socket_path: Path) -> _Ops:
    vmm = VmmAuth()
    v = s.section("vmm")
    if v is not None:
        v.allow_keys(("uid", "gid", "timeout_ms"))
        vmm = VmmAuth(_uids(v), _ident(v, "gid", "group"), v.integer("timeout_ms", default=None, lo=1, hi=3_600_000))
        if vmm.gid is not None and not vmm.uids:  # with uid, the gid is only the socket file's group
            _warn_broad_group(v, vmm.gid)

    control = Path(s.string("control_socket", default=str(socket_path.with_suffix(".ctl"))))
    if control == socket_path:
        s.problem("control_socket", "must differ from socket (the VMM's)")
    elif s.has("control_socket"):
        check_socket_path(s, "control_socket", control)

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



def _text_mark(file_name: str, text: str, offset: int) -> Mark:
    """The 1-based line and column of character ``offset`` of ``text``."""
    offset = max(0, min(offset, len(text)))
    line_start = text.rfind("\n", 0, offset) + 1
    return Mark(file_name, text.count("\n", 0, offset) + 1, offset - line_start + 1)


def _byte_mark(file_name: str, data: bytes, offset: int) -> Mark:
    """Where byte ``offset`` is, counting columns in characters: the bytes before
    the first undecodable one are valid UTF-8."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    column = len(data[line_start:offset].decode("utf-8", errors="replace")) + 1
    return Mark(file_name, data.count(b"\n", 0, offset) + 1, column)


def read_document(path: Path, top_keys: tuple[str, ...]) -> LocMap:
    """The file as a positioned YAML mapping, or ConfigError naming where it is not one."""
    file_name = str(path)
    top = Mark(file_name, 1, 1)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError([Problem(top, "file", f"cannot read: {err.strerror}")]) from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([Problem(_byte_mark(file_name, data, err.start), "file",
                                   f"is not UTF-8 text: byte {data[err.start]:#04x} cannot start or continue "
                                   "a character")]) from err
    try:
        doc = source.load(text, file_name)
    except yaml.reader.ReaderError as err:
        # A character YAML does not allow (a control character such as NUL); it has a
        # position in the text, not a line/column mark.
        # libyaml counts the offset in UTF-8 bytes, pyyaml's own reader in characters.
        where = (_byte_mark(file_name, data, err.position) if source.C_PARSER
                 else _text_mark(file_name, text, err.position))
        char = err.character if isinstance(err.character, int) else ord(err.character)
        raise ConfigError([Problem(where, "yaml", f"character U+{char:04X} is not allowed in YAML (write it as "
                                                  "an escape such as \\x01 in a double-quoted string)")]
                          ) from err
    except yaml.YAMLError as err:
        pm = getattr(err, "problem_mark", None) or getattr(err, "mark", None)
        mark = Mark(file_name, pm.line + 1, pm.column + 1) if pm is not None else top
        if isinstance(pm, Mark):
            mark = pm
        raise ConfigError([Problem(mark, "yaml", str(getattr(err, "problem", None) or err))]) from err
    if not isinstance(doc, LocMap):
        raise ConfigError([Problem(top, "file", "must be a YAML mapping with keys: " + ", ".join(top_keys))])
    return doc


#: sun_path holds 108 bytes with its NUL: a longer path can never be bound.
MAX_SOCKET_PATH = 107


def check_socket_path(s: Section, key: str, path: Path) -> None:
    """Problems with a socket path that ``check`` can see before the daemon runs:
    one that can never be bound, and a directory that cannot be or will not be
    there (the shipped unit may create directories only below /run/hvcproxyd)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        s.problem(key, f"{path} is {len(os.fsencode(path))} bytes long; a UNIX socket path may have at most "
                       f"{MAX_SOCKET_PATH}")
        return
    if not path.is_absolute():
        s.problem(key, f"{path} is relative; give an absolute path (the daemon's working directory is /)")
        return
    existing = next(parent for parent in path.parents if parent.exists())  # "/" at the latest
    if not existing.is_dir():
        s.problem(key, f"{existing} exists and is not a directory, so {path} cannot be created")
    elif existing != path.parent and not path.is_relative_to(DEFAULT_RUNTIME_DIR):
        s.problem(key, f"{path.parent} does not exist; the daemon would create it, which the shipped unit "
                       f"allows only below {DEFAULT_RUNTIME_DIR} (a typo?)", warning=True)


def _parse_state(s: Section) -> StateConfig | None:
    """``state:`` off by default (``false`` says so explicitly); a mapping, even an
    empty one, turns durable state on."""
    raw = s.raw("state", _MISSING)
    if raw is _MISSING or raw is False:
        return None
    if raw is True:
        s.problem("state", "give a mapping (dir, fsync), {} for the defaults, or false")
        return None
    st = s.section("state")
    if st is None:
        return None
    st.allow_keys(("dir", "fsync"))
    base = Path(st.string("dir", default=str(DEFAULT_STATE_DIR)))
    if not base.is_absolute():
        st.problem("dir", f"{base} is relative; give an absolute path (the daemon's working directory is /)")
    elif not base.is_relative_to(DEFAULT_STATE_DIR) and not base.exists():
        st.problem("dir", f"{base} does not exist; the daemon would create it, which the shipped unit allows "
                          f"only below {DEFAULT_STATE_DIR} (a typo?)", warning=True)
    return StateConfig(base, st.string("fsync", default="batch", choices=FSYNC_POLICIES))


def parse_settings(s: Section, path: Path, socket: str | None) -> VmSettings:
    """The VM's settings from the top-level section; problems go to ``s``."""
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
    if socket is None:  # --socket on the command line is the caller's business
        check_socket_path(s, "socket", socket_path)
    ops = _parse_ops(s, socket_path)
    return VmSettings(path, name, socket_path, Path(qmp_text) if qmp_text else None, timeout_ms / 1000,
                      versions, ops.vmm, ops.control_socket, ops.metrics, ops.log_calls, _parse_state(s))


__all__ = ["DEFAULT_RUNTIME_DIR", "DEFAULT_STATE_DIR", "DEFAULT_TIMEOUT_MS", "FSYNC_POLICIES", "SETTINGS_KEYS",
           "MetricsConfig", "StateConfig", "VmSettings", "VmmAuth", "parse_settings", "read_document"]
