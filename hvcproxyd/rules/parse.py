"""One rule from the config: what it matches (IDs, conduits, vCPUs) and where it sends it."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ..config.diagnostics import Section
from ..config.source import Mark
from ..smccc import ARCH_RESERVED_RANGES, MBZ_MASK, SVE_HINT, Conduit, FunctionId
from ..smccc.services import SERVICE_NAMES, SERVICES
from .targets import BUILTIN_ACTIONS, KVM, Target, ToHandler

BLOCK = 0xFFFF  # the function-number part of an owner's call block
_CONDUITS = {"hvc": frozenset({Conduit.HVC}), "smc": frozenset({Conduit.SMC}),
             "any": frozenset({Conduit.HVC, Conduit.SMC})}


@dataclass(frozen=True, slots=True)
class RuleSpec:
    index: int
    ranges: tuple[tuple[int, int], ...]
    conduits: frozenset[Conduit]
    vcpus: frozenset[int] | None
    action: Target
    mark: Mark
    service: str | None = None

    @property
    def label(self) -> str:
        # The same 0-based numbering as the key path of a problem (rules[1].match).
        return f"rules[{self.index}] ({self.mark})"


def parse_rule(s: Section, index: int, handlers: Collection[str]) -> RuleSpec | None:
    """The rule in ``s``, or None with the problem recorded; ``handlers`` are the names defined."""

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
    action_name = s.string("action")
    if action_name is None:
        return None
    action = BUILTIN_ACTIONS.get(action_name) or ToHandler(action_name)
    if isinstance(action, ToHandler) and action_name not in handlers:
        names = [*BUILTIN_ACTIONS, *handlers]
        s.problem("action", f"{action_name!r} is neither a handler defined under handlers: nor a built-in; "
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


__all__ = ["BLOCK", "RuleSpec", "parse_rule"]
