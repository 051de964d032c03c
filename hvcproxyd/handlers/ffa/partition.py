"""The partition plugin API: what stands behind an FF-A endpoint ID the guest
talks to.

A partition is a class registered under the entry-point group
``hvcproxyd.ffa_partitions`` (the shipped ``echo``, ``storage`` and ``socket``
take the same path a third party would).  The FF-A handler makes one instance
per configured partition and calls it from the guest's calls: a direct request,
an indirect message, a notification.  What a partition may do back goes through
its :class:`PartitionContext`, never through the handler: retrieve and
relinquish a memory transaction addressed to it, read and write the shared
pages (only while it holds the retrieval, only inside the ranges), send the
guest an indirect message, raise a notification the guest has bound.
docs/handlers.md ("FF-A partitions") is the contract.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ...config.diagnostics import Section
from ...plugins import load_plugin
from .defs import DATA_RW, PAGE, Err, FfaError
from .ledger import Ledger

ENTRY_POINT_GROUP = "hvcproxyd.ffa_partitions"


@dataclass(frozen=True, slots=True)
class PartitionSpec:
    """One ``partitions:`` entry of the FF-A handler's options."""

    name: str
    id: int
    uuids: tuple[uuidlib.UUID, ...]
    properties: int
    exec_contexts: int
    #: Data accesses (defs.DATA_RO / DATA_RW) it accepts in a memory transaction.
    access: frozenset[int]
    cls: type[Partition]
    options: Any


