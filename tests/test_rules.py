"""The compiled rule table against a brute-force reference, and the sweep-line
compiler against the quadratic one it replaced (kept below as the reference)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcproxyd.config import ConfigError, Problem
from hvcproxyd.config.source import Mark
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.rules import checks
from hvcproxyd.rules.checks import HandlerFacts, compile_rules
from hvcproxyd.rules.parse import RuleSpec
from hvcproxyd.rules.table import Entry, RuleTable, Slot, build_table, slot_targets
from hvcproxyd.rules.targets import DENY, KVM, Target, ToHandler
from hvcproxyd.smccc import Conduit
from hvcproxyd.wire import FilterAction

MARK = Mark("test", 1, 1)
BLOCKS = (0x8200_0000, 0x8300_0000, 0xC200_0000, 0x8400_0000)
ACTIONS: tuple[Target, ...] = (ToHandler("a"), ToHandler("b"), DENY, KVM)
CONDUITS = (frozenset({Conduit.HVC}), frozenset({Conduit.SMC}), frozenset({Conduit.HVC, Conduit.SMC}))


#: Owner 6 (vendor hyp) and 50 (trusted OS) have an ABI identity: the owner checks run.
IDENTITY_BLOCKS = (0x8600_0000, 0xC600_0000, 0xB200_0000, 0x3200_0000)
OVERLAP = "two rules may not match the same call"


@st.composite
def rule_sets(draw: st.DrawFn, max_rules: int = 12, blocks: tuple[int, ...] = BLOCKS, span: int = 64,
              vcpus: int = 3) -> list[RuleSpec]:
    rules: list[RuleSpec] = []
    for i in range(draw(st.integers(0, max_rules))):
        block = draw(st.sampled_from(blocks))
        lo = draw(st.integers(0, span - 4))
        hi = draw(st.integers(lo, span))
        ranges = [(block + lo, block + hi)]
        # Like a service: the same function numbers in a second block (e.g. the SMC64 half).
        if draw(st.integers(0, 4)) == 0:
            other = draw(st.sampled_from(blocks))
            if other != block:
                ranges.append((other + lo, other + hi))
        vset = draw(st.none() | st.frozensets(st.integers(0, vcpus), min_size=1))
        rules.append(RuleSpec(i, tuple(ranges), draw(st.sampled_from(CONDUITS)), vset,
                              draw(st.sampled_from(ACTIONS)), MARK))
    return rules


def brute(rules: list[RuleSpec], fid: int, conduit: Conduit, vcpu: int) -> Target | None:
    hits = [r.action for r in rules if conduit in r.conduits and (r.vcpus is None or vcpu in r.vcpus)
            and any(lo <= fid <= hi for lo, hi in r.ranges)]
    assert len(hits) <= 1
    return hits[0] if hits else None


@settings(deadline=None)  # examples: the profile (tests/conftest.py)
@given(rule_sets())
def test_lookup_matches_brute_force(rules: list[RuleSpec]) -> None:
    problems: list[Problem] = []
    table = compile_rules(rules, {}, {}, problems)
    # Refused for overlap exactly when some pair of rules can match one call, and each
    # rule that overlaps an earlier one is blamed once, on the earliest of them.
    pairs = brute_overlaps(rules)
    blamed = {(p.key, p.message.split(" at ")[0]) for p in problems if OVERLAP in p.message}
    assert blamed == {(f"rules[{b}].match", f"overlaps {rules[a].label}") for b, a in first_per_rule(pairs).items()}
    assert len(blamed) == sum(OVERLAP in p.message for p in problems)
    assert build_table(rules).slots == old_build_table(rules).slots
    assert build_table(rules).starts == old_build_table(rules).starts
    if table is None:
        assert any(not p.warning for p in problems)  # refused: overlapping or KVM mixed with forwarding
        return
    assert not pairs
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


@settings(deadline=None)  # examples: the profile (tests/conftest.py)
@given(rule_sets(max_rules=30, blocks=BLOCKS[:2] + IDENTITY_BLOCKS[:2], span=24, vcpus=5))
def test_compile_matches_quadratic_reference(rules: list[RuleSpec]) -> None:
    """Dense rule sets (many overlaps): every problem, in order, is what the old
    compiler reported, except that a rule overlapping several earlier ones is
    reported once, for the first of them (the old one reported every pair)."""
    new: list[Problem] = []
    old: list[Problem] = []
    table = compile_rules(rules, {}, {}, new)
    old_table = old_compile_rules(rules, {}, {}, old)
    assert new == first_overlap_per_rule(old)
    assert (table is None) == (old_table is None)
    if table is not None and old_table is not None:
        assert (table.starts, table.slots) == (old_table.starts, old_table.slots)


@settings(deadline=None)  # examples: the profile (tests/conftest.py)
@given(rule_sets(max_rules=10, blocks=IDENTITY_BLOCKS, span=0xFFFF, vcpus=2))
def test_identity_owner_checks_match_quadratic_reference(rules: list[RuleSpec]) -> None:
    new: list[Problem] = []
    old: list[Problem] = []
    compile_rules(rules, {}, {}, new)
    old_compile_rules(rules, {}, {}, old)
    assert new == first_overlap_per_rule(old)


def test_kvm_mixing_blames_the_first_rules_at_each_interval() -> None:
    a = 0x8200_0000
    rules = [RuleSpec(0, ((a + 5, a + 9),), CONDUITS[0], None, ToHandler("a"), MARK),
             RuleSpec(1, ((a, a + 20),), CONDUITS[1], None, KVM, MARK),
             RuleSpec(2, ((a + 12, a + 30),), CONDUITS[0], frozenset({1}), DENY, MARK),
             RuleSpec(3, ((a + 25, a + 25),), CONDUITS[1], None, KVM, MARK)]
    new: list[Problem] = []
    old: list[Problem] = []
    assert compile_rules(rules, {}, {}, new) is None
    old_compile_rules(rules, {}, {}, old)
    assert new == old
    assert [(p.key, p.message.split(" leaves")[0]) for p in new if not p.warning] == [
        ("rules[0].action", "at 0x82000005 rules[1] (test:1:1)"),
        ("rules[2].action", "at 0x8200000c rules[1] (test:1:1)"),
        ("rules[2].action", "at 0x82000019 rules[3] (test:1:1)")]


# -- 10 000 rules: results only (the time they take is measured in bench/rules_bench.py)

def many_disjoint_rules(n: int) -> list[RuleSpec]:
    """n rules that fit together: single IDs, ranges, per-conduit pairs and vCPU splits."""
    rules: list[RuleSpec] = []
    blocks = (0x8200_0000, 0xC200_0000, 0x8300_0000, 0xC300_0000, 0xC500_0000)
    for k in range(n):
        base = blocks[k % len(blocks)] + 0x1000 + 4 * (k // len(blocks))  # four IDs of its own
        kind = k % 7
        if kind == 3:  # one ID, a rule per conduit
            rules.append(RuleSpec(len(rules), ((base, base),), CONDUITS[0], None, ToHandler("a"), MARK))
            rules.append(RuleSpec(len(rules), ((base, base),), CONDUITS[1], None, DENY, MARK))
        elif kind == 5:  # a range split over vCPUs
            rules.append(RuleSpec(len(rules), ((base, base + 2),), CONDUITS[2], frozenset({0, 1}), ToHandler("a"),
                                  MARK))
            rules.append(RuleSpec(len(rules), ((base, base + 2),), CONDUITS[2], frozenset({2}), ToHandler("b"),
                                  MARK))
        else:
            last = base + (3 if kind == 1 else 0)
            rules.append(RuleSpec(len(rules), ((base, last),), CONDUITS[2], None, ACTIONS[kind % 3], MARK))
    return rules[:n]


def test_ten_thousand_disjoint_rules_compile() -> None:
    rules = many_disjoint_rules(10_000)
    problems: list[Problem] = []
    table = compile_rules(rules, {}, {}, problems)
    assert table is not None, [p for p in problems if not p.warning][:3]
    assert len(table.starts) <= 2 * sum(len(r.ranges) for r in rules) + 1
    for r in rules:
        for lo, hi in r.ranges:
            for conduit in r.conduits:
                vcpu = min(r.vcpus) if r.vcpus else 7
                assert table.lookup(lo, conduit, vcpu) == r.action
                assert table.lookup(hi, conduit, vcpu) == r.action
                if r.vcpus:
                    assert table.lookup(lo, conduit, 7) is None


def test_ten_thousand_overlapping_rules_are_refused_once_each() -> None:
    """Rule i covers IDs i..i+50 and names vCPU i % 2: rule b collides with every
    earlier rule of its parity less than 51 IDs away, and is blamed on the first."""
    base = 0x8200_0000
    rules = [RuleSpec(i, ((base + i, base + i + 50),), CONDUITS[i % 3], frozenset({i % 2}), ToHandler("a"), MARK)
             for i in range(10_000)]
    problems: list[Problem] = []
    assert compile_rules(rules, {}, {}, problems) is None
    expected = {}
    for b, rule in enumerate(rules):
        a = next((a for a in range(max(0, b - 50), b)
                  if a % 2 == b % 2 and rules[a].conduits & rule.conduits), None)
        if a is not None:
            expected[b] = f"overlaps {rules[a].label} at {base + b:#010x}..{base + a + 50:#010x}"
    assert len(problems) == len(expected) > 9_000
    assert {int(p.key[6:-7]): p.message.split(" for conduit")[0] for p in problems} == expected


# -- references

def brute_overlaps(rules: list[RuleSpec]) -> set[tuple[int, int]]:
    """(a, b), a < b, for every pair of rules that can match one call: checked ID by ID."""
    out = set()
    for b, rb in enumerate(rules):
        for a, ra in enumerate(rules[:b]):
            vcpus_meet = ra.vcpus is None or rb.vcpus is None or bool(ra.vcpus & rb.vcpus)
            ids = {f for lo, hi in ra.ranges for f in range(lo, hi + 1)}
            if ra.conduits & rb.conduits and vcpus_meet and any(f in ids for lo, hi in rb.ranges
                                                                 for f in range(lo, hi + 1)):
                out.add((a, b))
    return out


def first_per_rule(pairs: set[tuple[int, int]]) -> dict[int, int]:
    first: dict[int, int] = {}
    for a, b in sorted(pairs):
        first.setdefault(b, a)
    return first


def first_overlap_per_rule(problems: list[Problem]) -> list[Problem]:
    """The old compiler's problems with only the first overlap report for each rule."""
    seen: set[str] = set()
    out = []
    for p in problems:
        if OVERLAP in p.message:
            if p.key in seen:
                continue
            seen.add(p.key)
        out.append(p)
    return out


