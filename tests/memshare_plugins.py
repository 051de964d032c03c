"""In-process memshare subscribers for the tests, loaded as ``tests.memshare_plugins:Name``:
the path a subscriber plugin takes before it is packaged under an entry point."""

from __future__ import annotations

from hvcproxyd.handlers import VmContext
from hvcproxyd.handlers.pkvm_memshare.ledger import Change, Ledger
from hvcproxyd.sidecars.memshare import LedgerSubscriber

#: Every Recorder ever made, so a test can find the one its handler instance owns.
RECORDERS: list[Recorder] = []


class Recorder(LedgerSubscriber):
    def __init__(self, vm: VmContext, handler: str) -> None:
        super().__init__(vm, handler)
        self.snapshots: list[list[tuple[int, int]]] = []
        self.changes: list[Change] = []
        RECORDERS.append(self)

    def on_snapshot(self, ledger: Ledger) -> None:
        self.snapshots.append(ledger.ranges())

    def on_change(self, change: Change) -> None:
        self.changes.append(change)


class Exploder(LedgerSubscriber):
    """Has a bug; the guest must not notice."""

    def on_change(self, change: Change) -> None:
        raise RuntimeError("deliberate failure in a test subscriber")


class NotASubscriber:
    pass
