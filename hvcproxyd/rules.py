"""The rule table: parse rules, check range ownership, compile to a sorted
interval table, and derive the forward/deny ranges for the handshake.

Lookup is ``bisect`` over the interval starts (O(log n)) and then a choice by
conduit; only intervals where some rule names a vCPU set need a short scan.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .smccc import (
    ARCH_RESERVED_RANGES,
    DISCOVERY_FNS,
    MBZ_MASK,
    OWNER_SHIFT,
    SVE_HINT,
    Conduit,
    FunctionId,
    has_abi_identity,
    owner_ranges,
)
from .wire import FilterAction, FilterRange

if TYPE_CHECKING:
    from .config import HandlerSpec, Problem, RuleSpec, Section
    from .yamlloc import Mark

KVM = "kvm"
DENY = "deny"
BLOCK = 0xFFFF  # the function-number part of an owner's call block
_CONDUITS = {"hvc": frozenset({Conduit.HVC}), "smc": frozenset({Conduit.SMC}),
             "any": frozenset({Conduit.HVC, Conduit.SMC})}

T = TypeVar("T")
U = TypeVar("U")

# ------------------------------------------------------------------ parsing


def parse_rule(s: Section, index: int, handlers: dict[str, HandlerSpec]) -> RuleSpec | None:
    from .config import RuleSpec
    from .services import SERVICE_NAMES, SERVICES

    s.allow_keys(("match", "conduit", "vcpus", "action"))
    match = s.raw("match")
    service = None
    ranges: list[tuple[int, int]] = []
    if isinstance(match, str):
        if match not in SERVICES:
            s.problem("match", f"unknown service {match!r}; a service is one of: {', '.join(SERVICE_NAMES)}; "
                               "or give a function ID or an inclusive [first, last] range")
            return None
        service, ranges = match, list(SERVICES[match])
    elif isinstance(match, int) and not isinstance(match, bool):
        ranges = [(match, match)]
    elif isinstance(match, list) and len(match) == 2 and all(isinstance(v, int) for v in match):
        ranges = [(match[0], match[1])]
    else:
        s.problem("match", "must be a service name, a function ID, or an inclusive [first, last] range",
                  mark=s.mark_of("match"))
        return None
    for lo, hi in ranges:
        if not (0 <= lo <= hi <= 0xFFFF_FFFF):
            s.problem("match", f"range {lo:#x}..{hi:#x} is not an ordered pair of 32-bit function IDs")
            return None
        if lo >> 16 != hi >> 16:
            s.problem("match", f"range {lo:#010x}..{hi:#010x} must lie within one 64K call block "
                               f"({lo & ~BLOCK:#010x}..{lo | BLOCK:#010x}); split it into one rule per block")
            return None
        if lo & MBZ_MASK:
            continue  # not an SMCCC layout (e.g. KVM's legacy PSCI 0.1 IDs): routed exactly as written
        if lo & SVE_HINT:
            s.problem("match", f"{lo:#010x} has bit 16 set, the SMCCC 1.3 SVE hint, which routing ignores; "
                               f"match {lo & ~SVE_HINT:#010x} instead")
            return None
        if not FunctionId(lo).well_formed:
            s.problem("match", f"{lo:#010x} is a yielding call of owner {FunctionId(lo).owner}; "
                               "only trusted apps and OSes (owners 48..63) have yielding calls")
            return None

    conduit = s.string("conduit", default="any", choices=tuple(_CONDUITS))
    vcpus = None
    if s.has("vcpus"):
        vlist = s.integers("vcpus", min_len=1, hi=511)
        vcpus = frozenset(vlist) if vlist else None
    action = s.string("action")
    if action is None:
        return None
    if action not in (KVM, DENY) and action not in handlers:
        names = [KVM, DENY, *handlers]
        s.problem("action", f"{action!r} is neither a handler defined under handlers: nor a built-in; "
                            f"valid actions: {', '.join(names)}")
        return None
    for lo, hi in ranges:
        for rlo, rhi in ARCH_RESERVED_RANGES:
            if action != KVM and lo <= rhi and rlo <= hi:
                s.problem("match", f"{max(lo, rlo):#010x} is in the Arm architecture range {rlo:#010x}..{rhi:#010x}, "
                                   "which KVM always handles itself and refuses to filter (EEXIST); the only valid "
                                   "action here is kvm")
                return None
    return RuleSpec(index, tuple(ranges), _CONDUITS[conduit or "any"], vcpus, action, s.data.mark, service)


# ------------------------------------------------------------------ the table


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    vcpus: frozenset[int] | None
    target: T


#: Per interval and conduit: nothing, one unconditional target, or entries to scan by vCPU.
Slot = Any


class RuleTable(Generic[T]):
    """Intervals ``[starts[i], starts[i+1])`` with, per conduit, what answers there."""

    __slots__ = ("slots", "starts")

    def __init__(self, starts: list[int], slots: list[tuple[Slot, Slot]]) -> None:
        self.starts = starts
        self.slots = slots

    def lookup(self, routing_id: int, conduit: int, vcpu: int) -> T | None:
        i = bisect_right(self.starts, routing_id) - 1
        if i < 0:
            return None
        slot = self.slots[i][conduit]
        if type(slot) is tuple:
            for entry in slot:
                if entry.vcpus is None or vcpu in entry.vcpus:
                    return entry.target  # type: ignore[no-any-return]
            return None
        return slot  # type: ignore[no-any-return]

    def map(self, fn: Callable[[T], U]) -> RuleTable[U]:
        """The same table with every target replaced, e.g. names -> handler objects."""
        def conv(slot: Slot) -> Slot:
            if slot is None:
                return None
            if type(slot) is tuple:
                return tuple(Entry(e.vcpus, fn(e.target)) for e in slot)
            return fn(slot)
        return RuleTable(self.starts, [(conv(a), conv(b)) for a, b in self.slots])

    def intervals(self) -> list[tuple[int, int, tuple[Slot, Slot]]]:
        """(first, last, slots) for every interval that has a rule; for printing and checks."""
        out = []
        for i, slots in enumerate(self.slots):
            if slots == (None, None):
                continue
            last = (self.starts[i + 1] - 1) if i + 1 < len(self.starts) else 0xFFFF_FFFF
            out.append((self.starts[i], last, slots))
        return out

    def filter_ranges(self) -> tuple[FilterRange, ...]:
        """DENY and FORWARD ranges for the handshake, adjacent ones merged.

        KVM's filter sees neither conduit nor vCPU, so an interval is DENY only
        when every conduit and vCPU is denied; anything else that is not left to
        KVM is FORWARD, and the daemon answers the denied corners itself."""
        out: list[FilterRange] = []
        for lo, hi, slots in self.intervals():
            action = _filter_action(slots)
            if action is FilterAction.HANDLE:
                continue
            if out and out[-1].action is action and out[-1].last + 1 == lo:
                out[-1] = FilterRange(out[-1].base, hi - out[-1].base + 1, action)
            else:
                out.append(FilterRange(lo, hi - lo + 1, action))
        return tuple(out)


def _slot_targets(slot: Slot) -> list[tuple[frozenset[int] | None, Any]]:
    if slot is None:
        return []
    if type(slot) is tuple:
        return [(e.vcpus, e.target) for e in slot]
    return [(None, slot)]


def _filter_action(slots: tuple[Slot, Slot]) -> FilterAction:
    targets = [t for s in slots for t in _slot_targets(s)]
    names = {_name_of(t) for _, t in targets}
    if names == {KVM}:
        return FilterAction.HANDLE
    full = all(s is not None and type(s) is not tuple for s in slots)
    if names == {DENY} and full:
        return FilterAction.DENY
    return FilterAction.FORWARD


def _name_of(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "name", str(target))


# ------------------------------------------------------------------ compiling


def compile_rules(rules: list[RuleSpec], handlers: dict[str, HandlerSpec], versions: dict[str, str],
                  problems: list[Problem], *, top_mark: Mark) -> RuleTable[str] | None:
    """Check the rules against each other and against KVM's constraints, then build
    the table.  Returns None (with problems recorded) when they do not fit."""
    from .config import Problem

    def err(rule: RuleSpec, key: str, msg: str, warning: bool = False) -> None:
        problems.append(Problem(rule.mark, f"rules[{rule.index}].{key}", msg, warning))

    before = sum(1 for p in problems if not p.warning)
    # Pairwise overlap in (function ID, conduit, vCPU) space.
    for i, a in enumerate(rules):
        for b in rules[i + 1:]:
            if not a.conduits & b.conduits:
                continue
            if a.vcpus is not None and b.vcpus is not None and not a.vcpus & b.vcpus:
                continue
            for alo, ahi in a.ranges:
                for blo, bhi in b.ranges:
                    if alo <= bhi and blo <= ahi:
                        shared = "/".join(sorted(c.name.lower() for c in a.conduits & b.conduits))
                        err(b, "match", f"overlaps {a.label} at {max(alo, blo):#010x}..{min(ahi, bhi):#010x} "
                                        f"for conduit {shared}; "
                                        "two rules may not match the same call")
    if sum(1 for p in problems if not p.warning) > before:
        return None
    table = _build(rules)
    _check_kvm_mixing(table, rules, problems)
    _check_identity_owners(table, rules, handlers, problems, top_mark)
    _check_versions(rules, handlers, versions, problems, top_mark)
    _warn_risky(table, rules, handlers, problems)
    if sum(1 for p in problems if not p.warning) > before:
        return None
    return table


def _build(rules: list[RuleSpec]) -> RuleTable[str]:
    bounds = {0}
    for rule in rules:
        for lo, hi in rule.ranges:
            bounds.add(lo)
            if hi < 0xFFFF_FFFF:
                bounds.add(hi + 1)
    starts = sorted(bounds)
    slots: list[tuple[Slot, Slot]] = []
    for _i, start in enumerate(starts):
        per_conduit: list[Slot] = []
        for conduit in (Conduit.HVC, Conduit.SMC):
            entries = [Entry(r.vcpus, r.action) for r in rules if conduit in r.conduits
                       and any(lo <= start <= hi for lo, hi in r.ranges)]
            if not entries:
                per_conduit.append(None)
            elif len(entries) == 1 and entries[0].vcpus is None:
                per_conduit.append(entries[0].target)
            else:
                per_conduit.append(tuple(entries))
        slots.append((per_conduit[0], per_conduit[1]))
    # Merge neighbours with identical slots so lookups bisect fewer starts.
    m_starts: list[int] = []
    m_slots: list[tuple[Slot, Slot]] = []
    for start, slot in zip(starts, slots, strict=False):
        if m_slots and m_slots[-1] == slot:
            continue
        m_starts.append(start)
        m_slots.append(slot)
    return RuleTable(m_starts, m_slots)


def _rules_at(rules: list[RuleSpec], fid: int) -> list[RuleSpec]:
    return [r for r in rules if any(lo <= fid <= hi for lo, hi in r.ranges)]


def _check_kvm_mixing(table: RuleTable[str], rules: list[RuleSpec], problems: list[Problem]) -> None:
    from .config import Problem

    for lo, _hi, slots in table.intervals():
        names = {t for s in slots for _, t in _slot_targets(s)}
        if KVM in names and len(names) > 1:
            culprits = _rules_at(rules, lo)
            kvm_rule = next(r for r in culprits if r.action == KVM)
            other = next(r for r in culprits if r.action != KVM)
            problems.append(Problem(other.mark, f"rules[{other.index}].action",
                                    f"at {lo:#010x} {kvm_rule.label} leaves the call to KVM while this rule "
                                    f"sends it to {other.action!r}; KVM's SMCCC filter cannot tell conduits or "
                                    "vCPUs apart, so a function ID is either left to KVM everywhere or nowhere"))


def _check_identity_owners(table: RuleTable[str], rules: list[RuleSpec], handlers: dict[str, HandlerSpec],
                           problems: list[Problem], top_mark: Mark) -> None:
    """An owner with an ABI identity (vendor hyp, trusted OS) is taken whole or not at
    all, and one handler instance answers its discovery queries on every conduit."""
    from .config import Problem

    touched: dict[int, RuleSpec] = {}
    for rule in rules:
        if rule.action == KVM:
            continue
        for lo, _hi in rule.ranges:
            owner = (lo >> OWNER_SHIFT) & 0x3F
            if has_abi_identity(owner):
                touched.setdefault(owner, rule)
    for owner, first in touched.items():
        why = (f"owner {owner} has an ABI identity (its UID tells the guest which ABI it speaks), so a "
               "config that forwards any of it must forward all of it")
        for lo, hi in owner_ranges(owner):
            for conduit in (Conduit.HVC, Conduit.SMC):
                gap = _first_gap(table, lo, hi, conduit)
                if gap is not None:
                    problems.append(Problem(first.mark, f"rules[{first.index}].match",
                                            f"{why}; {gap:#010x} ({conduit.name.lower()}) is not covered "
                                            f"(whole range: {_spans(owner_ranges(owner))}), "
                                            "and no rule for it may be limited to some vCPUs"))
                    break
            else:
                continue
            break
        else:
            fast32 = owner_ranges(owner)[0][0] if owner < 48 else owner_ranges(owner)[2][0]
            answerers = {table.lookup(fast32 | fn, c, 0) for fn in DISCOVERY_FNS for c in (0, 1)}
            if len(answerers) != 1 or None in answerers:
                problems.append(Problem(first.mark, f"rules[{first.index}].action",
                                        f"owner {owner}: its call-count, UID and revision queries "
                                        f"({fast32 | 0xFF00:#010x}/FF01/FF03) must all go to one handler instance "
                                        f"on both conduits; they go to {sorted(map(str, answerers))}"))
                continue
            (answer,) = answerers
            spec = handlers.get(str(answer))
            if spec is None or not getattr(spec.cls, "ANSWERS_DISCOVERY", False):
                problems.append(Problem(first.mark, f"rules[{first.index}].action",
                                        f"owner {owner}: its discovery queries go to {answer!r}, which does not "
                                        "answer call-count/UID/revision; use a handler that does (e.g. type "
                                        "discovery, pkvm-memshare) so the guest sees this range's real identity"))


def _spans(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a:#010x}..{b:#010x}" for a, b in ranges)


def _first_gap(table: RuleTable[str], lo: int, hi: int, conduit: Conduit) -> int | None:
    i = bisect_right(table.starts, lo) - 1
    pos = lo
    while pos <= hi:
        slot = table.slots[i][conduit]
        if slot is None or type(slot) is tuple:
            return pos
        i += 1
        if i >= len(table.starts):
            break
        pos = table.starts[i]
    return None


def _check_versions(rules: list[RuleSpec], handlers: dict[str, HandlerSpec], versions: dict[str, str],
                    problems: list[Problem], top_mark: Mark) -> None:
    from .config import Problem
    from .services import SERVICES

    for service, version in versions.items():
        svc_ranges = SERVICES[service]
        serving = {r.action for r in rules
                   if any(lo <= shi and slo <= hi for lo, hi in r.ranges for slo, shi in svc_ranges)}
        for name in sorted(serving - {KVM, DENY}):
            spec = handlers[name]
            offered = spec.cls.provided_versions(spec.options, service)
            if version not in offered:
                problems.append(Problem(spec.mark, f"handlers.{name}",
                                        f"versions.{service} pins {version}, which handler type "
                                        f"{spec.type_name!r} cannot provide (it offers: "
                                        f"{', '.join(offered) or 'none'})"))


def _warn_risky(table: RuleTable[str], rules: list[RuleSpec], handlers: dict[str, HandlerSpec],
                problems: list[Problem]) -> None:
    from .config import Problem

    for rule in rules:
        if rule.action in (KVM, DENY):
            continue
        for lo, _hi in rule.ranges:
            owner = (lo >> OWNER_SHIFT) & 0x3F
            if owner in (2, 3) and FunctionId(lo).fast:  # SiP/OEM: discovery expected but not enforced
                uid_owner = table.lookup((lo & ~BLOCK & ~(1 << 30)) | 0xFF01, Conduit.HVC, 0)
                if uid_owner is None:
                    problems.append(Problem(rule.mark, f"rules[{rule.index}].match",
                                            f"forwards owner {owner} calls but nothing answers that owner's UID "
                                            f"query ({(lo & ~BLOCK & ~(1 << 30)) | 0xFF01:#010x}); "
                                            "a guest driver cannot tell who implements them", warning=True))
                    break
        _warn_discovery(table, rule, problems)
        spec = handlers.get(rule.action)
        if spec is not None and spec.type_name == "log":
            problems.append(Problem(rule.mark, f"rules[{rule.index}].action",
                                    f"{rule.action!r} (type log) writes an INFO line for every call, at a rate the "
                                    "guest chooses; use it to find out what a guest probes, then replace it "
                                    "(`hvcproxyd trace` shows calls without logging them)", warning=True))


#: The query a guest makes before any other call of a standard service, by service.
SERVICE_PROBES = {"psci": (0x8400_0000, "PSCI_VERSION"), "ffa": (0x8400_0063, "FFA_VERSION"),
                  "trng": (0x8400_0050, "TRNG_VERSION"), "pv-time": (0xC500_0020, "PV_TIME_FEATURES")}


def _warn_discovery(table: RuleTable[str], rule: RuleSpec, problems: list[Problem]) -> None:
    """A rule that takes some of a standard service while its version query goes
    elsewhere: the guest asks the version first and never finds this handler."""
    from .config import Problem
    from .services import SERVICES

    for service, (probe, probe_name) in SERVICE_PROBES.items():
        if not any(lo <= shi and slo <= hi for lo, hi in rule.ranges for slo, shi in SERVICES[service]):
            continue
        for conduit in sorted(rule.conduits):
            answer = _name_of_slot(table, probe, conduit, rule.vcpus)
            if answer != rule.action:
                where = {None: "nothing (the guest gets NOT_SUPPORTED)", KVM: "KVM"}.get(answer, repr(answer))
                problems.append(Problem(rule.mark, f"rules[{rule.index}].match",
                                        f"forwards {service} calls to {rule.action!r}, but {probe_name} "
                                        f"({probe:#010x}, {conduit.name.lower()}), which a guest asks first, goes "
                                        f"to {where}; forward it to the same handler", warning=True))
                return


def _name_of_slot(table: RuleTable[str], fid: int, conduit: Conduit, vcpus: frozenset[int] | None) -> str | None:
    target = table.lookup(fid, conduit, min(vcpus) if vcpus else 0)
    return None if target is None else _name_of(target)


def describe_table(table: RuleTable[Any]) -> list[str]:
    """Human-readable lines for ``hvcproxyd check``."""
    from .smccc import describe

    lines = []
    for lo, hi, slots in table.intervals():
        parts = []
        for conduit, slot in zip(("hvc", "smc"), slots, strict=False):
            for vcpus, target in _slot_targets(slot):
                where = f" vcpus {sorted(vcpus)}" if vcpus is not None else ""
                parts.append(f"{conduit}{where} -> {_name_of(target)}")
        span = f"{lo:#010x}" if lo == hi else f"{lo:#010x}..{hi:#010x}"
        lines.append(f"{span:24} {describe(lo) if lo == hi else '':28} {'; '.join(parts)}")
    return lines
