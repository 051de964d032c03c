"""Checks that a config's rules fit together and fit KVM: no two rules match one
call, KVM's filter can express the result, an owner with an ABI identity is
owned whole, pinned versions can be provided, and warnings for configs that
work but will surprise.

The checks see handlers only through :class:`HandlerFacts`, so this layer needs
no plugin machinery.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from heapq import heappop, heappush
from typing import Protocol

from ..config.diagnostics import Problem
from ..config.source import Mark
from ..smccc import DISCOVERY_FNS, OWNER_SHIFT, Conduit, FunctionId, has_abi_identity, owner_ranges
from ..smccc.services import SERVICE_PROBES, SERVICES
from .parse import BLOCK, RuleSpec
from .table import RuleTable, build_table, slot_targets, union_ranges
from .targets import KVM, LeaveToKvm, Target, ToHandler


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
    # Overlap in (function ID, conduit, vCPU) space: each rule that shares a call
    # with an earlier one is reported once, against the earliest such rule.
    for a, b in _first_overlaps(rules):
        ra, rb = rules[a], rules[b]
        alo, ahi, blo, bhi = next((*x, *y) for x in ra.ranges for y in rb.ranges if x[0] <= y[1] and y[0] <= x[1])
        shared = _CONDUIT_NAMES[ra.conduits & rb.conduits]
        err(rb, "match", f"overlaps {ra.label} at {max(alo, blo):#010x}..{min(ahi, bhi):#010x} "
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


_CONDUIT_NAMES = {cs: "/".join(sorted(c.name.lower() for c in cs))
                  for cs in (frozenset({Conduit.HVC}), frozenset({Conduit.SMC}), frozenset(Conduit))}
#: (first, last, rule position) of one range of one rule.
_Span = tuple[int, int, int]


def _first_overlaps(rules: list[RuleSpec]) -> list[tuple[int, int]]:
    """(a, b) with a < b list positions: for every rule b that can match a call some
    earlier rule matches too, the earliest such a; sorted by (a, b).

    Two rules collide when they share a conduit, their vCPU sets are not disjoint
    (None is every vCPU) and two of their ranges intersect.  Per conduit, one
    sweep over the ranges sorted by first ID says whether anything collides
    (:func:`_collides`); a valid config stops there.  Otherwise the ranges go
    into groups so that a group only holds rules whose vCPUs are compatible with
    the rules asking it: ``all`` (every rule) answers rules without a vCPU set;
    ``none`` (rules without one) and ``v`` (rules naming vCPU v) answer a rule
    naming v.  Each group answers "earliest member intersecting [lo, hi]" for all
    its queries in O((m + q) log m), and the groups hold O(input size) ranges in
    all (a rule naming k vCPUs is in at most k + 2 groups), so the check is
    O(N log N) in the size of the rules as written."""
    best: dict[int, int] = {}
    for conduit in (Conduit.HVC, Conduit.SMC):
        spans = sorted((lo, hi, pos) for pos, r in enumerate(rules) if conduit in r.conduits for lo, hi in r.ranges)
        if not _collides(spans, rules):
            continue
        members: dict[object, list[_Span]] = {}
        queries: dict[object, list[_Span]] = {}
        for span in spans:
            vcpus = rules[span[2]].vcpus
            for key in (("all", "none") if vcpus is None else ("all", *vcpus)):
                members.setdefault(key, []).append(span)
            for key in (("all",) if vcpus is None else ("none", *vcpus)):
                queries.setdefault(key, []).append(span)
        for key, asked in queries.items():
            group = members.get(key)
            if group is None:
                continue
            for (_lo, _hi, b), a in zip(asked, _earliest_intersecting(group, asked), strict=True):
                if a is not None and a < best.get(b, b):
                    best[b] = a
    return sorted((a, b) for b, a in best.items())


def _collides(spans: list[_Span], rules: list[RuleSpec]) -> bool:
    """Whether two of the spans (sorted by first ID) of different or same rules meet
    with compatible vCPUs.  A span meets an earlier-starting one iff it starts at or
    before that one's end, so it is enough to keep the furthest end so far among
    rules without a vCPU set, among all rules, and per vCPU: O(m + sum of vCPU
    set sizes).  A rule whose own ranges meet counts too (only :func:`_first_overlaps`
    tells pairs of distinct rules apart)."""
    end_all = end_none = -1
    end_vcpu: dict[int, int] = {}
    for lo, hi, pos in spans:
        vcpus = rules[pos].vcpus
        if vcpus is None:
            if end_all >= lo:
                return True
            if hi > end_none:
                end_none = hi
        else:
            if end_none >= lo:
                return True
            for v in vcpus:
                end = end_vcpu.get(v, -1)
                if end >= lo:
                    return True
                if hi > end:
                    end_vcpu[v] = hi
        if hi > end_all:
            end_all = hi
    return False


def _earliest_intersecting(members: list[_Span], queries: list[_Span]) -> list[int | None]:
    """For each query span, the least position of a member span (sorted by first ID)
    intersecting it.

    A member [ml, mh] meets [ql, qh] iff it starts inside it (ql <= ml <= qh) or
    covers its first ID (ml <= ql <= mh): a range minimum over the members in
    start order (a segment tree: O(m) to build, O(log m) per query, plus the
    bisects; a short range is a slice), and a stabbing query (:func:`_earliest_covering`)."""
    firsts = [m[0] for m in members]
    order = [m[2] for m in members]
    size = len(members)
    tree: list[int] = []
    covering = _earliest_covering(members, [q[0] for q in queries])
    out: list[int | None] = []
    for (lo, hi, _), cover in zip(queries, covering, strict=True):
        i, j = bisect_left(firsts, lo), bisect_right(firsts, hi)
        if i == j:
            out.append(cover)
            continue
        if j - i <= _SHORT:
            least = min(order[i:j])  # a few neighbours: one C call
        else:
            if not tree:
                tree = [0] * size + order
                for k in range(size - 1, 0, -1):
                    tree[k] = min(tree[2 * k], tree[2 * k + 1])
            least, i, j = order[i], i + size, j + size
            while i < j:  # the minimum of order[i:j], bottom-up
                if i & 1:
                    least = min(least, tree[i])
                    i += 1
                if j & 1:
                    j -= 1
                    least = min(least, tree[j])
                i >>= 1
                j >>= 1
        out.append(least if cover is None else min(cover, least))
    return out


#: Up to this many members start inside a query: min() of the slice, else the tree.
_SHORT = 64


def _earliest_covering(by_start: list[_Span], points: list[int]) -> list[int | None]:
    """For each point, the least position of a span (sorted by first ID) covering it.

    A sweep over the points in ascending order pushes each span onto a heap keyed
    by position once it has started, and pops the top while the top has ended: a
    span that ended before one point ended before every later one, so each span
    is pushed and popped at most once, O((m + q) log(m + q))."""
    out: list[int | None] = [None] * len(points)
    heap: list[tuple[int, int]] = []  # (position, last ID)
    nxt = 0
    for qi in sorted(range(len(points)), key=points.__getitem__):
        fid = points[qi]
        while nxt < len(by_start) and by_start[nxt][0] <= fid:
            heappush(heap, (by_start[nxt][2], by_start[nxt][1]))
            nxt += 1
        while heap and heap[0][1] < fid:
            heappop(heap)
        if heap:
            out[qi] = heap[0][0]
    return out


def _check_kvm_mixing(table: RuleTable[Target], rules: list[RuleSpec], problems: list[Problem]) -> None:
    # Only an interval that a kvm rule covers can mix: visit those, by bisect, in order.
    kvm_ranges = union_ranges(tuple(span for r in rules if isinstance(r.action, LeaveToKvm) for span in r.ranges))
    mixed = []
    i = 0
    for lo, hi in kvm_ranges:
        i = max(i, bisect_right(table.starts, lo) - 1)
        while i < len(table.starts) and table.starts[i] <= hi:
            names = {t.name for s in table.slots[i] for _, t in slot_targets(s)}
            if len(names) > 1:  # kvm and something else
                mixed.append(table.starts[i])
            i += 1
    if not mixed:
        return
    # Blame the first rule (in config order) of each kind that covers the interval, on any conduit.
    kvm_spans = sorted((lo, hi, pos) for pos, r in enumerate(rules) if isinstance(r.action, LeaveToKvm)
                       for lo, hi in r.ranges)
    other_spans = sorted((lo, hi, pos) for pos, r in enumerate(rules) if not isinstance(r.action, LeaveToKvm)
                         for lo, hi in r.ranges)
    for lo, k, o in zip(mixed, _earliest_covering(kvm_spans, mixed), _earliest_covering(other_spans, mixed),
                        strict=True):
        assert k is not None and o is not None  # both kinds answer somewhere in this interval
        kvm_rule, other = rules[k], rules[o]
        problems.append(Problem(other.mark, f"rules[{other.index}].action",
                                f"at {lo:#010x} {kvm_rule.label} leaves the call to KVM while this rule "
                                f"sends it to {other.action.name!r}; KVM's SMCCC filter cannot tell conduits or "
                                "vCPUs apart, so a function ID is either left to KVM everywhere or nowhere"))


def _check_identity_owners(table: RuleTable[Target], rules: list[RuleSpec], handlers: Mapping[str, HandlerFacts],
                           problems: list[Problem]) -> None:
    """An owner with an ABI identity (vendor hyp, trusted OS) is taken whole or not at
    all, and one handler instance answers its discovery queries on every conduit."""
    touched: dict[int, RuleSpec] = {}
    #: IDs a rule's except: leaves to KVM: holes the owner's range may have.
    holes = sorted(span for rule in rules for span in rule.excepted)
    for rule in rules:
        if isinstance(rule.action, LeaveToKvm):
            continue
        for lo, _hi in rule.ranges:
            owner = (lo >> OWNER_SHIFT) & 0x3F
            if owner in _IDENTITY_OWNERS and owner not in touched:
                touched[owner] = rule
        for lo, hi in rule.excepted:
            owner = (lo >> OWNER_SHIFT) & 0x3F
            if owner in _IDENTITY_OWNERS:
                problems.append(Problem(rule.mark, f"rules[{rule.index}].except", (
                    f"{lo:#010x}..{hi:#010x} is left to KVM inside owner {owner}, whose discovery "
                    f"{rule.action.name!r} answers: under KVM the kernel answers these calls (and a handler such "
                    "as pkvm-memshare lists them in its FEATURES); under TCG nothing does, and the guest gets "
                    "NOT_SUPPORTED"), warning=True))
    for owner, first in touched.items():
        why = (f"owner {owner} has an ABI identity (its UID tells the guest which ABI it speaks), so a "
               "config that forwards any of it must forward all of it")
        for lo, hi in owner_ranges(owner):
            for conduit in (Conduit.HVC, Conduit.SMC):
                gap = _first_gap_outside(table, lo, hi, conduit, holes)
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


_IDENTITY_OWNERS = frozenset(owner for owner in range(64) if has_abi_identity(owner))


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


def _first_gap_outside(table: RuleTable[Target], lo: int, hi: int, conduit: Conduit,
                       holes: list[tuple[int, int]]) -> int | None:
    """The first ID of lo..hi no rule covers on ``conduit``, skipping ``holes``."""
    pos = lo
    while (gap := _first_gap(table, pos, hi, conduit)) is not None:
        hole = next((h for h in holes if h[0] <= gap <= h[1]), None)
        if hole is None:
            return gap
        pos = hole[1] + 1
        if pos > hi:
            return None
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
    uid_answered: dict[int, bool] = {}  # per UID query ID: does anything answer it
    for rule in rules:
        if not isinstance(rule.action, ToHandler):  # kvm, deny
            continue
        for lo, _hi in rule.ranges:
            owner = (lo >> OWNER_SHIFT) & 0x3F
            if owner in (2, 3) and FunctionId(lo).fast:  # SiP/OEM: discovery expected but not enforced
                uid = (lo & ~BLOCK & ~(1 << 30)) | 0xFF01
                answered = uid_answered.get(uid)
                if answered is None:
                    answered = uid_answered[uid] = table.lookup(uid, Conduit.HVC, 0) is not None
                if not answered:
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
    if not any(_touches_probed(lo, hi) for lo, hi in rule.ranges):
        return  # most rules: one bisect per range
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


#: Every ID of a service that a guest finds by its version query, as sorted disjoint spans.
_PROBED = union_ranges(tuple(span for service in SERVICE_PROBES for span in SERVICES[service]))
_PROBED_FIRSTS = [lo for lo, _ in _PROBED]


def _touches_probed(lo: int, hi: int) -> bool:
    i = bisect_right(_PROBED_FIRSTS, hi) - 1  # the last span starting at or before hi
    return i >= 0 and _PROBED[i][1] >= lo


def _name_of_slot(table: RuleTable[Target], fid: int, conduit: Conduit, vcpus: frozenset[int] | None) -> str | None:
    target = table.lookup(fid, conduit, min(vcpus) if vcpus else 0)
    return None if target is None else target.name


__all__ = ["HandlerFacts", "compile_rules"]
