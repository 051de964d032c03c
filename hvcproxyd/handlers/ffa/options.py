"""The ``ffa`` handler's options, parsed through ``Section`` so every mistake is
reported with file:line:key at load.  Limit defaults are Xen's FF-A mediator's
(xen/arch/arm/tee/ffa*.c): one 4 KiB RX/TX page, 32 shares of at most 256
pages, one borrower and one fragment per share."""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

from ...config.diagnostics import Section, empty_map
from .defs import (
    ACCESS_NAMES,
    DEFAULT_NPI,
    DEFAULT_SPM_ID,
    PROP_AARCH64,
    PROPERTY_NAMES,
    SECURE_BIT,
    V1_2,
    VERSIONS,
)
from .partition import PartitionSpec, load_partition_class

DEFAULT_STATE_DIR = Path("/var/lib/hvcproxyd")
MAX_PARTITIONS = 64


@dataclass(frozen=True, slots=True)
class FfaLimits:
    rxtx_pages: int = 1
    shares: int = 32
    pages_per_share: int = 256
    ranges_per_share: int = 256
    borrowers: int = 1
    fragments: int = 1
    pending_messages: int = 1


LIMIT_BOUNDS = {"rxtx_pages": 63, "shares": 4096, "pages_per_share": 1 << 18, "ranges_per_share": 4096,
                "borrowers": MAX_PARTITIONS, "fragments": 64, "pending_messages": 256}


@dataclass(frozen=True, slots=True)
class FfaOptions:
    #: This VM's endpoint ID: distinct per VM, never 0 (the hypervisor's).
    id: int = 1
    version: int = V1_2
    spm_id: int = DEFAULT_SPM_ID
    donate: bool = False
    state_dir: Path = DEFAULT_STATE_DIR
    limits: FfaLimits = FfaLimits()
    partitions: tuple[PartitionSpec, ...] = field(default_factory=tuple)
    #: Where this VM's daemon accepts direct requests from other VMs' daemons.
    listen: Path | None = None
    #: Endpoint IDs of the VMs whose direct requests this VM accepts (the receiving
    #: half of a pair policy; the sending half is a ``socket`` partition entry).
    peers: frozenset[int] = frozenset()
    #: How long a peer's request waits for this guest's DIRECT_RESP.
    peer_timeout_ms: int = 400
    #: The notification pending interrupt (NPI): an SGI or PPI INTID, offered in
    #: FEATURES when the VMM can raise it; None: notifications without an interrupt.
    notification_interrupt: int | None = DEFAULT_NPI


OPTION_KEYS = ("id", "version", "spm_id", "donate", "state_dir", "limits", "partitions", "listen", "peers",
               "peer_timeout_ms", "notification_interrupt")
PARTITION_KEYS = ("type", "id", "uuids", "properties", "exec_contexts", "access", "options")


def _names(s: Section, key: str, table: dict[str, int], default: list[str]) -> int | None:
    raw = s.raw(key, default)
    if not isinstance(raw, list) or not all(isinstance(n, str) and n in table for n in raw):
        s.problem(key, f"must be a list of: {', '.join(table)}")
        return None
    bits = 0
    for name in raw:
        bits |= table[name]
    return bits


