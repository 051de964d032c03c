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
    #: IDs ``except:`` took out of ``match``: no rule answers them, so KVM does.
    excepted: tuple[tuple[int, int], ...] = ()

    @property
    def label(self) -> str:
        # The same 0-based numbering as the key path of a problem (rules[1].match).
        return f"rules[{self.index}] ({self.mark})"


def parse_rule(s: Section, index: int, handlers: Collection[str]) -> RuleSpec | None:
    """The rule in ``s``, or None with the problem recorded; ``handlers`` are the names defined."""

    s.allow_keys(("match", "except", "conduit", "vcpus", "action"))
    matched = _ids(s, "match", s.raw("match"))
    if matched is None:
        return None
    service, ranges = matched
    excepted: list[tuple[int, int]] = []
    if s.has("except"):
        raw = s.raw("except")
        # One item (a service, an ID, a [first, last] pair), or a list of them.
        items = raw if isinstance(raw, list) and not _is_pair(raw) else [raw]
        for item in items:
            got = _ids(s, "except", item)
            if got is None:
                return None
            excepted.extend(got[1])
        for lo, hi in excepted:
            if not any(mlo <= lo and hi <= mhi for mlo, mhi in ranges):
                s.problem("except", f"{lo:#010x}..{hi:#010x} is not inside what this rule matches; "
                                    "except: takes IDs out of the rule's own match")
                return None
        ranges = _subtract(ranges, excepted)
        if not ranges:
            s.problem("except", "takes out everything the rule matches")
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
    if excepted and not isinstance(action, ToHandler):
        s.problem("except", f"only a rule that sends calls to a handler may leave some to KVM; action {action.name!r} "
                            "with except: is two rules: write them so")
        return None
    return RuleSpec(index, tuple(ranges), _CONDUITS[conduit or "any"], vcpus, action, s.data.mark, service,
                    tuple(sorted(excepted)))


def _is_pair(value: list[object]) -> bool:
    return len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _ids(s: Section, key: str, value: object) -> tuple[str | None, list[tuple[int, int]]] | None:
    """A service name, a function ID or an inclusive [first, last] range, as
    (the service's name or None, its ranges); None with the problem recorded."""
    if isinstance(value, str):
        if value not in SERVICES:
            s.problem(key, f"unknown service {value!r}; a service is one of: {', '.join(SERVICE_NAMES)}; "
                           "or give a function ID or an inclusive [first, last] range")
            return None
        return value, list(SERVICES[value])
    if isinstance(value, int) and not isinstance(value, bool):
        return None, [(value, value)]
    if isinstance(value, list) and _is_pair(value):
        return None, [(int(value[0]), int(value[1]))]
    s.problem(key, "must be a service name, a function ID, or an inclusive [first, last] range"
                   + (", or a list of those" if key == "except" else ""), mark=s.mark_of(key))
    return None


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` without ``holes`` (inclusive ranges), in order."""
    out = []
    for lo, hi in ranges:
        pos = lo
        for hlo, hhi in sorted(holes):
            if hhi < pos or hlo > hi:
                continue
            if hlo > pos:
                out.append((pos, hlo - 1))
            pos = max(pos, hhi + 1)
        if pos <= hi:
            out.append((pos, hi))
    return out


__all__ = ["BLOCK", "RuleSpec", "parse_rule"]