class EndpointOptions(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def state_dir(self) -> Path: ...


class Endpoint(Protocol):
    """What a partition reaches of the guest's endpoint (:class:`.endpoint.Endpoint`
    is one).  A protocol, so that this module, which the options parser and the
    endpoint both import, needs nothing from either: the imports stay one way."""

    @property
    def vm_name(self) -> str: ...
    @property
    def opts(self) -> EndpointOptions: ...
    @property
    def ledger(self) -> Ledger: ...
    def notify_guest(self, sender: int, bitmap: int) -> Err | int: ...
    def deliver_message(self, sender: int, payload: bytes) -> Err | int: ...
    async def read_guest(self, addr: int, n: int) -> bytes: ...
    async def write_guest(self, addr: int, data: bytes) -> None: ...


class SharedMemory:
    """A retrieved transaction as its borrower sees it: one flat byte range made of
    the transaction's ranges in order.  Every access checks, at that moment, that
    the retrieval is still held; the offsets never leave the ranges."""

    def __init__(self, endpoint: Endpoint, handle: int, borrower: int) -> None:
        self._ep = endpoint
        self.handle = handle
        self.borrower = borrower
        entry = endpoint.ledger.get(handle)
        self.ranges = entry.tx.ranges
        self.size = sum(n for _, n in self.ranges) * PAGE
        b = entry.borrower(borrower)
        self.writable = b is not None and (b.access & 3 == DATA_RW or entry.tx.kind.name == "MEM_DONATE")

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        if self._ep.ledger.live(self.handle, self.borrower) is None:
            raise FfaError(Err.DENIED, f"transaction {self.handle:#x} is not retrieved by {self.borrower:#x}")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FfaError(Err.INVALID_PARAMETERS, f"{offset}+{length} is outside the {self.size}-byte region")
        out: list[tuple[int, int]] = []
        pos = 0
        for addr, n in self.ranges:
            span = n * PAGE
            lo, hi = max(offset, pos), min(offset + length, pos + span)
            if lo < hi:
                out.append((addr + lo - pos, hi - lo))
            pos += span
        return out

    async def read(self, offset: int, length: int) -> bytes:
        chunks = [await self._ep.read_guest(addr, n) for addr, n in self._pieces(offset, length)]
        return b"".join(chunks)

    async def write(self, offset: int, data: bytes) -> None:
        if not self.writable:
            raise FfaError(Err.DENIED, f"transaction {self.handle:#x} is read-only for {self.borrower:#x}")
        pos = 0
        for addr, n in self._pieces(offset, len(data)):
            await self._ep.write_guest(addr, data[pos:pos + n])
            pos += n


class PartitionContext:
    """What a partition may do; each method answers with the FF-A outcome (0 or an
    :class:`~.defs.Err`) or raises :class:`~.defs.FfaError` where noted."""

    def __init__(self, endpoint: Endpoint, spec: PartitionSpec, log: logging.Logger) -> None:
        self._ep = endpoint
        self.id = spec.id
        self.spec = spec
        self.log = log

    @property
    def vm_name(self) -> str:
        return self._ep.vm_name

    @property
    def guest_id(self) -> int:
        return self._ep.opts.id

    @property
    def state_dir(self) -> Path:
        """This VM's directory under the FF-A handler's ``state_dir`` (not created)."""
        return self._ep.opts.state_dir / self._ep.vm_name

    def retrieve(self, handle: int) -> SharedMemory:
        """Map a transaction addressed to this partition; FfaError if it is not."""
        self._ep.ledger.retrieve(handle, self.id)
        return SharedMemory(self._ep, handle, self.id)

    def relinquish(self, handle: int) -> None:
        """Give back one retrieval; FfaError if none is held."""
        self._ep.ledger.relinquish(handle, self.id)

    def send_indirect(self, payload: bytes) -> Err | int:
        """An indirect message to the guest: into its RX buffer (and the RX-full
        notification), or queued while the guest owns RX, within the limit."""
        return self._ep.deliver_message(self.id, payload)

    def notify(self, bitmap: int) -> Err | int:
        """Raise notifications the guest has bound to this partition."""
        return self._ep.notify_guest(self.id, bitmap)


class Partition:
    """Base class: every hook has a safe default.

    ``PROPERTIES`` are the defaults a config may narrow (defs.PROP_*);
    ``ACCESS`` the data accesses it accepts for memory transactions."""

    PROPERTIES: ClassVar[int] = 0
    ACCESS: ClassVar[frozenset[int]] = frozenset()

    def __init__(self, ctx: PartitionContext, options: Any) -> None:
        self.ctx = ctx
        self.options = options

    @classmethod
    def parse_options(cls, section: Section) -> Any:
        section.allow_keys(())
        return None

    async def direct_request(self, sender: int, args: Sequence[int], *, wide: bool) -> Sequence[int] | Err:
        """A direct request: ``args`` are w3..w7 (x4..x17 for REQ2; ``wide`` for the
        64-bit and REQ2 forms).  Return the response registers in the same shape,
        or an FF-A error for the guest."""
        return Err.NOT_SUPPORTED

    async def indirect_message(self, sender: int, payload: bytes) -> Err | int:
        """An indirect message (MSG_SEND2) has been copied out of the guest's TX buffer."""
        return Err.NOT_SUPPORTED

    async def notified(self, sender: int, bitmap: int) -> Err | int:
        """The guest set notifications for this partition (NOTIFICATION_SET)."""
        return Err.NOT_SUPPORTED

    def reset(self) -> None:
        """The VM reset: forget per-boot state (retrievals were dropped by the handler)."""

    def snapshot(self) -> dict[str, Any]:
        return {}

    def restore(self, data: dict[str, Any]) -> None:
        """Inverse of :meth:`snapshot`; ``data`` has passed :meth:`check_state`."""

    @classmethod
    def check_state(cls, data: dict[str, Any]) -> None:
        """Raise ValueError if ``data`` is not a state :meth:`snapshot` could have
        written: the endpoint checks every partition before it restores any, so a
        damaged file changes nothing."""


def load_partition_class(type_name: str) -> type[Partition]:
    """An entry-point name, or ``package.module:Class``; LookupError with a reason."""
    return load_plugin(ENTRY_POINT_GROUP, type_name, Partition, "FF-A partition type")