def old_compile_rules(rules: list[RuleSpec], handlers: Mapping[str, HandlerFacts], versions: dict[str, str],
                      problems: list[Problem]) -> RuleTable[Target] | None:
    """compile_rules as it was before the sweep line (O(n^2)), with the checks that did not change."""
    def err(rule: RuleSpec, key: str, msg: str, warning: bool = False) -> None:
        problems.append(Problem(rule.mark, f"rules[{rule.index}].{key}", msg, warning))

    before = sum(1 for p in problems if not p.warning)
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
    table = old_build_table(rules)
    for lo, _hi, slots in table.intervals():
        names = {t.name for s in slots for _, t in slot_targets(s)}
        if KVM.name in names and len(names) > 1:
            culprits = [r for r in rules if any(rlo <= lo <= rhi for rlo, rhi in r.ranges)]
            kvm_rule = next(r for r in culprits if r.action == KVM)
            other = next(r for r in culprits if r.action != KVM)
            problems.append(Problem(other.mark, f"rules[{other.index}].action",
                                    f"at {lo:#010x} {kvm_rule.label} leaves the call to KVM while this rule "
                                    f"sends it to {other.action.name!r}; KVM's SMCCC filter cannot tell conduits or "
                                    "vCPUs apart, so a function ID is either left to KVM everywhere or nowhere"))
    checks._check_identity_owners(table, rules, handlers, problems)
    checks._check_versions(rules, handlers, versions, problems)
    checks._warn_risky(table, rules, handlers, problems)
    if sum(1 for p in problems if not p.warning) > before:
        return None
    return table


