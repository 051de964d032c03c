"""The memshare ledger against a brute-force model: a plain set of page numbers."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcproxyd.handlers.pkvm_memshare.ledger import Change, Ledger, RangeSet, Replica, StreamError

G = 4096
PAGES = 64  # a small universe makes overlaps, touches and splits common

page_runs = st.tuples(st.integers(0, PAGES - 1), st.integers(1, 12)).map(
    lambda t: (t[0], min(t[1], PAGES - t[0])))
ops = st.lists(st.tuples(st.sampled_from(["add", "remove"]), page_runs), max_size=60)


def pages_of(rs: RangeSet) -> set[int]:
    return {p for lo, hi in rs.ranges() for p in range(lo // G, hi // G)}


def assert_canonical(rs: RangeSet, model: set[int]) -> None:
    """Members match, and ranges are sorted, non-empty and neither overlap nor touch."""
    assert pages_of(rs) == model
    ranges = rs.ranges()
    assert all(lo < hi for lo, hi in ranges)
    assert all(a_hi < b_lo for (_, a_hi), (b_lo, _) in itertools.pairwise(ranges))
    assert rs.total == len(model) * G
    # Canonical form: as many ranges as the model has maximal runs.
    runs = sum(1 for p in model if p - 1 not in model)
    assert len(rs) == runs


@given(ops, st.lists(page_runs, max_size=20))
@settings(deadline=None)  # examples: the profile (tests/conftest.py)
def test_rangeset_matches_a_set_of_pages(operations: list[tuple[str, tuple[int, int]]],
                                         queries: list[tuple[int, int]]) -> None:
    rs, model = RangeSet(), set[int]()
    for op, (first, n) in operations:
        span = set(range(first, first + n))
        if op == "add":
            rs.add(first * G, (first + n) * G)
            model |= span
        else:
            rs.remove(first * G, (first + n) * G)
            model -= span
        assert_canonical(rs, model)
    for first, n in queries:
        span = set(range(first, first + n))
        assert rs.covers(first * G, (first + n) * G) == (span <= model)
        assert rs.intersects(first * G, (first + n) * G) == bool(span & model)


def test_rangeset_empty_intervals() -> None:
    rs = RangeSet([(0, G)])
    assert rs.covers(5 * G, 5 * G)
    assert not rs.intersects(0, 0)
    rs.add(3 * G, 3 * G)
    rs.remove(0, 0)
    assert rs.ranges() == [(0, G)]


@given(st.lists(st.tuples(st.sampled_from(["share", "unshare"]), page_runs, st.integers(0, 3)), max_size=60))
@settings(deadline=None)  # examples: the profile (tests/conftest.py)
def test_ledger_is_all_or_nothing_like_pkvm(operations: list[tuple[str, tuple[int, int], int]]) -> None:
    ledger, model = Ledger(G), set[int]()
    seq = 0
    for op, (first, n), vcpu in operations:
        span = set(range(first, first + n))
        before = ledger.ranges()
        change = getattr(ledger, op)(first * G, n * G, vcpu=vcpu)
        allowed = not span & model if op == "share" else span <= model
        if not allowed:
            assert change is None
            assert ledger.ranges() == before
            continue
        model = model | span if op == "share" else model - span
        seq += 1
        assert change is not None
        assert (change.seq, change.op, change.vcpu, change.ipa, change.size, change.shared) == (
            seq, op, vcpu, first * G, n * G, len(model) * G)
        assert_canonical(ledger.shared, model)
    c = ledger.counters
    assert c.shares + c.unshares == seq == ledger.seq
    assert c.shares + c.unshares + c.refused == len(operations)
    assert c.granules_shared - c.granules_unshared == len(model)


def test_ledger_counters_peak_and_reset() -> None:
    ledger = Ledger(G)
    assert ledger.share(0x4000_0000, 4 * G, vcpu=0) is not None
    assert ledger.unshare(0x4000_0000, 3 * G, vcpu=1) is not None
    assert ledger.share(0x4000_0000 + 2 * G, 2 * G, vcpu=0) is None  # its second page is still shared
    assert ledger.counters.refused == 1
    assert ledger.counters.peak_bytes == 4 * G
    reset = ledger.reset()
    assert (reset.op, reset.vcpu, reset.shared, reset.seq) == ("reset", -1, 0, ledger.seq)
    assert ledger.ranges() == [] and ledger.counters.shares == 0 and ledger.counters.resets == 1


@pytest.mark.parametrize(("ipa", "size"), [(1, G), (0, G + 1), (0, 0), (-G, G)])
def test_ledger_refuses_unaligned_ranges_as_caller_bugs(ipa: int, size: int) -> None:
    # Guest input never gets here unchecked; the handler answers INVALID_PARAMETER first.
    with pytest.raises(ValueError):
        Ledger(G).share(ipa, size, vcpu=0)


def test_ledger_granule_must_be_an_arm_granule() -> None:
    with pytest.raises(ValueError):
        Ledger(8192)


def test_is_shared_takes_any_byte_range() -> None:
    ledger = Ledger(G)
    ledger.share(0x1000, 2 * G, vcpu=0)  # [0x1000, 0x3000)
    assert ledger.is_shared(0x1000, 1)
    assert ledger.is_shared(0x1FFF, 0x1001)  # straddles the two shared granules, ends at 0x3000
    assert not ledger.is_shared(0x2FFF, 2)  # its last byte is in 0x3000
    assert not ledger.is_shared(0xFFF, 2)
    assert not ledger.is_shared(0x1000, 0)
    assert not ledger.is_shared(-1, 10)


def test_serialization_round_trip_and_corruption() -> None:
    ledger = Ledger(16384)
    ledger.share(0x10000, 0x8000, vcpu=2)
    ledger.share(0x40000, 0x4000, vcpu=2)
    ledger.unshare(0x10000, 0x4000, vcpu=2)
    data = json.loads(json.dumps(ledger.to_dict()))  # survives JSON, as a state file would
    copy = Ledger.from_dict(data)
    assert copy.ranges() == ledger.ranges() and copy.shared == ledger.shared
    assert (copy.seq, copy.granule, copy.counters) == (ledger.seq, 16384, ledger.counters)
    for bad in ({**data, "format": 99}, {**data, "ranges": [[0x40000, 0x4000], [0x10000, 0x4000]]},
                {**data, "ranges": [[0x10000, 0x4000], [0x14000, 0x4000]]},  # touching: never written
                {**data, "ranges": [[0x10001, 0x4000]]}, {**data, "granule": 3}, {**data, "seq": -1},
                {k: v for k, v in data.items() if k != "counters"}, {**data, "counters": {"nope": 1}}):
        with pytest.raises(ValueError):
            Ledger.from_dict(bad)


def _changed(change: Change | None) -> bytes:
    assert change is not None
    return change.json_line(0.0)


def test_replica_rebuilds_from_snapshot_and_changes() -> None:
    ledger = Ledger(G)
    ledger.share(0, 2 * G, vcpu=0)
    records = [json.loads(ledger.snapshot_line("vm", 0.0))]
    for op, ipa in (("share", 4 * G), ("unshare", 0), ("share", 8 * G)):
        records.append(json.loads(_changed(getattr(ledger, op)(ipa, G, vcpu=1))))
    records.append(json.loads(ledger.reset().json_line(0.0)))
    records.append(json.loads(_changed(ledger.share(G, G, vcpu=3))))
    replica = Replica()
    for rec in records:
        replica.apply(rec)
    assert replica.shared == ledger.shared and replica.seq == ledger.seq and replica.changes == 5


def test_replica_checks_gaps_totals_and_lost_counts() -> None:
    ledger = Ledger(G)
    snap = json.loads(ledger.snapshot_line("vm", 0.0))
    first = json.loads(_changed(ledger.share(0, G, vcpu=0)))
    second = json.loads(_changed(ledger.share(G, G, vcpu=0)))
    with pytest.raises(StreamError, match="snapshot was due"):
        Replica().apply(first)
    gap = Replica()
    gap.apply(snap)
    with pytest.raises(StreamError, match="follows"):
        gap.apply(second)
    wrong_total = Replica()
    wrong_total.apply(snap)
    with pytest.raises(StreamError, match="bytes"):
        wrong_total.apply({**first, "shared": 5 * G})
    # Told one change was lost, but the snapshot skips two.
    miscounted = Replica()
    miscounted.apply(snap)
    miscounted.apply({"type": "lost", "count": 1})
    with pytest.raises(StreamError, match="lost"):
        miscounted.apply(json.loads(ledger.snapshot_line("vm", 0.0)))
    honest = Replica()
    honest.apply(snap)
    honest.apply({"type": "lost", "count": 2})
    honest.apply(json.loads(ledger.snapshot_line("vm", 0.0)))
    assert honest.shared == ledger.shared and honest.lost == 2
