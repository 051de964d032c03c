"""The memshare ledger against a brute-force model: a plain set of page numbers."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvcproxyd.handlers.pkvm_memshare.ledger import (
    Change,
    Ledger,
    LedgerFull,
    RangeSet,
    Replica,
    SnapshotView,
    StreamError,
)

G = 4096
PAGES = 64  # a small universe makes overlaps, touches and splits common

page_runs = st.tuples(st.integers(0, PAGES - 1), st.integers(1, 12)).map(
    lambda t: (t[0], min(t[1], PAGES - t[0])))
ops = st.lists(st.tuples(st.sampled_from(["add", "remove"]), page_runs), max_size=60)


def pages_of(rs: RangeSet) -> set[int]:
    return {p for lo, hi in rs.ranges() for p in range(lo // G, hi // G)}


def assert_blocks_consistent(rs: RangeSet) -> None:
    """The block structure behind the ranges: no empty or oversized block, each
    block's last end indexed, and (with more than one block) none below a quarter full."""
    starts, ends, lasts = rs._starts, rs._ends, rs._lasts
    assert len(starts) == len(ends) == len(lasts)
    assert all(0 < len(s) == len(e) <= rs._block for s, e in zip(starts, ends, strict=True))
    assert lasts == [e[-1] for e in ends]
    assert sum(map(len, starts)) == len(rs)
    if len(starts) > 1:
        assert all(len(s) >= rs._block // 4 for s in starts)


def assert_canonical(rs: RangeSet, model: set[int]) -> None:
    """Members match, and ranges are sorted, non-empty and neither overlap nor touch."""
    assert_blocks_consistent(rs)
    assert pages_of(rs) == model
    ranges = rs.ranges()
    assert all(lo < hi for lo, hi in ranges)
    assert all(a_hi < b_lo for (_, a_hi), (b_lo, _) in itertools.pairwise(ranges))
    assert rs.total == len(model) * G
    # Canonical form: as many ranges as the model has maximal runs.
    runs = sum(1 for p in model if p - 1 not in model)
    assert len(rs) == runs


@given(ops, st.lists(page_runs, max_size=20), st.sampled_from([2, 3, 4, 8, RangeSet.BLOCK]))
@settings(deadline=None)  # examples: the profile (tests/conftest.py)
def test_rangeset_matches_a_set_of_pages(operations: list[tuple[str, tuple[int, int]]],
                                         queries: list[tuple[int, int]], block: int) -> None:
    # Tiny blocks make every update split, merge or span blocks.
    rs, model = RangeSet(block=block), set[int]()
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


@given(ops, st.integers(1, 12), st.sampled_from([2, 4, RangeSet.BLOCK]))
@settings(deadline=None)
def test_rangeset_bound_refuses_growth_only(operations: list[tuple[str, tuple[int, int]]], bound: int,
                                            block: int) -> None:
    """With max_ranges, a refused update changes nothing, an accepted one never
    ends above the bound unless it shrank the set, and the result still matches the model."""
    rs, model = RangeSet(block=block), set[int]()
    for op, (first, n) in operations:
        before, count = rs.ranges(), len(rs)
        span = set(range(first, first + n))
        after = model | span if op == "add" else model - span
        runs = sum(1 for p in after if p - 1 not in after)
        accepted = getattr(rs, op)(first * G, (first + n) * G, max_ranges=bound)
        assert accepted == (runs <= bound or runs <= count)
        if accepted:
            model = after
        else:
            assert rs.ranges() == before
        assert_canonical(rs, model)


@given(ops, st.sampled_from([2, 3, RangeSet.BLOCK]))
@settings(deadline=None)
def test_frozen_view_is_unaffected_by_later_changes(operations: list[tuple[str, tuple[int, int]]],
                                                    block: int) -> None:
    rs = RangeSet([(0, G), (4 * G, 6 * G), (10 * G, 11 * G)], block=block)
    view = rs.frozen()
    before = rs.ranges()
    for op, (first, n) in operations:
        getattr(rs, op)(first * G, (first + n) * G)
    assert list(view) == before and view.total == 4 * G and len(view) == 3
    assert RangeSet.from_sorted(rs.frozen(), block=block) == rs


def test_from_sorted_refuses_anything_but_canonical_ranges() -> None:
    assert RangeSet.from_sorted([(0, G), (2 * G, 3 * G)]).ranges() == [(0, G), (2 * G, 3 * G)]
    for bad in ([(0, G), (G, 2 * G)], [(2 * G, 3 * G), (0, G)], [(G, G)], [(0, 1 << 64 + 1)], [(0.5, G)]):
        with pytest.raises(ValueError):
            RangeSet.from_sorted(bad)  # type: ignore[arg-type]


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


def test_ledger_bound_raises_and_changes_nothing() -> None:
    ledger = Ledger(G, max_ranges=2)
    ledger.share(0, G, vcpu=0)
    ledger.share(2 * G, G, vcpu=0)
    with pytest.raises(LedgerFull):
        ledger.share(4 * G, G, vcpu=0)  # a third range
    assert ledger.share(G, G, vcpu=0) is not None  # fills the hole: one range
    assert ledger.share(4 * G, 2 * G, vcpu=0) is not None  # two ranges again
    with pytest.raises(LedgerFull):
        ledger.unshare(G, G, vcpu=0)  # would split [0, 3G) in two: three ranges
    assert ledger.ranges() == [(0, 3 * G), (4 * G, 2 * G)] and ledger.seq == 4
    assert ledger.counters.full == 2 and ledger.counters.refused == 0
    assert ledger.unshare(0, 3 * G, vcpu=0) is not None  # shrinking is always allowed


def test_restored_ledger_above_a_lowered_bound_can_only_shrink() -> None:
    big = Ledger(G)
    for i in range(4):
        big.share(2 * i * G, G, vcpu=0)
    small = Ledger.from_dict(big.to_dict(), max_ranges=2)
    assert len(small.shared) == 4  # guest-visible state is never dropped
    with pytest.raises(LedgerFull):
        small.share(100 * G, G, vcpu=0)
    assert small.share(G, G, vcpu=0) is not None  # merges two: 3 ranges, fewer than before
    assert small.unshare(0, 2 * G, vcpu=0) is not None


def test_snapshot_view_streams_in_chunks_and_stays_consistent() -> None:
    ledger = Ledger(G)
    n = 3 * SnapshotView.CHUNK + 17
    ledger.shared = RangeSet.from_sorted((2 * i * G, (2 * i + 1) * G) for i in range(n))
    view = ledger.view("vm", 1.5)
    ledger.share(2 * n * G, G, vcpu=0)  # after the view: not in it
    chunks = list(view)
    assert len(chunks) >= 4
    record = json.loads(b"".join(chunks))
    assert record["type"] == "snapshot" and record["seq"] == 0 and record["shared"] == n * G
    assert record["ranges"] == [[2 * i * G, G] for i in range(n)]
    assert b"".join(view) == b"".join(chunks)  # iterable again: one view serves several subscribers
    replica = Replica()
    replica.apply(record)
    assert len(replica.shared) == n


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


def test_copy_is_independent_both_ways() -> None:
    ledger = Ledger(G)
    ledger.shared = RangeSet.from_sorted(((2 * i * G, (2 * i + 1) * G) for i in range(2000)), block=4)
    twin = ledger.copy(max_ranges=5000)
    twin.share(4001 * G * 2, G, vcpu=0)
    ledger.unshare(0, G, vcpu=0)
    assert len(twin.shared) == 2001 and len(ledger.shared) == 1999
    assert twin.ranges()[0] == (0, G) and ledger.ranges()[0] == (2 * G, G)
    assert (twin.max_ranges, ledger.max_ranges, twin.seq, ledger.seq) == (5000, None, 1, 1)
    assert_blocks_consistent(twin.shared)
    assert_blocks_consistent(ledger.shared)
