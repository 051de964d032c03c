"""The memshare ledger: which guest granules are shared with the host, as
coalesced ranges, plus counters.  Sans-IO: no trio, no sockets, no clock of its
own (the publisher stamps the time), so the handler, the event stream, tests and other
handlers' "is this range shared?" checks all share one definition.

Guests share memory one 4 KiB granule at a time (mainline pKVM) but in long
runs (a swiotlb pool, a virtio ring), so ranges stay few while pages are many;
a sorted pair of start/end lists answers every query with a bisect.
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

LEDGER_FORMAT = 1
GRANULES = (4096, 16384, 65536)


class RangeSet:
    """A set of integers held as sorted, disjoint, non-touching half-open ranges.

    Adjacent ranges are always merged, so two sets with the same members have
    the same ranges (what lets a subscriber's reconstruction be compared with
    ``==``)."""

    __slots__ = ("_ends", "_starts", "total")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.total = 0
        for lo, hi in ranges:
            self.add(lo, hi)

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    def __repr__(self) -> str:
        return "RangeSet([" + ", ".join(f"({a:#x}, {b:#x})" for a, b in self.ranges()) + "])"

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) pairs, end exclusive, in address order."""
        return list(zip(self._starts, self._ends, strict=True))

    def covers(self, lo: int, hi: int) -> bool:
        """Every member of [lo, hi) is in the set (an empty interval is covered)."""
        if hi <= lo:
            return True
        i = bisect_right(self._starts, lo) - 1
        return i >= 0 and self._ends[i] >= hi

    def intersects(self, lo: int, hi: int) -> bool:
        """Some member of [lo, hi) is in the set."""
        if hi <= lo:
            return False
        # The last range starting before hi is the only candidate: ranges are disjoint and sorted.
        j = bisect_left(self._starts, hi) - 1
        return j >= 0 and self._ends[j] > lo

    def add(self, lo: int, hi: int) -> None:
        """Union with [lo, hi), merging every range it overlaps or touches."""
        if hi <= lo:
            return
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, lo)       # first range ending at or after lo (touching counts)
        j = bisect_right(starts, hi)    # first range starting after hi
        if i < j:
            merged = sum(ends[i:j]) - sum(starts[i:j])
            lo, hi = min(lo, starts[i]), max(hi, ends[j - 1])
        else:
            merged = 0
        starts[i:j] = [lo]
        ends[i:j] = [hi]
        self.total += (hi - lo) - merged

    def remove(self, lo: int, hi: int) -> None:
        """Difference with [lo, hi), splitting a range it cuts through."""
        if hi <= lo:
            return
        starts, ends = self._starts, self._ends
        i = bisect_right(ends, lo)      # first range ending after lo
        j = bisect_left(starts, hi)     # first range starting at or after hi
        if i >= j:
            return
        removed = sum(ends[i:j]) - sum(starts[i:j])
        new_starts: list[int] = []
        new_ends: list[int] = []
        if starts[i] < lo:
            new_starts.append(starts[i])
            new_ends.append(lo)
        if ends[j - 1] > hi:
            new_starts.append(hi)
            new_ends.append(ends[j - 1])
        kept = sum(e - s for s, e in zip(new_starts, new_ends, strict=True))
        starts[i:j] = new_starts
        ends[i:j] = new_ends
        self.total -= removed - kept

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self.total = 0


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
    peak_bytes: int = 0
    resets: int = 0


class Ledger:
    """One VM's shared granules.  ``share``/``unshare`` are all-or-nothing: a
    request that overlaps the wrong state changes nothing and returns None, as
    pKVM refuses the whole transition."""

    def __init__(self, granule: int = 4096) -> None:
        if granule not in GRANULES:
            raise ValueError(f"granule must be one of {GRANULES}, not {granule}")
        self.granule = granule
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
        self.shared.add(ipa, ipa + size)
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
        self.shared.remove(ipa, ipa + size)
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
        return {"format": LEDGER_FORMAT, "granule": self.granule, "seq": self.seq,
                "ranges": [[ipa, size] for ipa, size in self.ranges()], "counters": asdict(self.counters)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        """Inverse of :meth:`to_dict`; raises ValueError on anything that is not a
        ledger this code wrote (a corrupt state file must not become guest-visible)."""
        try:
            if data["format"] != LEDGER_FORMAT:
                raise ValueError(f"ledger format {data['format']!r}, expected {LEDGER_FORMAT}")
            ledger = cls(int(data["granule"]))
            seq = data["seq"]
            if not isinstance(seq, int) or seq < 0:
                raise ValueError(f"bad seq {seq!r}")
            ledger.seq = seq
            prev_end = -1
            for ipa, size in data["ranges"]:
                if not (isinstance(ipa, int) and isinstance(size, int)) or ipa <= prev_end:
                    raise ValueError(f"range {ipa!r}+{size!r} is not sorted, disjoint and non-touching")
                ledger._check(ipa, size)
                ledger.shared.add(ipa, ipa + size)
                prev_end = ipa + size
            ledger.counters = Counters(**data["counters"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a serialized ledger: {err!r}") from err
        return ledger

    def snapshot_line(self, vm: str, now: float) -> bytes:
        """The subscriber stream's snapshot record (docs/handlers/pkvm-memshare.md)."""
        body = self.to_dict()
        del body["format"]
        return (json.dumps({"type": "snapshot", "vm": vm, "time": round(now, 6), "shared": self.shared.total,
                            **body}, separators=(",", ":")) + "\n").encode()


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
            self.shared = RangeSet((ipa, ipa + size) for ipa, size in record["ranges"])
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


__all__ = ["GRANULES", "Change", "Counters", "Ledger", "RangeSet", "Replica", "StreamError"]
