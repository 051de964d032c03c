"""The compiled rule table: sorted intervals with, per conduit, what answers there.

Lookup is ``bisect`` over the interval starts (O(log n)) and then a choice by
conduit; only intervals where some rule names a vCPU set need a short scan.
The same table, with names bound to handler instances, is the VM service's
dispatch table, and it derives the forward/deny ranges for the handshake.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ..smccc import Conduit
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


def slot_targets(slot: Slot) -> list[tuple[frozenset[int] | None, Any]]:
    if slot is None:
        return []
    if type(slot) is tuple:
        return [(e.vcpus, e.target) for e in slot]
    return [(None, slot)]


def _filter_action(slots: tuple[Slot, Slot]) -> FilterAction:
    targets = [t for s in slots for t in slot_targets(s)]
    names = {_name_of(t) for _, t in targets}
    if names == {KVM.name}:
        return FilterAction.HANDLE
    full = all(s is not None and type(s) is not tuple for s in slots)
    if names == {DENY.name} and full:
        return FilterAction.DENY
    return FilterAction.FORWARD


def _name_of(target: Named) -> str:
    return target.name


def build_table(rules: list[RuleSpec]) -> RuleTable[Target]:
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


def describe_table(table: RuleTable[Any]) -> list[str]:
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


__all__ = ["Entry", "RuleTable", "build_table", "describe_table", "slot_targets"]
