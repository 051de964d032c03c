"""The compiled rule table: sorted intervals with, per conduit, what answers there.

Lookup is ``bisect`` over the interval starts (O(log n)) and then a choice by
conduit; only intervals where some rule names a vCPU set need a short scan.
Building it is a sweep over the rules' range boundaries in order (O(n log n)
for n ranges; see :func:`build_table`).
The same table, with names bound to handler instances, is the VM service's
dispatch table, and it derives the forward/deny ranges for the handshake.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeAlias, TypeVar

from ..smccc.names import describe
from ..wire import FilterAction, FilterRange
from .parse import RuleSpec
from .targets import DENY, KVM, Target


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)
U = TypeVar("U", bound=Named)


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    vcpus: frozenset[int] | None
    target: T


#: Per interval and conduit: nothing, one unconditional target, or entries to scan by vCPU.
Slot: TypeAlias = T | tuple[Entry[T], ...] | None


class RuleTable(Generic[T]):
    """Intervals ``[starts[i], starts[i+1])`` with, per conduit, what answers there."""

    __slots__ = ("slots", "starts")

    def __init__(self, starts: list[int], slots: list[tuple[Slot[T], Slot[T]]]) -> None:
        self.starts = starts
        self.slots = slots

    def lookup(self, routing_id: int, conduit: int, vcpu: int) -> T | None:
        i = bisect_right(self.starts, routing_id) - 1
        if i < 0:
            return None
        slot = self.slots[i][conduit]
        if isinstance(slot, tuple):
            for entry in slot:
                if entry.vcpus is None or vcpu in entry.vcpus:
                    return entry.target
            return None
        return slot

    def map(self, fn: Callable[[T], U]) -> RuleTable[U]:
        """The same table with every target replaced, e.g. names -> handler objects.

        A vCPU tuple that several intervals share (:func:`build_table` reuses a
        conduit's slot until its rules change) is converted once and stays shared."""
        done: dict[int, tuple[Entry[U], ...]] = {}

        def conv(slot: Slot[T]) -> Slot[U]:
            if slot is None:
                return None
            if isinstance(slot, tuple):
                out = done.get(id(slot))
                if out is None:
                    out = done[id(slot)] = tuple(Entry(e.vcpus, fn(e.target)) for e in slot)
                return out
            return fn(slot)
        return RuleTable(self.starts, [(conv(a), conv(b)) for a, b in self.slots])

    def intervals(self) -> list[tuple[int, int, tuple[Slot[T], Slot[T]]]]:
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


def slot_targets(slot: Slot[T]) -> list[tuple[frozenset[int] | None, T]]:
    if slot is None:
        return []
    if isinstance(slot, tuple):
        return [(e.vcpus, e.target) for e in slot]
    return [(None, slot)]


def _filter_action(slots: tuple[Slot[T], Slot[T]]) -> FilterAction:
    targets = [t for s in slots for t in slot_targets(s)]
    names = {_name_of(t) for _, t in targets}
    if names == {KVM.name}:
        return FilterAction.HANDLE
    full = all(s is not None and not isinstance(s, tuple) for s in slots)
    if names == {DENY.name} and full:
        return FilterAction.DENY
    return FilterAction.FORWARD


def _name_of(target: Named) -> str:
    return target.name


def build_table(rules: list[RuleSpec]) -> RuleTable[Target]:
    """The table of ``rules``, whether or not they overlap (the checks refuse overlaps).

    A sweep over the range boundaries in ascending order keeps, per conduit, the
    rules active there (in rule order).  A conduit's slot is rebuilt only at a
    boundary where its active rules change, and an interval whose slots equal
    its left neighbour's is merged into it.  Cost: O(R log R) for sorting the
    2R boundaries of R ranges, plus O(A) per rebuilt slot, where A is the number
    of rules active there; without overlaps A is 1, or the number of rules with
    disjoint vCPU sets sharing the ID (at most one per vCPU)."""
    events: list[tuple[int, int, int]] = []  # (boundary, +1 start / -1 end, rule position)
    for pos, rule in enumerate(rules):
        # A RuleSpec made in code may repeat IDs in two of its ranges: count them once.
        for lo, hi in (rule.ranges if len(rule.ranges) == 1 else union_ranges(rule.ranges)):
            events.append((lo, 1, pos))
            if hi < 0xFFFF_FFFF:
                events.append((hi + 1, -1, pos))
    events.sort()  # at one boundary, a rule's end before its next start
    events.append((-1, 0, 0))  # sentinel: the last boundary is complete
    # One object per distinct target and entry, so equal slots hold the same
    # objects and comparing neighbours is a matter of identity (see _same).
    targets: dict[Target, Target] = {}
    shared: dict[tuple[frozenset[int] | None, Target], Entry[Target]] = {}
    entries = []
    for r in rules:
        target = targets.setdefault(r.action, r.action)
        entries.append(shared.setdefault((r.vcpus, target), Entry(r.vcpus, target)))
    in_order = {cs: tuple(sorted(cs)) for cs in {r.conduits for r in rules}}
    conduits = [in_order[r.conduits] for r in rules]
    active: tuple[list[int], list[int]] = ([], [])  # per conduit, the positions of the rules here, in order
    starts: list[int] = [0]
    slots: list[tuple[Slot[Target], Slot[Target]]] = [(None, None)]
    changed = [False, False]
    for k in range(len(events) - 1):
        at, step, pos = events[k]
        for c in conduits[pos]:
            if step > 0:
                insort(active[c], pos)
            else:
                active[c].remove(pos)
            changed[c] = True
        if events[k + 1][0] == at:
            continue  # more changes at this boundary
        prev = slots[-1]
        hvc = _slot(active[0], entries) if changed[0] else prev[0]
        smc = _slot(active[1], entries) if changed[1] else prev[1]
        changed[0] = changed[1] = False
        if _same(hvc, prev[0]) and _same(smc, prev[1]):
            continue  # equal to its left neighbour: one interval, fewer starts to bisect
        if starts[-1] == at:  # only at 0, which is always a start
            slots[-1] = (hvc, smc)
        else:
            starts.append(at)
            slots.append((hvc, smc))
    return RuleTable(starts, slots)


def union_ranges(ranges: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    """The same IDs as sorted ranges that do not overlap (adjacent ones may stay apart)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _same(a: Slot[Target], b: Slot[Target]) -> bool:
    """a == b for slots made of build_table's shared targets and entries."""
    if a is b:
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
    return False


def _slot(active: list[int], entries: list[Entry[Target]]) -> Slot[Target]:
    if not active:
        return None
    if len(active) == 1 and entries[active[0]].vcpus is None:
        return entries[active[0]].target
    return tuple(entries[pos] for pos in active)


def describe_table(table: RuleTable[T]) -> list[str]:
    """Human-readable lines for ``hvcproxyd check``."""
    lines = []
    for lo, hi, slots in table.intervals():
        parts = []
        for conduit, slot in zip(("hvc", "smc"), slots, strict=False):
            for vcpus, target in slot_targets(slot):
                where = f" vcpus {sorted(vcpus)}" if vcpus is not None else ""
                parts.append(f"{conduit}{where} -> {_name_of(target)}")
        span = f"{lo:#010x}" if lo == hi else f"{lo:#010x}..{hi:#010x}"
        lines.append(f"{span:24} {describe(lo) if lo == hi else '':28} {'; '.join(parts)}")
    return lines


__all__ = ["Entry", "RuleTable", "Slot", "build_table", "describe_table", "slot_targets", "union_ranges"]
