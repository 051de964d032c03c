"""One VM's FF-A endpoint: its negotiated version, RX/TX buffers, memory
transactions, notifications and partitions, and every call the guest makes.

The state is plain data (snapshot/restore).  Each call either returns its
registers or raises :class:`~.defs.FfaError`, which the handler turns into
FFA_ERROR in one place.  Guest memory is reached only through
:class:`~hvcproxyd.core.guestmem.GuestMemory`, after the range was checked
against RAM, the limits and the ledger.
"""

from __future__ import annotations

import logging
import struct
import uuid as uuidlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...core.guestmem import GuestMemory, GuestMemoryError
from ...smccc import MASK32, MBZ_MASK, SVE_HINT
from .defs import (
    DIRECT_FRAMEWORK,
    FEAT_NPI,
    MEM_FLAG_ZERO,
    MSG2_DELAY_SRI,
    MSG2_HEADER_V1_1,
    MSG2_HEADER_V1_2,
    NOTIF_GET_HYP,
    NOTIF_GET_SP,
    NOTIF_GET_VM,
    NOTIF_INFO_COUNT_SHIFT,
    NOTIF_PER_VCPU,
    NOTIF_SET_DELAY_SRI,
    PAGE,
    PARTINFO_COUNT_ONLY,
    PARTINFO_REGS_PER_CALL,
    PARTINFO_SIZE,
    PROP_DIRECT_RECV,
    PROP_DIRECT_REQ2_RECV,
    PROP_INDIRECT,
    PROPS_BY_VERSION,
    RECLAIM_TIME_SLICE,
    RECLAIM_ZERO,
    SECURE_BIT,
    SINCE,
    SUCCESS32,
    SUCCESS64,
    V1_0,
    V1_1,
    V1_2,
    Err,
    FfaError,
    Fn,
    fid32,
    fid64,
)
from .descriptors import Limits, MemTransaction, PartitionInfo, encode_partition_info, parse_transaction
from .ledger import Ledger
from .mailbox import Mailbox
from .notify import Notifications
from .options import FfaOptions
from .partition import Partition, PartitionContext, PartitionSpec

Regs = tuple[int, ...]


def split_ids(w1: int) -> tuple[int, int]:
    """(sender, receiver) from w1 = sender[31:16] | receiver[15:0]."""
    return (w1 >> 16) & 0xFFFF, w1 & 0xFFFF


def ok(*values: int, wide: bool = False) -> Regs:
    """FFA_SUCCESS (32 or 64) with w1 = 0 and the values from w2 on."""
    return (SUCCESS64 if wide else SUCCESS32, 0, *values)


def uuid_of_words(words: Sequence[int]) -> uuidlib.UUID:
    """A UUID from four little-endian 32-bit words (PARTITION_INFO_GET's w1..w4, as
    Linux fills them with export_uuid)."""
    return uuidlib.UUID(bytes=b"".join(int(w & MASK32).to_bytes(4, "little") for w in words))


def uuid_of_dwords(lo: int, hi: int) -> uuidlib.UUID:
    """A UUID from two little-endian 64-bit registers (REQ2's x2/x3, INFO_GET_REGS's x1/x2)."""
    return uuidlib.UUID(bytes=lo.to_bytes(8, "little") + hi.to_bytes(8, "little"))


@dataclass(slots=True)
class Fragments:
    """A descriptor arriving in fragments (MEM_FRAG_TX), bounded by the limits."""

    kind: Fn
    total: int
    data: bytearray
    count: int
    handle: int


@dataclass(slots=True)
class PeerRequest:
    """A direct request from another VM, waiting for this guest to take it (MSG_WAIT)
    and answer it (DIRECT_RESP).  ``done`` is the peers sidecar's wake-up; the
    endpoint itself has no task or clock."""

    sender: int
    args: tuple[int, ...]
    wide: bool
    done: Callable[[], None]
    taken: bool = False
    response: tuple[int, ...] | Err | None = None


@dataclass(slots=True)
class Bound:
    spec: PartitionSpec
    plugin: Partition


