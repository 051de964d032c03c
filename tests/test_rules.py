"""The compiled rule table against a brute-force reference."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hvcproxyd.config import Problem
from hvcproxyd.config.source import Mark
from hvcproxyd.rules.checks import compile_rules
from hvcproxyd.rules.parse import RuleSpec
from hvcproxyd.rules.targets import DENY, KVM, Target, ToHandler
from hvcproxyd.smccc import Conduit
from hvcproxyd.wire import FilterAction

MARK = Mark("test", 1, 1)
BLOCKS = (0x8200_0000, 0x8300_0000, 0xC200_0000, 0x8400_0000)
ACTIONS: tuple[Target, ...] = (ToHandler("a"), ToHandler("b"), DENY, KVM)
CONDUITS = (frozenset({Conduit.HVC}), frozenset({Conduit.SMC}), frozenset({Conduit.HVC, Conduit.SMC}))


@st.composite
def rule_sets(draw: st.DrawFn) -> list[RuleSpec]:
    rules: list[RuleSpec] = []
    for i in range(draw(st.integers(0, 12))):
        block = draw(st.sampled_from(BLOCKS))
        lo = draw(st.integers(0, 60))
        hi = draw(st.integers(lo, 64))
        vcpus = draw(st.none() | st.frozensets(st.integers(0, 3), min_size=1))
        rules.append(RuleSpec(i, ((block + lo, block + hi),), draw(st.sampled_from(CONDUITS)), vcpus,
                              draw(st.sampled_from(ACTIONS)), MARK))
    return rules


def brute(rules: list[RuleSpec], fid: int, conduit: Conduit, vcpu: int) -> Target | None:
    hits = [r.action for r in rules if conduit in r.conduits and (r.vcpus is None or vcpu in r.vcpus)
            and any(lo <= fid <= hi for lo, hi in r.ranges)]
    assert len(hits) <= 1
    return hits[0] if hits else None


@settings(max_examples=300, deadline=None)
@given(rule_sets())
def test_lookup_matches_brute_force(rules: list[RuleSpec]) -> None:
    problems: list[Problem] = []
    table = compile_rules(rules, {}, {}, problems)
    if table is None:
        assert any(not p.warning for p in problems)  # refused: overlapping or KVM mixed with forwarding
        return
    for block in BLOCKS:
        for fid in range(block - 1, block + 67):
            for conduit in Conduit:
                for vcpu in range(4):
                    assert table.lookup(fid, conduit, vcpu) == brute(rules, fid, conduit, vcpu), (hex(fid),)
    # The filter agrees with the table: FORWARD wherever a handler answers, DENY only
    # where every conduit and vCPU is denied, nothing where KVM (or nobody) answers.
    for block in BLOCKS:
        for fid in range(block, block + 65):
            # vCPU 4 is in no set: it stands for every vCPU a rule does not name.
            targets = {brute(rules, fid, c, v) for c in Conduit for v in range(5)}
            action = next((r.action for r in table.filter_ranges() if r.base <= fid <= r.last), FilterAction.HANDLE)
            if targets <= {KVM, None}:
                assert action is FilterAction.HANDLE
            elif targets == {DENY}:
                assert action is FilterAction.DENY
            else:
                assert action is FilterAction.FORWARD


def test_lookup_is_logarithmic_in_structure() -> None:
    rules = [RuleSpec(i, ((0x8200_0000 + 2 * i, 0x8200_0000 + 2 * i),), CONDUITS[2], None, ToHandler("a"), MARK)
             for i in range(2000)]
    table = compile_rules(rules, {}, {}, [])
    assert table is not None
    assert len(table.starts) <= 2 * len(rules) + 2  # one interval per boundary, no per-ID expansion
    assert table.lookup(0x8200_0000 + 3998, Conduit.SMC, 0) == ToHandler("a")
    assert table.lookup(0x8200_0000 + 3999, Conduit.SMC, 0) is None