def old_build_table(rules: list[RuleSpec]) -> RuleTable[Target]:
    """build_table as it was: every rule scanned at every boundary (O(n^2))."""
    bounds = {0}
    for rule in rules:
        for lo, hi in rule.ranges:
            bounds.add(lo)
            if hi < 0xFFFF_FFFF:
                bounds.add(hi + 1)
    starts = sorted(bounds)
    slots: list[tuple[Slot[Target], Slot[Target]]] = []
    for start in starts:
        per_conduit: list[Slot[Target]] = []
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
    m_starts: list[int] = []
    m_slots: list[tuple[Slot[Target], Slot[Target]]] = []
    for start, slot in zip(starts, slots, strict=True):
        if m_slots and m_slots[-1] == slot:
            continue
        m_starts.append(start)
        m_slots.append(slot)
    return RuleTable(m_starts, m_slots)


def test_a_rule_whose_own_ranges_overlap_is_not_an_overlap() -> None:
    a = 0x8200_0000
    rules = [RuleSpec(0, ((a, a + 5), (a + 3, a + 8), (a + 9, a + 9)), CONDUITS[2], None, ToHandler("a"), MARK),
             RuleSpec(1, ((a + 10, a + 12),), CONDUITS[0], frozenset({1}), DENY, MARK)]
    problems: list[Problem] = []
    table = compile_rules(rules, {}, {}, problems)
    assert table is not None and not [p for p in problems if not p.warning]
    assert (table.starts, table.slots) == (old_build_table(rules).starts, old_build_table(rules).slots)
    assert [table.lookup(a + i, Conduit.SMC, 0) for i in (0, 4, 8, 9, 10)] == [ToHandler("a")] * 4 + [None]


