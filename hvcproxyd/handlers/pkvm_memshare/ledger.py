"""The memshare ledger: which guest granules are shared with the host, as
coalesced ranges, plus counters.  Sans-IO: no trio, no sockets, no clock of its
own (the publisher stamps the time), so the handler, the event stream, tests and other
handlers' "is this range shared?" checks all share one definition.

Guests share memory one 4 KiB granule at a time (mainline pKVM) but in long
runs (a swiotlb pool, a virtio ring), so ranges stay few while pages are many;
a sorted pair of start/end lists answers every query with a bisect.
"""

from __future__ import annotations

import itertools
import json
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

LEDGER_FORMAT = 1
#: Ranges are of 64-bit addresses (array('Q') holds them).
ADDRESS_END = 1 << 64
GRANULES = (4096, 16384, 65536)


class RangeSet:
    """A set of integers held as sorted, disjoint, non-touching half-open ranges.

    Adjacent ranges are always merged, so two sets with the same members have
    the same ranges (what lets a subscriber's reconstruction be compared with
    ``==``).

    The ranges live in blocks of at most ``block`` entries, each block a pair
    of ``array('Q')`` (starts, ends), copied on write once a view or copy
    shares it: an update edits or rebuilds only the one or few blocks it
    touches.  Hand-written rather
    than a flat sorted list or ``sortedcontainers`` because it gives three
    things at once that a fragmented ledger of millions of ranges needs
    (bench/ledger_bench.py): an update costs O(block + n/block) instead of a
    memmove of the whole list (about 2 ms per middle insert at 2 M ranges
    flat); :meth:`frozen` is a copy of the block lists only, so a subscriber's
    snapshot is consistent without copying (or pausing on) the ranges; and 16
    bytes a range instead of about 80 for lists of Python ints.
    """

    __slots__ = ("_block", "_count", "_ends", "_lasts", "_owned", "_starts", "total")

    #: Entries a block may hold; a block is merged with a neighbour below a quarter of it.
    BLOCK = 512

    def __init__(self, ranges: Iterable[tuple[int, int]] = (), *, block: int = BLOCK) -> None:
        if block < 2:
            raise ValueError("block must be at least 2")
        self._block = block
        self._starts: list[array[int]] = []  # per block
        self._ends: list[array[int]] = []
        self._lasts: list[int] = []  # the last end of each block: sorted, what a lookup bisects
        self._owned: list[bool] = []  # False while a view or copy may share the block: copy before editing
        self._count = 0
        self.total = 0
        for lo, hi in ranges:
            self.add(lo, hi)

    @classmethod
    def from_sorted(cls, ranges: Iterable[tuple[int, int]], *, block: int = BLOCK) -> RangeSet:
        """Built in one pass from ranges already in canonical form (sorted,
        non-empty, neither overlapping nor touching); raises ValueError on any
        that is not, so a restored or received ledger can never be malformed."""
        rs = cls(block=block)
        starts, ends = array("Q"), array("Q")
        prev = -1
        total = 0
        for lo, hi in ranges:
            if not (isinstance(lo, int) and isinstance(hi, int)) or lo <= prev or hi <= lo or hi > ADDRESS_END:
                raise ValueError(f"range [{lo!r}, {hi!r}) is not sorted, non-empty, disjoint and non-touching")
            starts.append(lo)
            ends.append(hi)
            total += hi - lo
            prev = hi
        rs._replace(0, 0, starts, ends)
        rs._count, rs.total = len(starts), total
        return rs

    def __len__(self) -> int:
        return self._count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self.total == other.total and self._count == other._count and self.ranges() == other.ranges()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return "RangeSet([" + ", ".join(f"({a:#x}, {b:#x})" for a, b in self.ranges()) + "])"

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) pairs, end exclusive, in address order."""
        return list(self.frozen())

    def copy(self) -> RangeSet:
        """An independent copy in O(blocks): both sides copy a shared block before editing it."""
        twin = RangeSet(block=self._block)
        self._owned = [False] * len(self._starts)
        twin._starts, twin._ends, twin._lasts = list(self._starts), list(self._ends), list(self._lasts)
        twin._owned = list(self._owned)
        twin._count, twin.total = self._count, self.total
        return twin

    def frozen(self) -> FrozenRanges:
        """The ranges as they are now, unaffected by later changes; O(blocks), not O(ranges)."""
        self._owned = [False] * len(self._starts)
        return FrozenRanges(tuple(self._starts), tuple(self._ends), self._count, self.total)

    # -- queries
    def _find(self, x: int) -> tuple[int, int]:
        """(block, index) of the last range starting at or before x, or (-1, -1)."""
        b = bisect_left(self._lasts, x)  # first block whose last end >= x
        if b == len(self._lasts):
            b -= 1
        while b >= 0:
            i = bisect_right(self._starts[b], x) - 1
            if i >= 0:
                return b, i
            b -= 1  # x lies before this block's first range: the previous block holds the answer
        return -1, -1

    def covers(self, lo: int, hi: int) -> bool:
        """Every member of [lo, hi) is in the set (an empty interval is covered)."""
        if hi <= lo:
            return True
        b, i = self._find(lo)
        return b >= 0 and self._ends[b][i] >= hi

    def intersects(self, lo: int, hi: int) -> bool:
        """Some member of [lo, hi) is in the set."""
        if hi <= lo:
            return False
        # The last range starting before hi is the only candidate: ranges are disjoint and sorted.
        b, i = self._find(hi - 1)
        return b >= 0 and self._ends[b][i] > lo

    # -- updates
    def _span(self, lo: int, hi: int) -> tuple[int, int]:
        """Blocks [b0, b1) that an update of [lo, hi] may touch, touching ranges included."""
        lasts = self._lasts
        nb = len(lasts)
        b0 = bisect_left(lasts, lo)  # first block with a range ending at or after lo
        if b0 >= nb:
            return nb - 1, nb
        b1 = b0 + 1
        while b1 < nb and self._starts[b1][0] <= hi:
            b1 += 1
        return b0, b1

    def _own(self, b: int) -> tuple[array[int], array[int]]:
        """Block b's arrays, copied first if a view or copy may still hold them."""
        if not self._owned[b]:
            self._starts[b], self._ends[b] = self._starts[b][:], self._ends[b][:]
            self._owned[b] = True
        return self._starts[b], self._ends[b]

    def _settle(self, b: int) -> None:
        """After an in-place edit of block b: index it, or re-cut it if it outgrew
        ``block`` or shrank below a quarter of it."""
        ends = self._ends[b]
        m = len(ends)
        if m > self._block or (m < self._block // 4 and len(self._lasts) > 1):
            self._replace(b, b + 1, self._starts[b], ends)
        elif m:
            self._lasts[b] = ends[-1]
        else:
            del self._starts[b], self._ends[b], self._lasts[b], self._owned[b]

    def _replace(self, b0: int, b1: int, starts: array[int], ends: array[int]) -> None:
        """Blocks [b0, b1) become ``starts``/``ends``, re-cut into new blocks of at most ``block``."""
        block = self._block
        if 0 < len(starts) < block // 4:
            # Too small to stand alone: take in a neighbour so blocks stay few.
            if b1 < len(self._lasts):
                starts, ends = starts + self._starts[b1], ends + self._ends[b1]
                b1 += 1
            elif b0 > 0:
                b0 -= 1
                starts, ends = self._starts[b0] + starts, self._ends[b0] + ends
        m = len(starts)
        pieces = -(-m // block)
        cuts = [m * k // pieces for k in range(pieces + 1)] if pieces else [0]
        new_e = [ends[x:y] for x, y in itertools.pairwise(cuts)]
        self._starts[b0:b1] = [starts[x:y] for x, y in itertools.pairwise(cuts)]
        self._ends[b0:b1] = new_e
        self._lasts[b0:b1] = [e[-1] for e in new_e]
        self._owned[b0:b1] = [True] * len(new_e)

    def _joined(self, b0: int, b1: int) -> tuple[array[int], array[int]]:
        starts, ends = array("Q"), array("Q")
        for b in range(b0, b1):
            starts += self._starts[b]
            ends += self._ends[b]
        return starts, ends

    def add(self, lo: int, hi: int, *, max_ranges: int | None = None) -> bool:
        """Union with [lo, hi), merging every range it overlaps or touches.

        False, and nothing changed, if that would leave more than ``max_ranges`` ranges."""
        if hi <= lo:
            return True
        if not self._lasts:
            if max_ranges is not None and max_ranges < 1:
                return False
            self._replace(0, 0, array("Q", (lo,)), array("Q", (hi,)))
            self._count, self.total = 1, hi - lo
            return True
        b0, b1 = self._span(lo, hi)
        single = b1 - b0 == 1
        starts, ends = (self._starts[b0], self._ends[b0]) if single else self._joined(b0, b1)
        i = bisect_left(ends, lo)       # first range ending at or after lo (touching counts)
        j = bisect_right(starts, hi)    # first range starting after hi
        count = self._count - (j - i) + 1
        if max_ranges is not None and count > max_ranges and count > self._count:
            return False
        merged = 0
        if i < j:
            merged = ends[i] - starts[i] if j - i == 1 else sum(ends[i:j]) - sum(starts[i:j])
            if starts[i] < lo:
                lo = starts[i]
            if ends[j - 1] > hi:
                hi = ends[j - 1]
        self._count = count
        self.total += (hi - lo) - merged
        if not single:
            self._replace(b0, b1, starts[:i] + array("Q", (lo,)) + starts[j:], ends[:i] + array("Q", (hi,)) + ends[j:])
            return True
        if not self._owned[b0]:
            starts, ends = self._own(b0)
        if i < j:
            starts[i] = lo
            ends[i] = hi
            if j - i > 1:
                del starts[i + 1:j], ends[i + 1:j]
        else:
            starts.insert(i, lo)
            ends.insert(i, hi)
        self._settle(b0)
        return True

    def remove(self, lo: int, hi: int, *, max_ranges: int | None = None) -> bool:
        """Difference with [lo, hi), splitting a range it cuts through.

        False, and nothing changed, if that would leave more than ``max_ranges`` ranges."""
        if hi <= lo or not self._lasts:
            return True
        b0, b1 = self._span(lo, hi)
        single = b1 - b0 == 1
        starts, ends = (self._starts[b0], self._ends[b0]) if single else self._joined(b0, b1)
        i = bisect_right(ends, lo)      # first range ending after lo
        j = bisect_left(starts, hi)     # first range starting at or after hi
        if i >= j:
            return True
        head = starts[i] < lo  # what is left of the first range, before lo
        tail = ends[j - 1] > hi  # and of the last, after hi
        count = self._count - (j - i) + head + tail
        if max_ranges is not None and count > max_ranges and count > self._count:
            return False
        first, last = starts[i], ends[j - 1]
        removed = ends[i] - first if j - i == 1 else sum(ends[i:j]) - sum(starts[i:j])
        self.total -= removed - (lo - first if head else 0) - (last - hi if tail else 0)
        self._count = count
        keep_s = array("Q", ((first,) if head else ()) + ((hi,) if tail else ()))
        keep_e = array("Q", ((lo,) if head else ()) + ((last,) if tail else ()))
        if not single:
            self._replace(b0, b1, starts[:i] + keep_s + starts[j:], ends[:i] + keep_e + ends[j:])
            return True
        if not self._owned[b0]:
            starts, ends = self._own(b0)
        starts[i:j] = keep_s
        ends[i:j] = keep_e
        self._settle(b0)
        return True

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._lasts.clear()
        self._owned.clear()
        self._count = 0
        self.total = 0


class FrozenRanges:
    """A :class:`RangeSet` as it was at :meth:`RangeSet.frozen`: iterating gives
    its (start, end) pairs; :meth:`blocks` gives them a block at a time, for a
    walk that yields to the event loop between blocks."""

    __slots__ = ("_ends", "_starts", "count", "total")

    def __init__(self, starts: tuple[array[int], ...], ends: tuple[array[int], ...], count: int, total: int) -> None:
        self._starts, self._ends, self.count, self.total = starts, ends, count, total

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for s, e in zip(self._starts, self._ends, strict=True):
            yield from zip(s, e, strict=True)

    def blocks(self) -> Iterator[tuple[array[int], array[int]]]:
        yield from zip(self._starts, self._ends, strict=True)


class Change(NamedTuple):
    """One applied ledger transition, as subscribers see it.  ``shared`` is the
    VM's shared total in bytes *after* the change, so a reader can check its
    own reconstruction as it goes."""

    seq: int
    op: str  # "share", "unshare" or "reset"
    vcpu: int  # -1 for a VM-wide change (reset)
    ipa: int
    size: int
    shared: int

    def json_line(self, now: float) -> bytes:
        """The stream record, stamped with ``now`` by whoever publishes it."""
        # Hand-formatted: this runs once per guest call while anyone subscribes.
        return (f'{{"type":"{self.op}","seq":{self.seq},"time":{now:.6f},"vcpu":{self.vcpu},'
                f'"ipa":{self.ipa},"size":{self.size},"shared":{self.shared}}}\n').encode()


@dataclass(slots=True)
class Counters:
    """Cumulative since the VM's last reset (``resets`` since the ledger was made)."""

    shares: int = 0  # successful MEM_SHARE calls
    unshares: int = 0
    granules_shared: int = 0  # granules moved by them
    granules_unshared: int = 0
    refused: int = 0  # calls refused for the ledger's state (already shared / not shared)
    full: int = 0  # calls refused because they would take the ledger past max_ranges
    peak_bytes: int = 0
    resets: int = 0


class LedgerFull(Exception):
    """The change would take the ledger past its ``max_ranges``: the guest is
    refused as pKVM refuses a share it has no page-table memory for."""


class Ledger:
    """One VM's shared granules.  ``share``/``unshare`` are all-or-nothing: a
    request that overlaps the wrong state changes nothing and returns None, as
    pKVM refuses the whole transition.

    ``max_ranges`` bounds the ledger's memory, which grows with how fragmented
    the guest's sharing is, not with how much it shares: a change that would
    need more ranges raises :class:`LedgerFull` and changes nothing.  A change
    that leaves no more ranges than before is always allowed, so a ledger
    restored above a lowered bound can still shrink."""

    def __init__(self, granule: int = 4096, *, max_ranges: int | None = None) -> None:
        if granule not in GRANULES:
            raise ValueError(f"granule must be one of {GRANULES}, not {granule}")
        self.granule = granule
        self.max_ranges = max_ranges
        self.shared = RangeSet()
        self.counters = Counters()
        #: Number of the last change; a snapshot carries it so a reader knows which events it already covers.
        self.seq = 0

    def _check(self, ipa: int, size: int) -> None:
        mask = self.granule - 1
        if ipa < 0 or size <= 0 or ipa & mask or size & mask:
            # A caller bug, never guest input: the handler validates before it asks.
            raise ValueError(f"{ipa:#x}+{size:#x} is not a non-empty granule-aligned range")

    def share(self, ipa: int, size: int, *, vcpu: int) -> Change | None:
        self._check(ipa, size)
        if self.shared.intersects(ipa, ipa + size):
            self.counters.refused += 1
            return None
        if not self.shared.add(ipa, ipa + size, max_ranges=self.max_ranges):
            self.counters.full += 1
            raise LedgerFull(f"{len(self.shared)} ranges, max_ranges {self.max_ranges}")
        c = self.counters
        c.shares += 1
        c.granules_shared += size // self.granule
        c.peak_bytes = max(c.peak_bytes, self.shared.total)
        self.seq += 1
        return Change(self.seq, "share", vcpu, ipa, size, self.shared.total)

    def unshare(self, ipa: int, size: int, *, vcpu: int) -> Change | None:
        self._check(ipa, size)
        if not self.shared.covers(ipa, ipa + size):
            self.counters.refused += 1
            return None
        if not self.shared.remove(ipa, ipa + size, max_ranges=self.max_ranges):
            self.counters.full += 1
            raise LedgerFull(f"{len(self.shared)} ranges, max_ranges {self.max_ranges}")
        self.counters.unshares += 1
        self.counters.granules_unshared += size // self.granule
        self.seq += 1
        return Change(self.seq, "unshare", vcpu, ipa, size, self.shared.total)

    def reset(self) -> Change:
        """VM reset: the guest's memory is private again and the counters start over."""
        resets = self.counters.resets + 1
        self.shared.clear()
        self.counters = Counters(resets=resets)
        self.seq += 1
        return Change(self.seq, "reset", -1, 0, 0, 0)

    # -- queries for other handlers and backends
    def is_shared(self, gpa: int, length: int) -> bool:
        """Is every byte of [gpa, gpa+length) in a granule the guest shared?"""
        if length <= 0 or gpa < 0:
            return False
        g = self.granule
        lo = gpa - gpa % g
        hi = -(-(gpa + length) // g) * g
        return self.shared.covers(lo, hi)

    @property
    def shared_bytes(self) -> int:
        return self.shared.total

    def ranges(self) -> list[tuple[int, int]]:
        """(ipa, size) of every shared range, in address order."""
        return [(lo, hi - lo) for lo, hi in self.shared.ranges()]

    # -- serialization: durable state, migration, and the subscriber snapshot
    def to_dict(self) -> dict[str, Any]:
        # Run in a thread (a compaction, a state save), this walk must let the event
        # loop have the GIL (bench/ledger_bench.py, 4 M ranges): a block at a time
        # in bytecode, since a list() of the whole FrozenRanges runs in C and holds
        # it for 0.3 s; and (ipa, size) tuples, which the GC stops tracking after
        # their first collection, where lists would set off full collections of
        # up to 0.4 s each.  JSON writes them as arrays all the same.
        ranges: list[tuple[int, int]] = []
        for starts, ends in self.shared.frozen().blocks():
            ranges += [(lo, hi - lo) for lo, hi in zip(starts, ends, strict=True)]
        return {"format": LEDGER_FORMAT, "granule": self.granule, "seq": self.seq,
                "ranges": ranges, "counters": asdict(self.counters)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, max_ranges: int | None = None) -> Ledger:
        """Inverse of :meth:`to_dict`; raises ValueError on anything that is not a
        ledger this code wrote (a corrupt state file must not become guest-visible)."""
        try:
            if data["format"] != LEDGER_FORMAT:
                raise ValueError(f"ledger format {data['format']!r}, expected {LEDGER_FORMAT}")
            ledger = cls(int(data["granule"]), max_ranges=max_ranges)
            seq = data["seq"]
            if not isinstance(seq, int) or seq < 0:
                raise ValueError(f"bad seq {seq!r}")
            ledger.seq = seq

            def checked() -> Iterator[tuple[int, int]]:
                for ipa, size in data["ranges"]:
                    ledger._check(ipa, size)
                    yield ipa, ipa + size
            ledger.shared = RangeSet.from_sorted(checked())
            ledger.counters = Counters(**data["counters"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a serialized ledger: {err!r}") from err
        return ledger

    def copy(self, *, max_ranges: int | None) -> Ledger:
        """An independent copy (O(blocks), not O(ranges)), under a possibly new bound."""
        twin = Ledger(self.granule, max_ranges=max_ranges)
        twin.shared, twin.seq, twin.counters = self.shared.copy(), self.seq, replace(self.counters)
        return twin

    def view(self, vm: str, now: float) -> SnapshotView:
        """The subscriber stream's snapshot record of the ledger as it is now
        (docs/handlers/pkvm-memshare.md), encoded lazily: O(blocks) here, the
        ranges a chunk at a time as the stream sends them."""
        return SnapshotView(vm, now, self.granule, self.seq, asdict(self.counters), self.shared.frozen())

    def snapshot_line(self, vm: str, now: float) -> bytes:
        """The whole snapshot record at once (tests, small ledgers)."""
        return b"".join(self.view(vm, now))


class SnapshotView:
    """A consistent snapshot record that encodes itself in chunks.  Iterating it
    gives the JSON line in pieces of about :attr:`CHUNK` ranges, and it can be
    iterated again (several subscribers may send one view)."""

    #: Ranges per chunk: about a millisecond of encoding between two awaits.
    CHUNK = 1024

    __slots__ = ("counters", "granule", "now", "ranges", "seq", "vm")

    def __init__(self, vm: str, now: float, granule: int, seq: int, counters: dict[str, int],
                 ranges: FrozenRanges) -> None:
        self.vm, self.now, self.granule, self.seq, self.counters, self.ranges = vm, now, granule, seq, counters, ranges

    def __iter__(self) -> Iterator[bytes]:
        head = json.dumps({"type": "snapshot", "vm": self.vm, "time": round(self.now, 6), "shared": self.ranges.total,
                           "granule": self.granule, "seq": self.seq, "counters": self.counters},
                          separators=(",", ":"))
        yield (head[:-1] + ',"ranges":[').encode()
        parts: list[str] = []
        pending = 0
        sep = ""
        for starts, ends in self.ranges.blocks():
            parts.append(sep + ",".join([f"[{s},{e - s}]" for s, e in zip(starts, ends, strict=True)]))
            sep = ","
            pending += len(starts)
            if pending >= self.CHUNK:
                yield "".join(parts).encode()
                parts, pending = [], 0
        parts.append("]}\n")
        yield "".join(parts).encode()


class StreamError(ValueError):
    """A subscriber stream broke its own rules (a gap, or totals that do not add up)."""


class Replica:
    """A subscriber's copy of a ledger, rebuilt from the stream's records (parsed
    JSON lines): a snapshot, then changes; ``lost`` is followed by a snapshot that
    covers exactly the lost changes.  Every rule the stream promises is checked,
    so a consumer finds out at once if its view is wrong."""

    def __init__(self) -> None:
        self.shared = RangeSet()
        self.seq: int | None = None
        self.granule: int | None = None
        self.lost = 0  # changes the stream said this reader missed, in total
        self.changes = 0  # changes received live
        self.snapshots = 0
        self._owed: int | None = None  # lost count awaiting its snapshot

    def apply(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "snapshot":
            if self._owed is not None and self.seq is not None and record["seq"] != self.seq + self._owed:
                raise StreamError(f"told {self._owed} changes after {self.seq} were lost, "
                                  f"but the snapshot is at {record['seq']}")
            self.shared = RangeSet.from_sorted((ipa, ipa + size) for ipa, size in record["ranges"])
            self.seq, self.granule, self._owed = record["seq"], record["granule"], None
            self.snapshots += 1
        elif kind == "lost":
            self.lost += record["count"]
            self._owed = (self._owed or 0) + record["count"]
        elif kind in ("share", "unshare", "reset"):
            if self.seq is None or self._owed is not None:
                raise StreamError(f"a {kind} record where a snapshot was due")
            if record["seq"] != self.seq + 1:
                raise StreamError(f"change {record['seq']} follows {self.seq}")
            lo, hi = record["ipa"], record["ipa"] + record["size"]
            if kind == "share":
                self.shared.add(lo, hi)
            elif kind == "unshare":
                self.shared.remove(lo, hi)
            else:
                self.shared.clear()
            if self.shared.total != record["shared"]:
                raise StreamError(f"after change {record['seq']} this replica holds {self.shared.total} bytes, "
                                  f"the ledger {record['shared']}")
            self.seq = record["seq"]
            self.changes += 1
        # Unknown types are skipped: a later version may add records.


__all__ = ["GRANULES", "Change", "Counters", "FrozenRanges", "Ledger", "LedgerFull", "RangeSet", "Replica",
           "SnapshotView", "StreamError"]
