"""Notifications between the guest and its partitions (DEN0077 1.2 §10.7).

Global notifications only (as Xen offers them): the guest's bitmap exists
once created, each of its 64 bits is bound to at most one sender partition,
and a partition may raise only bits the guest bound to it.  Pending bits and
the framework's RX-full bit are what NOTIFICATION_GET returns and
INFO_GET announces.  Delivering the notification interrupt is the VMM's part
and is not offered (FEATURES answers NOT_SUPPORTED for the NPI/SRI IDs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .defs import FWK_RX_FULL, Err, FfaError

BITS = 64


@dataclass(slots=True)
class Notifications:
    created: bool = False
    #: Bit -> the partition ID allowed to raise it.
    bound: dict[int, int] = field(default_factory=dict)
    #: Pending bits raised by partitions, by sender ID (so GET can split SP/VM senders).
    pending: dict[int, int] = field(default_factory=dict)
    #: Pending framework bits (hypervisor framework: RX full).
    framework: int = 0

    def _need(self) -> None:
        if not self.created:
            raise FfaError(Err.DENIED, "no notification bitmap")

    def create(self) -> None:
        if self.created:
            raise FfaError(Err.DENIED, "the bitmap exists")
        self.created = True

    def destroy(self) -> None:
        self._need()
        if any(self.pending.values()):
            raise FfaError(Err.DENIED, "notifications are pending")
        self.created, self.bound, self.pending, self.framework = False, {}, {}, 0

    def bind(self, sender: int, bitmap: int) -> None:
        self._need()
        if not bitmap:
            raise FfaError(Err.INVALID_PARAMETERS, "empty bitmap")
        clash = [b for b in range(BITS) if bitmap >> b & 1 and self.bound.get(b, sender) != sender]
        if clash:
            raise FfaError(Err.DENIED, f"bits {clash} are bound to another sender")
        for b in range(BITS):
            if bitmap >> b & 1:
                self.bound[b] = sender

    def unbind(self, sender: int, bitmap: int) -> None:
        self._need()
        bits = [b for b in range(BITS) if bitmap >> b & 1]
        if any(self.bound.get(b) != sender for b in bits):
            raise FfaError(Err.DENIED, "bits are not bound to this sender")
        for b in bits:
            del self.bound[b]
        self.pending[sender] = self.pending.get(sender, 0) & ~bitmap

    def raise_from(self, sender: int, bitmap: int) -> Err | int:
        """A partition raises ``bitmap``: only bits the guest bound to it."""
        if not self.created:
            return Err.DENIED
        if not bitmap or any(bitmap >> b & 1 and self.bound.get(b) != sender for b in range(BITS)):
            return Err.DENIED
        self.pending[sender] = self.pending.get(sender, 0) | bitmap
        return 0

    def rx_full(self) -> None:
        if self.created:
            self.framework |= FWK_RX_FULL

    def take(self, senders: set[int]) -> int:
        """Pending bits from ``senders``, cleared as GET does."""
        bits = 0
        for s in senders:
            bits |= self.pending.pop(s, 0)
        return bits

    def take_framework(self) -> int:
        bits, self.framework = self.framework, 0
        return bits

    @property
    def any_pending(self) -> bool:
        return bool(self.framework or any(self.pending.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "bound": [[b, s] for b, s in sorted(self.bound.items())],
                "pending": [[s, bits] for s, bits in sorted(self.pending.items()) if bits],
                "framework": self.framework}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Notifications:
        n = cls(bool(d["created"]), {int(b): int(s) for b, s in d["bound"]},
                {int(s): int(bits) for s, bits in d["pending"]}, int(d["framework"]))
        if any(not 0 <= b < BITS for b in n.bound) or any(not 0 <= v < 1 << 64 for v in n.pending.values()):
            raise ValueError("bad notification state")
        return n
