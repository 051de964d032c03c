"""The transaction ledger: one handle per memory transaction, who borrowed
what, and when the sender may have it back.

RECLAIM is DENIED while any borrower holds a retrieval it has not
relinquished (DEN0077 1.2 §10.9.2); a donated region never comes back.  The
ledger is plain data for snapshot/restore, and it is the one place that
answers "is this guest page part of a live transaction?".
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from .defs import HANDLE_HYPERVISOR, PAGE, Err, FfaError, Fn
from .descriptors import Borrower, MemTransaction

_KINDS = {Fn.MEM_SHARE: "share", Fn.MEM_LEND: "lend", Fn.MEM_DONATE: "donate"}
_BY_NAME = {v: k for k, v in _KINDS.items()}


@dataclass(slots=True)
class Entry:
    handle: int
    tx: MemTransaction
    #: Borrower ID -> retrievals not yet relinquished.
    retrieved: dict[int, int] = field(default_factory=dict)
    #: A donation, once retrieved, belongs to its borrower: never reclaimed.
    donated: bool = False

    def borrower(self, endpoint: int) -> Borrower | None:
        return next((b for b in self.tx.borrowers if b.id == endpoint), None)

    def to_dict(self) -> dict[str, Any]:
        t = self.tx
        return {"handle": self.handle, "kind": _KINDS[t.kind], "sender": t.sender, "attributes": t.attributes,
                "flags": t.flags, "tag": t.tag, "borrowers": [[b.id, b.access] for b in t.borrowers],
                "ranges": [list(r) for r in t.ranges], "retrieved": [[k, v] for k, v in self.retrieved.items()],
                "donated": self.donated}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        tx = MemTransaction(_BY_NAME[d["kind"]], int(d["sender"]), int(d["attributes"]), int(d["flags"]),
                            int(d["tag"]), tuple(Borrower(int(i), int(a)) for i, a in d["borrowers"]),
                            tuple((int(a), int(n)) for a, n in d["ranges"]))
        if not tx.ranges or any(n <= 0 or a < 0 or a % PAGE for a, n in tx.ranges):
            raise ValueError(f"transaction {d['handle']:#x}: bad ranges")
        return cls(int(d["handle"]), tx, {int(k): int(v) for k, v in d["retrieved"]}, bool(d["donated"]))


class Ledger:
    """Live transactions by handle, and the page intervals they cover (kept sorted
    so "does this overlap?" is a bisect, whatever the guest has shared)."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self._next = 1
        #: Sorted, disjoint (start, end, handle) intervals of every live transaction.
        self._spans: list[tuple[int, int, int]] = []

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def pages(self) -> int:
        return sum(e.tx.pages for e in self.entries.values())

    def overlaps(self, addr: int, size: int) -> bool:
        end = addr + size
        i = bisect_right(self._spans, (addr, end, 1 << 64))
        if i and self._spans[i - 1][1] > addr:
            return True
        return i < len(self._spans) and self._spans[i][0] < end

    def reserve(self) -> int:
        """A new handle, never reused while the VM runs (a fragmented transaction
        names its handle before the ledger holds it)."""
        handle = HANDLE_HYPERVISOR | self._next
        self._next += 1
        return handle

    def add(self, tx: MemTransaction, handle: int) -> None:
        """Record a checked transaction (the parser refused overlaps) under ``handle``."""
        self._insert(Entry(handle, tx))

    def _insert(self, entry: Entry) -> None:
        self.entries[entry.handle] = entry
        for addr, n in entry.tx.ranges:
            self._spans.append((addr, addr + n * PAGE, entry.handle))
        self._spans.sort()

    def get(self, handle: int) -> Entry:
        entry = self.entries.get(handle)
        if entry is None:
            raise FfaError(Err.INVALID_PARAMETERS, f"no transaction {handle:#x}")
        return entry

    def retrieve(self, handle: int, endpoint: int) -> Entry:
        """A borrower maps the memory; each retrieval wants its own relinquish."""
        entry = self.get(handle)
        if entry.borrower(endpoint) is None:
            raise FfaError(Err.INVALID_PARAMETERS, f"{endpoint:#x} is not a borrower of {handle:#x}")
        if entry.donated:
            raise FfaError(Err.DENIED, f"{handle:#x} was donated and retrieved already")
        entry.retrieved[endpoint] = entry.retrieved.get(endpoint, 0) + 1
        if entry.tx.kind == Fn.MEM_DONATE:
            entry.donated = True
        return entry

    def relinquish(self, handle: int, endpoint: int) -> None:
        entry = self.get(handle)
        if not entry.retrieved.get(endpoint):
            raise FfaError(Err.DENIED, f"{endpoint:#x} holds no retrieval of {handle:#x}")
        if entry.donated:
            raise FfaError(Err.DENIED, f"{handle:#x} was donated; it cannot be given back")
        entry.retrieved[endpoint] -= 1
        if not entry.retrieved[endpoint]:
            del entry.retrieved[endpoint]

    def reclaim(self, handle: int, sender: int) -> Entry:
        entry = self.get(handle)
        if entry.tx.sender != sender:
            raise FfaError(Err.INVALID_PARAMETERS, f"{handle:#x} was not sent by {sender:#x}")
        if entry.donated or entry.retrieved:
            raise FfaError(Err.DENIED, f"{handle:#x} is still borrowed")
        del self.entries[handle]
        self._spans = [s for s in self._spans if s[2] != handle]
        return entry

    def live(self, handle: int, endpoint: int) -> Entry | None:
        """The entry if ``endpoint`` holds a retrieval of it now (partition memory access)."""
        entry = self.entries.get(handle)
        return entry if entry is not None and entry.retrieved.get(endpoint) else None

    def clear(self) -> None:
        self.entries.clear()
        self._spans.clear()

    def to_dict(self) -> dict[str, Any]:
        return {"next": self._next, "entries": [e.to_dict() for e in self.entries.values()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ledger:
        ledger = cls()
        ledger._next = int(d["next"])
        for raw in d["entries"]:
            entry = Entry.from_dict(raw)
            for addr, n in entry.tx.ranges:
                if ledger.overlaps(addr, n * PAGE):
                    raise ValueError(f"transaction {entry.handle:#x} overlaps another")
            if entry.handle in ledger.entries or entry.handle & ~HANDLE_HYPERVISOR >= ledger._next:
                raise ValueError(f"handle {entry.handle:#x} is duplicated or not yet allocated")
            ledger._insert(entry)
        return ledger
