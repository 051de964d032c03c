"""The guest's RX/TX buffer pair and who owns RX (DEN0077 1.2 §7.2, §10.2).

After RXTX_MAP the producer (this endpoint, for every partition) owns RX.
Writing a message or partition information into RX hands it to the consumer
(the guest) until RX_RELEASE; a producer that finds RX with the guest answers
BUSY or queues, never overwrites.  TX always belongs to the guest: we read it
only while serving the guest's own call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .defs import PAGE, Err, FfaError


@dataclass(slots=True)
class Mailbox:
    tx: int = 0
    rx: int = 0
    pages: int = 0
    #: True while the guest (consumer) owns RX: between our write and its RX_RELEASE.
    rx_full: bool = False

    @property
    def mapped(self) -> bool:
        return self.pages > 0

    @property
    def size(self) -> int:
        return self.pages * PAGE

    def overlaps(self, addr: int, size: int) -> bool:
        return self.mapped and any(addr < b + self.size and b < addr + size for b in (self.tx, self.rx))

    def map(self, tx: int, rx: int, pages: int) -> None:
        self.tx, self.rx, self.pages, self.rx_full = tx, rx, pages, False

    def unmap(self) -> None:
        self.tx = self.rx = self.pages = 0
        self.rx_full = False

    def claim_rx(self, length: int) -> int:
        """The RX address for a producer's write of ``length`` bytes, handing RX to the guest."""
        if not self.mapped:
            raise FfaError(Err.BUSY, "no RX buffer mapped")
        if self.rx_full:
            raise FfaError(Err.BUSY, "the guest owns its RX buffer")
        if length > self.size:
            raise FfaError(Err.NO_MEMORY, f"{length} bytes do not fit the {self.size}-byte RX buffer")
        self.rx_full = True
        return self.rx

    def release(self) -> None:
        if not self.mapped or not self.rx_full:
            raise FfaError(Err.DENIED, "RX is not owned by the caller")
        self.rx_full = False

    def to_dict(self) -> dict[str, Any]:
        return {"tx": self.tx, "rx": self.rx, "pages": self.pages, "rx_full": self.rx_full}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mailbox:
        m = cls(int(d["tx"]), int(d["rx"]), int(d["pages"]), bool(d["rx_full"]))
        if m.pages < 0 or m.tx % PAGE or m.rx % PAGE:
            raise ValueError(f"bad RX/TX mapping {d!r}")
        return m
