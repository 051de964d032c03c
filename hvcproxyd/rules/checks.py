"""Checks that a config's rules fit together and fit KVM: no two rules match one
call, KVM's filter can express the result, an owner with an ABI identity is
owned whole, pinned versions can be provided, and warnings for configs that
work but will surprise.

The checks see handlers only through :class:`HandlerFacts`, so this layer needs
no plugin machinery.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from typing import Protocol

from ..config.diagnostics import Problem
from ..config.source import Mark
from ..smccc import DISCOVERY_FNS, OWNER_SHIFT, Conduit, FunctionId, has_abi_identity, owner_ranges
from ..smccc.services import SERVICE_PROBES, SERVICES
from .parse import BLOCK, RuleSpec
from .table import RuleTable, build_table, slot_targets
from .targets import DENY, KVM, Target, ToHandler


class HandlerFacts(Protocol):
    """What the checks need to know about one configured handler."""

    @property
    def name(self) -> str: ...
    @property
    def type_name(self) -> str: ...
    @property
    def mark(self) -> Mark: ...
    @property
    def answers_discovery(self) -> bool: ...
    @property
    def per_call_warning(self) -> str | None: ...
    def provided_versions(self, service: str) -> tuple[str, ...]: ...


def compile_rules(rules: list[RuleSpec], handlers: Mapping[str, HandlerFacts], versions: dict[str, str],
                  problems: list[Problem]) -> RuleTable[Target] | None:
    """Check the rules against each other and against KVM's constraints, then build
    the table.  Returns None (with problems recorded) when they do not fit."""
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
    table = build_table(rules)
    _check_kvm_mixing(table, rules, problems)
    _check_identity_owners(table, rules, handlers, problems)
    _check_versions(rules, handlers, versions, problems)
    _warn_risky(table, rules, handlers, problems)
    if sum(1 for p in problems if not p.warning) > before:
        return None
    return table


def _rules_at(rules: list[RuleSpec], fid: int) -> list[RuleSpec]:
    return [r for r in rules if any(lo <= fid <= hi for lo, hi in r.ranges)]


def _check_kvm_mixing(table: RuleTable[Target], rules: list[RuleSpec], problems: list[Problem]) -> None:
    for lo, _hi, slots in table.intervals():
        names = {t.name for s in slots for _, t in slot_targets(s)}
        if KVM.name in names and len(names) > 1:
            culprits = _rules_at(rules, lo)
            kvm_rule = next(r for r in culprits if r.action == KVM)
            other = next(r for r in culprits if r.action != KVM)
            problems.append(Problem(other.mark, f"rules[{other.index}].action",
                                    f"at {lo:#010x} {kvm_rule.label} leaves the call to KVM while this rule "
                                    f"sends it to {other.action.name!r}; KVM's SMCCC filter cannot tell conduits or "
                                    "vCPUs apart, so a function ID is either left to KVM everywhere or nowhere"))


def _check_identity_owners(table: RuleTable[Target], rules: list[RuleSpec], handlers: Mapping[str, HandlerFacts],
                           problems: list[Problem]) -> None:
    """An owner with an ABI identity (vendor hyp, trusted OS) is taken whole or not at
    all, and one handler instance answers its discovery queries on every conduit."""
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
            found = {table.lookup(fast32 | fn, c, 0) for fn in DISCOVERY_FNS for c in (0, 1)}
            answerers = {None if t is None else t.name for t in found}
            if len(answerers) != 1 or None in answerers:
                problems.append(Problem(first.mark, f"rules[{first.index}].action",
                                        f"owner {owner}: its call-count, UID and revision queries "
                                        f"({fast32 | 0xFF00:#010x}/FF01/FF03) must all go to one handler instance "
                                        f"on both conduits; they go to {sorted(map(str, answerers))}"))
                continue
            (answer,) = answerers
            spec = handlers.get(str(answer))
            if spec is None or not spec.answers_discovery:
                problems.append(Problem(first.mark, f"rules[{first.index}].action",
                                        f"owner {owner}: its discovery queries go to {answer!r}, which does not "
                                        "answer call-count/UID/revision; use a handler that does (e.g. type "
                                        "discovery, pkvm-memshare) so the guest sees this range's real identity"))


def _spans(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a:#010x}..{b:#010x}" for a, b in ranges)


def _first_gap(table: RuleTable[Target], lo: int, hi: int, conduit: Conduit) -> int | None:
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


def _check_versions(rules: list[RuleSpec], handlers: Mapping[str, HandlerFacts], versions: dict[str, str],
                    problems: list[Problem]) -> None:
    for service, version in versions.items():
        svc_ranges = SERVICES[service]
        serving = {r.action.name for r in rules if isinstance(r.action, ToHandler)
                   and any(lo <= shi and slo <= hi for lo, hi in r.ranges for slo, shi in svc_ranges)}
        for name in sorted(serving):
            spec = handlers[name]
            offered = spec.provided_versions(service)
            if version not in offered:
                problems.append(Problem(spec.mark, f"handlers.{name}",
                                        f"versions.{service} pins {version}, which handler type "
                                        f"{spec.type_name!r} cannot provide (it offers: "
                                        f"{', '.join(offered) or 'none'})"))


def _warn_risky(table: RuleTable[Target], rules: list[RuleSpec], handlers: Mapping[str, HandlerFacts],
                problems: list[Problem]) -> None:
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
        spec = handlers.get(rule.action.name)
        if spec is not None and spec.per_call_warning:
            problems.append(Problem(rule.mark, f"rules[{rule.index}].action",
                                    f"{rule.action.name!r} (type {spec.type_name}) {spec.per_call_warning}",
                                    warning=True))


def _warn_discovery(table: RuleTable[Target], rule: RuleSpec, problems: list[Problem]) -> None:
    """A rule that takes some of a standard service while its version query goes
    elsewhere: the guest asks the version first and never finds this handler."""
    for service, (probe, probe_name) in SERVICE_PROBES.items():
        if not any(lo <= shi and slo <= hi for lo, hi in rule.ranges for slo, shi in SERVICES[service]):
            continue
        for conduit in sorted(rule.conduits):
            answer = _name_of_slot(table, probe, conduit, rule.vcpus)
            if answer != rule.action.name:
                where = {None: "nothing (the guest gets NOT_SUPPORTED)", KVM.name: "KVM"}.get(answer, repr(answer))
                problems.append(Problem(rule.mark, f"rules[{rule.index}].match",
                                        f"forwards {service} calls to {rule.action.name!r}, but {probe_name} "
                                        f"({probe:#010x}, {conduit.name.lower()}), which a guest asks first, goes "
                                        f"to {where}; forward it to the same handler", warning=True))
                return


def _name_of_slot(table: RuleTable[Target], fid: int, conduit: Conduit, vcpus: frozenset[int] | None) -> str | None:
    target = table.lookup(fid, conduit, min(vcpus) if vcpus else 0)
    return None if target is None else target.name


__all__ = ["HandlerFacts", "compile_rules"]