def _partition(name: str, s: Section, guest_id: int, problems_before: int) -> PartitionSpec | None:
    s.allow_keys(PARTITION_KEYS)
    type_name = s.string("type")
    cls = None
    if type_name is not None:
        try:
            cls = load_partition_class(type_name)
        except LookupError as err:
            s.problem("type", str(err))
    pid = s.integer("id", lo=1, hi=0xFFFF)
    if pid is not None and pid == guest_id:
        s.problem("id", f"{pid:#x} is the VM's own endpoint ID")
    raw_uuids = s.raw("uuids", None)
    uuids: list[uuidlib.UUID] = []
    if not isinstance(raw_uuids, list) or not raw_uuids or len(raw_uuids) > 8:
        s.problem("uuids", "must be a list of 1..8 UUID strings", mark=s.mark_of("uuids"))
    else:
        for text in raw_uuids:
            try:
                u = uuidlib.UUID(str(text))
            except ValueError:
                s.problem("uuids", f"{text!r} is not a UUID")
                continue
            if u.int == 0:
                s.problem("uuids", "the null UUID means 'every partition' and cannot name one")
            uuids.append(u)
    default_props = [n for n, bit in PROPERTY_NAMES.items() if cls is not None and cls.PROPERTIES & bit]
    props = _names(s, "properties", PROPERTY_NAMES, default_props)
    default_access = [n for n, bit in ACCESS_NAMES.items() if cls is not None and bit in cls.ACCESS]
    access = _names(s, "access", ACCESS_NAMES, default_access)
    exec_contexts = s.integer("exec_contexts", default=1, lo=1, hi=0xFFFF)
    opts_section = s.section("options")
    options = None
    if cls is not None:
        sub = opts_section if opts_section is not None else Section(empty_map(s.data.mark), f"{s.path}.options",
                                                                    s.problems)
        options = cls.parse_options(sub)
    if cls is None or pid is None or props is None or access is None or len(s.problems) > problems_before:
        return None
    accepted = frozenset(bit for bit in ACCESS_NAMES.values() if access & bit)
    return PartitionSpec(name, pid, tuple(uuids), props | PROP_AARCH64, exec_contexts, accepted, cls, options)


def parse_ffa_options(s: Section) -> FfaOptions:
    s.allow_keys(OPTION_KEYS)
    d = FfaOptions()
    vid = s.integer("id", default=d.id, lo=1, hi=0x7FFF)
    version = VERSIONS.get(s.string("version", default="1.2", choices=tuple(VERSIONS)) or "1.2", V1_2)
    spm_id = s.integer("spm_id", default=d.spm_id, lo=0, hi=0xFFFF)
    limits = FfaLimits()
    ls = s.section("limits")
    if ls is not None:
        ls.allow_keys(tuple(LIMIT_BOUNDS))
        limits = FfaLimits(**{k: ls.integer(k, default=getattr(limits, k), lo=1, hi=hi)
                              for k, hi in LIMIT_BOUNDS.items()})
    state_dir = s.string("state_dir", default=str(d.state_dir))
    parts: list[PartitionSpec] = []
    ps = s.section("partitions")
    if ps is not None:
        if len(ps.data) > MAX_PARTITIONS:
            ps.problem("", f"at most {MAX_PARTITIONS} partitions")
        seen: dict[int, str] = {}
        seen_uuid: dict[uuidlib.UUID, str] = {}
        for name in ps.data:
            sub = ps.section(str(name))
            if sub is None:
                continue
            spec = _partition(str(name), sub, vid, len(s.problems))
            if spec is None:
                continue
            if spec.id in seen:
                sub.problem("id", f"{spec.id:#x} is also partition {seen[spec.id]!r}'s")
                continue
            if spec.id & SECURE_BIT == 0 and spec.id == spm_id:
                sub.problem("id", f"{spec.id:#x} is the SPM ID")
            for u in spec.uuids:
                if u in seen_uuid:
                    sub.problem("uuids", f"{u} is also partition {seen_uuid[u]!r}'s")
                seen_uuid[u] = spec.name
            seen[spec.id] = spec.name
            parts.append(spec)
    peers = s.integers("peers", default=[], lo=1, hi=0x7FFF, max_len=MAX_PARTITIONS)
    if vid in peers:
        s.problem("peers", f"{vid:#x} is this VM's own ID")
    listen = s.string("listen", default=None)
    if peers and not listen:
        s.problem("peers", "accepting peers needs a listen socket")
    # null turns the interrupt off; Linux takes SGIs 0..7 for its IPIs.
    npi = (None if "notification_interrupt" in s.data and s.data["notification_interrupt"] is None
           else s.integer("notification_interrupt", default=d.notification_interrupt, lo=0, hi=31))
    return FfaOptions(id=vid, version=version, spm_id=spm_id, donate=s.flag("donate", d.donate),
                      state_dir=Path(state_dir), limits=limits, partitions=tuple(parts),
                      listen=Path(listen) if listen else None, peers=frozenset(peers),
                      peer_timeout_ms=s.integer("peer_timeout_ms", default=d.peer_timeout_ms, lo=1, hi=60_000),
                      notification_interrupt=npi)