class Endpoint:
    """The guest-visible FF-A state of one VM and the logic of each call."""

    def __init__(self, opts: FfaOptions, vm_name: str, log: logging.Logger) -> None:
        self.opts = opts
        self.vm_name = vm_name
        self.log = log
        self.memory: GuestMemory | None = None
        self.version = 0  # 0: not negotiated
        self.mailbox = Mailbox()
        self.ledger = Ledger()
        self.notifications = Notifications()
        #: The notification pending interrupt's INTID while the VMM can raise it
        #: (the handler sets it at attach), and how to raise it.
        self.npi: int | None = None
        self.raise_npi: Callable[[], None] = lambda: None
        self.fragments: Fragments | None = None
        self.queued: deque[tuple[int, bytes]] = deque()
        #: Peer VMs' direct requests, oldest first (transient: they die with their sockets).
        self.inbox: deque[PeerRequest] = deque()
        self.partitions: dict[int, Bound] = {}
        for spec in opts.partitions:
            ctx = PartitionContext(self, spec, log.getChild(spec.name))
            self.partitions[spec.id] = Bound(spec, spec.cls(ctx, spec.options))
        lim = opts.limits
        self.limits = Limits(lim.borrowers, lim.ranges_per_share, lim.pages_per_share)

    # ------------------------------------------------------------ guest memory
    def _mem(self) -> GuestMemory:
        if self.memory is None:
            raise FfaError(Err.ABORTED, "no VMM attached")
        return self.memory

    async def read_guest(self, addr: int, n: int) -> bytes:
        try:
            return await self._mem().read(addr, n)
        except GuestMemoryError as err:
            raise FfaError(Err.ABORTED, str(err)) from err

    async def write_guest(self, addr: int, data: bytes) -> None:
        try:
            await self._mem().write(addr, data)
        except GuestMemoryError as err:
            raise FfaError(Err.ABORTED, str(err)) from err

    def in_ram(self, addr: int, size: int) -> bool:
        return self.memory is not None and self.memory.contains(addr, size)

    # ------------------------------------------------------------ partitions
    def _info(self, spec: PartitionSpec, u: uuidlib.UUID | None) -> PartitionInfo:
        props = spec.properties & PROPS_BY_VERSION[self.version]
        return PartitionInfo(spec.id, spec.exec_contexts, props, (u or spec.uuids[0]).bytes)

    def _matching(self, u: uuidlib.UUID) -> list[PartitionInfo]:
        """Every partition for the null UUID (one record per UUID a partition has, as
        DEN0077 1.2 §13.8.1 lists multi-service partitions), else those with ``u``."""
        if u.int == 0:
            if self.version == V1_0:  # 1.0 records carry no UUID: one per partition
                return [self._info(b.spec, None) for b in self.partitions.values()]
            return [self._info(b.spec, x) for b in self.partitions.values() for x in b.spec.uuids]
        return [self._info(b.spec, u) for b in self.partitions.values() if u in b.spec.uuids]

    def _receiver(self, receiver: int, needs: int) -> Bound:
        bound = self.partitions.get(receiver)
        if bound is None:
            raise FfaError(Err.INVALID_PARAMETERS, f"no partition {receiver:#x}")
        if not bound.spec.properties & needs:
            raise FfaError(Err.DENIED, f"partition {receiver:#x} does not take this kind of message")
        return bound

    def _accepts(self, endpoint: int) -> frozenset[int] | None:
        bound = self.partitions.get(endpoint)
        return None if bound is None else bound.spec.access

    def notify_guest(self, sender: int, bitmap: int) -> Err | int:
        """A partition or a peer VM raises notifications the guest bound to it; the
        guest hears of them through the notification pending interrupt."""
        rc = self.notifications.raise_from(sender, bitmap)
        if rc == 0:
            self.raise_npi()
        return rc

    def deliver_message(self, sender: int, payload: bytes) -> Err | int:
        """A partition's indirect message for the guest: queued, and written into RX
        by :meth:`flush_messages` once the producer owns RX (at most
        ``pending_messages`` wait; more get BUSY)."""
        if self.version < V1_1 or not self.mailbox.mapped:
            return Err.DENIED
        if self._msg_header_size() + len(payload) > self.mailbox.size:
            return Err.NO_MEMORY
        if len(self.queued) >= self.opts.limits.pending_messages:
            return Err.BUSY
        self.queued.append((sender, payload))
        return 0

    async def flush_messages(self) -> None:
        """Write the oldest queued message into RX if the producer owns it; called
        after every call, so a partition never writes guest memory on its own."""
        if not self.queued or not self.mailbox.mapped or self.mailbox.rx_full:
            return
        sender, payload = self.queued.popleft()
        header = self._msg_header_size()
        rx = self.mailbox.claim_rx(header + len(payload))
        head = struct.pack("<IIIII", 0, 0, header, sender << 16 | self.opts.id, len(payload))
        await self._fill_rx(rx, head.ljust(header, b"\0") + payload)
        if self.notifications.created:
            self.notifications.rx_full()
            self.raise_npi()

    async def _fill_rx(self, rx: int, data: bytes) -> None:
        """Write what a claim of RX is for; a failed write hands RX back to the producer."""
        try:
            await self.write_guest(rx, data)
        except FfaError:
            self.mailbox.rx_full = False
            raise

    def _msg_header_size(self) -> int:
        return MSG2_HEADER_V1_2 if self.version >= V1_2 else MSG2_HEADER_V1_1

    # ------------------------------------------------------------ setup and discovery
    def call_version(self, requested: int) -> Regs:
        """FFA_VERSION (DEN0077 1.2 §13.2): we answer our highest version; the caller's
        own, if compatible, is what it gets from then on.  Once negotiated, a request
        for an older minor is refused, as pKVM does, since the layouts differ."""
        mine = self.opts.version
        if requested >> 31 or requested >> 16 != 1:
            return (Err.NOT_SUPPORTED,)
        wanted = min(requested, mine)
        if self.version and wanted < self.version:
            return (Err.NOT_SUPPORTED,)
        if not self.version:
            self.version = wanted
        return (mine,)

    def call_features(self, fid: int, props: int) -> Regs:
        if not fid >> 31:
            # A feature ID: the NPI, when the VMM can raise it.  The schedule
            # receiver interrupt is for an endpoint that schedules others: not a guest.
            if fid == FEAT_NPI and self.npi is not None:
                return ok(self.npi)
            raise FfaError(Err.NOT_SUPPORTED, f"feature {fid:#x}")
        fn = self.offered(fid)
        if fn is None:
            raise FfaError(Err.NOT_SUPPORTED, f"function {fid:#x}")
        if props:
            raise FfaError(Err.INVALID_PARAMETERS, "input properties must be zero")
        if fn == Fn.RXTX_MAP:
            # w2[1:0] = 0: 4 KiB minimum; 1.2 adds the maximum page count in [31:16].
            return ok(self.opts.limits.rxtx_pages << 16 if self.version >= V1_2 else 0)
        return ok(0)

    def offered(self, fid: int) -> Fn | None:
        """The function ``fid`` names, if this endpoint offers it to the negotiated
        version (fast call, owner 4, a width it exists in; DONATE only if configured)."""
        fid &= ~SVE_HINT  # not part of the function's identity (DEN0028 §2.5.1)
        if fid >> 31 != 1 or (fid >> 24) & 0x3F != 4 or fid & MBZ_MASK:
            return None
        try:
            fn = Fn(fid & 0xFFFF)
        except ValueError:
            return None
        widths = IMPLEMENTED.get(fn, ())
        if (64 if fid >> 30 & 1 else 32) not in widths:
            return None
        if fn == Fn.MEM_DONATE and not self.opts.donate:
            return None
        if fn in (Fn.MSG_WAIT, Fn.MSG_SEND_DIRECT_RESP) and not self.opts.peers:
            return None  # only a VM that accepts peers' requests is ever asked anything
        return fn if SINCE.get(fn, V1_0) <= max(self.version, V1_0) else None

    def call_id_get(self) -> Regs:
        return ok(self.opts.id)

    def call_spm_id_get(self) -> Regs:
        return ok(self.opts.spm_id)

    # ------------------------------------------------------------ RX/TX
    def call_rxtx_map(self, tx: int, rx: int, pages: int) -> Regs:
        if self.mailbox.mapped:
            raise FfaError(Err.DENIED, "RX/TX buffers are mapped already")
        if pages & ~0x3F or not 1 <= pages <= self.opts.limits.rxtx_pages:
            raise FfaError(Err.INVALID_PARAMETERS, f"{pages} pages; 1..{self.opts.limits.rxtx_pages}")
        size = pages * PAGE
        if tx % PAGE or rx % PAGE or not self.in_ram(tx, size) or not self.in_ram(rx, size):
            raise FfaError(Err.INVALID_PARAMETERS, "buffers must be page-aligned guest RAM")
        if tx < rx + size and rx < tx + size:
            raise FfaError(Err.INVALID_PARAMETERS, "TX and RX overlap")
        if self.ledger.overlaps(tx, size) or self.ledger.overlaps(rx, size):
            raise FfaError(Err.DENIED, "a buffer lies in memory shared or lent")
        self.mailbox.map(tx, rx, pages)
        return ok()

    def call_rxtx_unmap(self, w1: int) -> Regs:
        if w1:
            raise FfaError(Err.INVALID_PARAMETERS, "w1 (the VM ID a hypervisor would name) must be zero")
        if not self.mailbox.mapped:
            raise FfaError(Err.INVALID_PARAMETERS, "no buffers mapped")
        self.mailbox.unmap()
        self.fragments = None
        self.queued.clear()
        return ok()

    def call_rx_release(self, w1: int) -> Regs:
        if w1:
            raise FfaError(Err.INVALID_PARAMETERS, "w1 must be zero from a VM")
        self.mailbox.release()
        return ok()

    # ------------------------------------------------------------ partition info
    async def call_partition_info_get(self, words: Sequence[int], flags: int) -> Regs:
        u = uuid_of_words(words)
        if self.version == V1_0:
            if flags:
                raise FfaError(Err.INVALID_PARAMETERS, "v1.0 has no flags")
        elif flags & ~PARTINFO_COUNT_ONLY:
            raise FfaError(Err.INVALID_PARAMETERS, f"flags {flags:#x}")
        infos = self._matching(u)
        if not infos:
            raise FfaError(Err.INVALID_PARAMETERS, f"no partition with UUID {u}")
        size = PARTINFO_SIZE if self.version > V1_0 else 0
        if flags & PARTINFO_COUNT_ONLY:
            return ok(len(infos), size)
        data = encode_partition_info(infos, self.version)
        await self._fill_rx(self.mailbox.claim_rx(len(data)), data)
        return ok(len(infos), size)

    def call_partition_info_get_regs(self, lo: int, hi: int, x3: int) -> Regs:
        start, tag = x3 & 0xFFFF, (x3 >> 16) & 0xFFFF
        if x3 >> 32 or tag:
            raise FfaError(Err.INVALID_PARAMETERS, "this endpoint's partition list has no UUID info tag")
        infos = self._matching(uuid_of_dwords(lo, hi))
        if not infos or start >= len(infos):
            raise FfaError(Err.INVALID_PARAMETERS, f"start index {start} of {len(infos)}")
        chunk = infos[start:start + PARTINFO_REGS_PER_CALL]
        current = start + len(chunk) - 1
        regs: list[int] = []
        for p in chunk:
            regs += [p.id | p.exec_contexts << 16 | p.properties << 32,
                     int.from_bytes(p.uuid[:8], "little"), int.from_bytes(p.uuid[8:], "little")]
        x2 = (len(infos) - 1) | current << 16 | PARTINFO_SIZE << 48
        return ok(x2, *regs, wide=True)

    # ------------------------------------------------------------ messages
    async def call_direct_req(self, w1: int, w2: int, payload: Sequence[int], wide: bool) -> Regs:
        sender, receiver = split_ids(w1)
        if w1 >> 32 or sender != self.opts.id:
            raise FfaError(Err.INVALID_PARAMETERS, f"sender {sender:#x} is not the caller")
        if w2 & DIRECT_FRAMEWORK or w2:
            raise FfaError(Err.INVALID_PARAMETERS, "framework messages and flags are not accepted")
        bound = self._receiver(receiver, PROP_DIRECT_RECV)
        out = await bound.plugin.direct_request(sender, tuple(payload), wide=wide)
        if isinstance(out, Err):
            raise FfaError(out, f"partition {receiver:#x} refused")
        resp = _payload(out, 5, wide)
        fid = fid64(Fn.MSG_SEND_DIRECT_RESP) if wide else fid32(Fn.MSG_SEND_DIRECT_RESP)
        return (fid, receiver << 16 | sender, 0, *resp)

    async def call_direct_req2(self, x1: int, lo: int, hi: int, payload: Sequence[int]) -> Regs:
        sender, receiver = split_ids(x1)
        if x1 >> 32 or sender != self.opts.id:
            raise FfaError(Err.INVALID_PARAMETERS, f"sender {sender:#x} is not the caller")
        bound = self._receiver(receiver, PROP_DIRECT_REQ2_RECV)
        u = uuid_of_dwords(lo, hi)
        if u.int and u not in bound.spec.uuids:
            raise FfaError(Err.INVALID_PARAMETERS, f"partition {receiver:#x} has no service {u}")
        out = await bound.plugin.direct_request(sender, tuple(payload), wide=True)
        if isinstance(out, Err):
            raise FfaError(out, f"partition {receiver:#x} refused")
        return (fid64(Fn.MSG_SEND_DIRECT_RESP2), receiver << 16 | sender, 0, 0, *_payload(out, 14, True))

    def offer_request(self, sender: int, args: tuple[int, ...], wide: bool,
                      done: Callable[[], None]) -> PeerRequest | Err:
        """A peer VM's direct request for this guest (the peers sidecar checked the
        pair policy); at most ``pending_messages`` wait."""
        if not self.version:
            return Err.DENIED
        if len(self.inbox) >= self.opts.limits.pending_messages:
            return Err.BUSY
        req = PeerRequest(sender, args, wide, done)
        self.inbox.append(req)
        return req

    def withdraw(self, req: PeerRequest) -> None:
        """The peer stopped waiting (timeout): the guest can no longer answer it."""
        if req in self.inbox:
            self.inbox.remove(req)

    def call_msg_wait(self) -> Regs:
        """FFA_MSG_WAIT: the oldest peer request, as the direct request it is.  This
        endpoint never blocks a vCPU: with nothing pending the guest gets RETRY."""
        if any(r.taken for r in self.inbox):
            raise FfaError(Err.DENIED, "answer the request you hold first")
        if not self.inbox:
            raise FfaError(Err.RETRY, "no message")
        req = self.inbox[0]
        req.taken = True
        fid = fid64(Fn.MSG_SEND_DIRECT_REQ) if req.wide else fid32(Fn.MSG_SEND_DIRECT_REQ)
        return (fid, req.sender << 16 | self.opts.id, 0, *req.args[:5])

    def call_direct_resp(self, w1: int, w2: int, payload: Sequence[int], wide: bool) -> Regs:
        sender, receiver = split_ids(w1)
        if sender != self.opts.id or w2:
            raise FfaError(Err.INVALID_PARAMETERS, "the responder must be the caller, with w2 zero")
        req = next((r for r in self.inbox if r.taken), None)
        if req is None:
            raise FfaError(Err.DENIED, "no direct request is held")
        if receiver != req.sender or wide != req.wide:
            raise FfaError(Err.INVALID_PARAMETERS, f"the request held is from {req.sender:#x}")
        self.inbox.remove(req)
        req.response = _payload(payload, 5, wide)
        req.done()
        return ok()

    async def call_msg_send2(self, w1: int, flags: int) -> Regs:
        if w1:
            raise FfaError(Err.INVALID_PARAMETERS, "w1 (a hypervisor's sender VM ID) must be zero")
        if flags & ~MSG2_DELAY_SRI:
            raise FfaError(Err.INVALID_PARAMETERS, f"flags {flags:#x}")
        if not self.mailbox.mapped:
            raise FfaError(Err.DENIED, "no TX buffer")
        header_size = self._msg_header_size()
        head = await self.read_guest(self.mailbox.tx, header_size)
        mflags, _res, offset, ids, size = struct.unpack_from("<IIIII", head)
        sender, receiver = split_ids(ids)
        if mflags or sender != self.opts.id:
            raise FfaError(Err.INVALID_PARAMETERS, "header flags, or a sender that is not the caller")
        if offset < header_size or offset + size > self.mailbox.size or not size:
            raise FfaError(Err.INVALID_PARAMETERS, f"payload {offset}+{size} outside the TX buffer")
        bound = self._receiver(receiver, PROP_INDIRECT)
        payload = await self.read_guest(self.mailbox.tx + offset, size)
        rc = await bound.plugin.indirect_message(sender, payload)
        if isinstance(rc, Err):
            raise FfaError(rc, f"partition {receiver:#x} refused the message")
        return ok()

    # ------------------------------------------------------------ notifications
    def _own(self, receiver: int) -> None:
        if receiver != self.opts.id:
            raise FfaError(Err.INVALID_PARAMETERS, f"endpoint {receiver:#x} is not the caller")

    def call_bitmap_create(self, vm: int, vcpus: int) -> Regs:
        self._own(vm)
        if not vcpus:
            raise FfaError(Err.INVALID_PARAMETERS, "no vCPU")
        self.notifications.create()
        return ok()

    def call_bitmap_destroy(self, vm: int) -> Regs:
        self._own(vm)
        self.notifications.destroy()
        return ok()

    def call_bind(self, w1: int, flags: int, bitmap: int, unbind: bool) -> Regs:
        sender, receiver = split_ids(w1)
        self._own(receiver)
        if sender not in self.partitions and sender not in self.opts.peers:
            raise FfaError(Err.INVALID_PARAMETERS, f"no partition or peer {sender:#x}")
        if unbind:
            if flags:
                raise FfaError(Err.INVALID_PARAMETERS, "w2 must be zero")
            self.notifications.unbind(sender, bitmap)
            return ok()
        if flags & NOTIF_PER_VCPU or flags:
            raise FfaError(Err.INVALID_PARAMETERS, "only global notifications are offered")
        self.notifications.bind(sender, bitmap)
        return ok()

    async def call_set(self, w1: int, flags: int, bitmap: int) -> Regs:
        sender, receiver = split_ids(w1)
        if sender != self.opts.id:
            raise FfaError(Err.INVALID_PARAMETERS, f"sender {sender:#x} is not the caller")
        if flags & ~NOTIF_SET_DELAY_SRI:
            raise FfaError(Err.INVALID_PARAMETERS, "only global notifications are offered")
        if not bitmap:
            raise FfaError(Err.INVALID_PARAMETERS, "empty bitmap")
        bound = self.partitions.get(receiver)
        if bound is None:
            raise FfaError(Err.INVALID_PARAMETERS, f"no partition {receiver:#x}")
        rc = await bound.plugin.notified(sender, bitmap)
        if isinstance(rc, Err):
            raise FfaError(rc, f"partition {receiver:#x} refused the notification")
        return ok()

    def call_get(self, w1: int, flags: int, vcpus: int) -> Regs:
        vcpu, receiver = split_ids(w1)
        self._own(receiver)
        if vcpu >= max(vcpus, 1) or flags & ~0xF:
            raise FfaError(Err.INVALID_PARAMETERS, f"vCPU {vcpu} or flags {flags:#x}")
        n = self.notifications
        if not n.created:
            raise FfaError(Err.DENIED, "no notification bitmap")
        # Senders by kind: partitions with the secure bit, else VMs (partitions or peers).
        secure = {s for s in n.pending if s & SECURE_BIT}
        normal = set(n.pending) - secure
        sp = n.take(secure) if flags & NOTIF_GET_SP else 0
        vm = n.take(normal) if flags & NOTIF_GET_VM else 0
        hyp = n.take_framework() if flags & NOTIF_GET_HYP else 0
        # No SPM framework notifications exist here: w6 is always 0.
        return ok(sp & MASK32, sp >> 32, vm & MASK32, vm >> 32, 0, hyp)

    def call_info_get(self, wide: bool) -> Regs:
        if not self.notifications.any_pending:
            raise FfaError(Err.NO_DATA, "nothing pending")
        # One list of one ID (ours: global notifications name no vCPU), list size 0.
        return ok(1 << NOTIF_INFO_COUNT_SHIFT, self.opts.id, wide=wide)

    # ------------------------------------------------------------ memory
    async def call_mem_send(self, kind: Fn, total: int, frag: int, addr: int, pages: int) -> Regs:
        if kind == Fn.MEM_DONATE and not self.opts.donate:
            raise FfaError(Err.NOT_SUPPORTED, "DONATE is not offered")
        if addr or pages:
            raise FfaError(Err.NOT_SUPPORTED, "only the TX buffer may carry the descriptor")
        if not self.mailbox.mapped:
            raise FfaError(Err.INVALID_PARAMETERS, "no TX buffer")
        if self.fragments is not None:
            raise FfaError(Err.BUSY, "a fragmented transaction is in progress")
        if not 0 < frag <= total or frag > self.mailbox.size:
            raise FfaError(Err.INVALID_PARAMETERS, f"fragment {frag} of {total}")
        if len(self.ledger) >= self.opts.limits.shares:
            raise FfaError(Err.NO_MEMORY, f"{len(self.ledger)} transactions, at most {self.opts.limits.shares}")
        if total > self.mailbox.size * self.opts.limits.fragments:
            raise FfaError(Err.NO_MEMORY, f"a {total}-byte descriptor needs more fragments than allowed")
        data = bytearray(await self.read_guest(self.mailbox.tx, frag))
        if frag < total:
            # The handle is the transaction's own from the first fragment on (§10.3.2).
            handle = self.ledger.reserve()
            self.fragments = Fragments(kind, total, data, 1, handle)
            return (fid32(Fn.MEM_FRAG_RX), handle & MASK32, handle >> 32, frag, 0)
        return await self._commit(kind, bytes(data), self.ledger.reserve())

    async def call_frag_tx(self, lo: int, hi: int, frag: int, w4: int) -> Regs:
        f = self.fragments
        if f is None or (hi << 32 | lo) != f.handle:
            raise FfaError(Err.INVALID_PARAMETERS, "no fragmented transaction with this handle")
        if w4:
            raise FfaError(Err.INVALID_PARAMETERS, "w4 (a hypervisor's sender ID) must be zero")
        if not 0 < frag <= self.mailbox.size or len(f.data) + frag > f.total:
            self.fragments = None
            raise FfaError(Err.INVALID_PARAMETERS, f"fragment of {frag} bytes; the transaction is aborted")
        if f.count >= self.opts.limits.fragments:
            self.fragments = None
            raise FfaError(Err.NO_MEMORY, "too many fragments; the transaction is aborted")
        f.data += await self.read_guest(self.mailbox.tx, frag)
        f.count += 1
        if len(f.data) < f.total:
            return (fid32(Fn.MEM_FRAG_RX), lo, hi, len(f.data), 0)
        self.fragments = None
        return await self._commit(f.kind, bytes(f.data), f.handle)

    async def _commit(self, kind: Fn, data: bytes, handle: int) -> Regs:
        tx = self.parse(kind, data)
        if tx.flags & MEM_FLAG_ZERO:
            # "Zero after unmapping from the sender, before mapping for a borrower"
            # (§10.10.4): the sender has given the pages up, so now is that moment.
            await self._zero(tx.ranges)
        self.ledger.add(tx, handle)
        return ok(handle & MASK32, handle >> 32)

    async def _zero(self, ranges: Sequence[tuple[int, int]]) -> None:
        for addr, n in ranges:
            for page in range(n):
                await self.write_guest(addr + page * PAGE, bytes(PAGE))

    def parse(self, kind: Fn, data: bytes) -> MemTransaction:
        return parse_transaction(
            data, kind=kind, version=self.version, sender=self.opts.id, receivers=self._accepts,
            in_ram=self.in_ram, in_use=lambda a, n: self.ledger.overlaps(a, n) or self.mailbox.overlaps(a, n),
            limits=self.limits)

    async def call_reclaim(self, lo: int, hi: int, flags: int) -> Regs:
        if flags & ~(RECLAIM_ZERO | RECLAIM_TIME_SLICE):
            raise FfaError(Err.INVALID_PARAMETERS, f"flags {flags:#x}")
        handle = hi << 32 | lo
        entry = self.ledger.get(handle)
        if flags & RECLAIM_ZERO and entry.tx.kind == Fn.MEM_SHARE:
            raise FfaError(Err.INVALID_PARAMETERS, "shared memory is never zeroed on reclaim")
        entry = self.ledger.reclaim(handle, self.opts.id)
        if flags & RECLAIM_ZERO:
            await self._zero(entry.tx.ranges)
        return ok()

    # ------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        self.version = 0
        self.mailbox.unmap()
        self.ledger.clear()
        self.notifications = Notifications()
        self.fragments = None
        self.queued.clear()
        while self.inbox:
            req = self.inbox.popleft()
            req.response = Err.ABORTED
            req.done()
        for b in self.partitions.values():
            b.plugin.reset()

    def snapshot(self) -> dict[str, Any]:
        return {"version": self.version, "mailbox": self.mailbox.to_dict(), "ledger": self.ledger.to_dict(),
                "notifications": self.notifications.to_dict(),
                "queued": [[s, p.hex()] for s, p in self.queued],
                "partitions": {b.spec.name: b.plugin.snapshot() for b in self.partitions.values()}}

    def restore(self, data: dict[str, Any]) -> None:
        """Raises ValueError, changing nothing, if ``data`` is not a snapshot this
        endpoint could have written (a state file may be damaged)."""
        try:
            version = data["version"]
            if not isinstance(version, int) or version not in (0, V1_0, V1_1, V1_2) or version > self.opts.version:
                raise ValueError(f"version {version!r} is not offered")
            mailbox = Mailbox.from_dict(data["mailbox"])
            if mailbox.pages > self.opts.limits.rxtx_pages:
                raise ValueError("RX/TX buffers larger than the limit")
            ledger = Ledger.from_dict(data["ledger"])
            notifications = Notifications.from_dict(data["notifications"])
            queued = deque((int(s), bytes.fromhex(p)) for s, p in data["queued"])
            if len(queued) > self.opts.limits.pending_messages:
                raise ValueError(f"{len(queued)} queued messages, more than the limit")
            partitions = data["partitions"]
            if not isinstance(partitions, dict) or not all(isinstance(v, dict) for v in partitions.values()):
                raise ValueError("partitions is not a mapping of partition states")
            # Each partition's own state, checked on a fresh instance before anything is replaced.
            for b in self.partitions.values():
                type(b.plugin).check_state(partitions.get(b.spec.name, {}))
        except (KeyError, TypeError, AttributeError, IndexError, OverflowError) as err:
            raise ValueError(f"not an FF-A snapshot: {err!r}") from err
        self.version, self.mailbox, self.ledger, self.notifications, self.queued = (
            version, mailbox, ledger, notifications, queued)
        for b in self.partitions.values():
            b.plugin.restore(partitions.get(b.spec.name, {}))