def test_long_range_minimum_queries_match_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to checks._SHORT members starting inside a range are a slice; make every
    query go through the segment tree instead and compare with the old compiler."""
    monkeypatch.setattr(checks, "_SHORT", 0)
    rnd = random.Random(7)
    for _ in range(40):
        rules = [RuleSpec(i, ((0x8200_0000 + lo, 0x8200_0000 + lo + rnd.randint(0, 40)),),
                          rnd.choice(CONDUITS), rnd.choice([None, frozenset({rnd.randint(0, 3)})]),
                          rnd.choice(ACTIONS), MARK)
                 for i, lo in enumerate(rnd.randint(0, 200) for _ in range(rnd.randint(2, 60)))]
        new: list[Problem] = []
        old: list[Problem] = []
        compile_rules(rules, {}, {}, new)
        old_compile_rules(rules, {}, {}, old)
        assert new == first_overlap_per_rule(old)


def test_except_leaves_ids_of_an_identity_owner_to_kvm(make_config: Callable[[str], VmConfig]) -> None:
    """A handler owning the vendor range may leave KVM's PTP clock to KVM: the filter
    skips it, and check says what that means."""
    config = make_config("""
        vm: t
        handlers: {ms: {type: pkvm-memshare, options: {stream: false}}}
        rules:
          - {match: kvm-vendor, except: [kvm-ptp, 0xc6000005], action: ms}
        """)
    ranges = [(r.base, r.last) for r in config.table.filter_ranges()]
    assert ranges == [(0x8600_0000, 0x8600_0000), (0x8600_0002, 0x8600_FFFF), (0xC600_0000, 0xC600_0004),
                      (0xC600_0006, 0xC600_FFFF)]
    assert [w.key for w in config.warnings] == ["rules[0].except", "rules[0].except"]
    assert "under KVM the kernel answers these calls" in config.warnings[0].message


@pytest.mark.parametrize(("rule", "key", "message"), [
    ("{match: kvm-vendor, except: 0x86010001, action: ms}", "rules[0].except", "not inside what this rule matches"),
    ("{match: 0x86000001, except: 0x86000001, action: ms}", "rules[0].except", "takes out everything"),
    ("{match: kvm-vendor, except: nosuch, action: ms}", "rules[0].except", "unknown service 'nosuch'"),
    ("{match: kvm-vendor, except: [1.5], action: ms}", "rules[0].except", "or a list of those"),
    ("{match: [0x82000000, 0x820000ff], except: 0x82000001, action: deny}", "rules[0].except",
     "only a rule that sends calls to a handler"),
    ("{match: [0x86000000, 0x8600fffe], action: ms}", "rules[0].match", "0x8600ffff (hvc) is not covered"),
])
def test_except_errors(rule: str, key: str, message: str, make_config: Callable[[str], VmConfig]) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(f"""
            vm: t
            handlers: {{ms: {{type: pkvm-memshare, options: {{stream: false}}}}}}
            rules:
              - {rule}
            """)
    problems = info.value.problems
    assert any(p.key == key and message in p.message for p in problems), problems