def _payload(out: Sequence[int], n: int, wide: bool) -> tuple[int, ...]:
    """A partition's response registers: ``n`` of them, masked to the call's width."""
    mask = (1 << 64) - 1 if wide else MASK32
    values = tuple(int(v) & mask for v in out)[:n]
    return values + (0,) * (n - len(values))


#: Every function this endpoint implements, with the widths it exists in.
IMPLEMENTED: dict[Fn, tuple[int, ...]] = {
    Fn.VERSION: (32,), Fn.FEATURES: (32,), Fn.RX_RELEASE: (32,), Fn.RXTX_MAP: (32, 64),
    Fn.RXTX_UNMAP: (32,), Fn.PARTITION_INFO_GET: (32,), Fn.ID_GET: (32,), Fn.SPM_ID_GET: (32,),
    Fn.MSG_SEND_DIRECT_REQ: (32, 64), Fn.MSG_SEND_DIRECT_REQ2: (64,), Fn.MSG_SEND2: (32,),
    Fn.MSG_WAIT: (32,), Fn.MSG_SEND_DIRECT_RESP: (32, 64),
    Fn.MEM_SHARE: (32, 64), Fn.MEM_LEND: (32, 64), Fn.MEM_DONATE: (32, 64), Fn.MEM_RECLAIM: (32,),
    Fn.MEM_FRAG_TX: (32,), Fn.NOTIFICATION_BITMAP_CREATE: (32,), Fn.NOTIFICATION_BITMAP_DESTROY: (32,),
    Fn.NOTIFICATION_BIND: (32,), Fn.NOTIFICATION_UNBIND: (32,), Fn.NOTIFICATION_SET: (32,),
    Fn.NOTIFICATION_GET: (32,), Fn.NOTIFICATION_INFO_GET: (32, 64), Fn.PARTITION_INFO_GET_REGS: (64,),
}
