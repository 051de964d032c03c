"""Helpers for the FF-A tests: a VmService with the ``ffa`` handler over 1 MiB of
real (anonymous mmap) guest RAM, a caller, and a descriptor builder that writes
every field itself (independent of the parser under test) so one test can break
exactly one rule."""

from __future__ import annotations

import itertools
import mmap
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from hvcproxyd.core.guestmem import GuestMemory
from hvcproxyd.core.service import VmService
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.ffa import FfaHandler
from hvcproxyd.wire import N_ARGS, Call, RamRegion

RAM, RAM_SIZE = 0x4000_0000, 1 << 20
PAGE = 4096
TX, RX = RAM, RAM + PAGE
VM_ID = 1
ECHO, STORE = 0x8001, 0x8002
ECHO_UUID = uuid.UUID("a8f3b9e2-5b9c-4c7d-9f0e-3c8e2d6b1a01")
STORE_UUID = uuid.UUID("a8f3b9e2-5b9c-4c7d-9f0e-3c8e2d6b1a02")


def fid32(n: int) -> int:
    """FFA_SMC_32(n) from include/linux/arm_ffa.h, spelled out independently."""
    return 0x8400_0000 | n


def fid64(n: int) -> int:
    return 0xC400_0000 | n


VERSION, FEATURES, RX_RELEASE, RXTX_MAP, RXTX_UNMAP = fid32(0x63), fid32(0x64), fid32(0x65), fid64(0x66), fid32(0x67)
PART_INFO, ID_GET, SPM_ID_GET, PART_INFO_REGS = fid32(0x68), fid32(0x69), fid32(0x85), fid64(0x8B)
DIRECT_REQ32, DIRECT_REQ64, DIRECT_RESP32, DIRECT_RESP64 = fid32(0x6F), fid64(0x6F), fid32(0x70), fid64(0x70)
DIRECT_REQ2, DIRECT_RESP2, MSG_SEND2 = fid64(0x8D), fid64(0x8E), fid32(0x86)
MEM_DONATE, MEM_LEND, MEM_SHARE, MEM_RECLAIM = fid32(0x71), fid32(0x72), fid32(0x73), fid32(0x77)
MEM_SHARE64, MEM_FRAG_RX, MEM_FRAG_TX, MEM_RETRIEVE_REQ = fid64(0x73), fid32(0x7A), fid32(0x7B), fid32(0x74)
BITMAP_CREATE, BITMAP_DESTROY, BIND, UNBIND = fid32(0x7D), fid32(0x7E), fid32(0x7F), fid32(0x80)
NOTIF_SET, NOTIF_GET, INFO_GET, INFO_GET64 = fid32(0x81), fid32(0x82), fid32(0x83), fid64(0x83)
ERROR, SUCCESS32, SUCCESS64 = fid32(0x60), fid32(0x61), fid64(0x61)

U64 = (1 << 64) - 1
NOT_SUPPORTED, INVALID, NO_MEMORY, BUSY, DENIED, NO_DATA = -1, -2, -3, -4, -6, -9

CallFn = Callable[..., Awaitable[tuple[int, ...]]]


def err(code: int) -> tuple[int, int, int]:
    """The first three registers of FFA_ERROR(code)."""
    return (ERROR, 0, code & U64)


def handler_yaml(options: str = "", partitions: str | None = None, top: str = "") -> str:
    parts = partitions if partitions is not None else f"""
          echo: {{type: echo, id: {ECHO:#x}, uuids: ["{ECHO_UUID}"]}}
          store: {{type: storage, id: {STORE:#x}, uuids: ["{STORE_UUID}"]}}"""
    return f"""
vm: t
{top}
handlers:
  ffa:
    type: ffa
    options:
      id: {VM_ID}
      {options}
      partitions: {parts}
rules:
  - match: ffa
    action: ffa
"""


@dataclass
class Guest:
    svc: VmService
    ram: mmap.mmap
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def handler(self) -> FfaHandler:
        inst = self.svc.instances["ffa"]
        assert isinstance(inst, FfaHandler)
        return inst

    async def call(self, fid: int, *args: int, vcpu: int = 0, flags: int = 0) -> tuple[int, ...]:
        padded = tuple(a & U64 for a in args) + (0,) * (N_ARGS - len(args))
        reply = await self.svc.dispatch(Call(next(self.seq), vcpu, fid, padded, flags))
        return reply.regs

    def write(self, gpa: int, data: bytes) -> None:
        self.ram[gpa - RAM:gpa - RAM + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa - RAM:gpa - RAM + n])

    async def ready(self, version: int = 0x10002) -> None:
        """Negotiate and map one page each of TX and RX, as Linux's driver does."""
        assert (await self.call(VERSION, version))[0] in (0x10000, 0x10001, 0x10002)
        assert (await self.call(RXTX_MAP, TX, RX, 1))[0] == SUCCESS32


def make_guest(make_config: Callable[[str], VmConfig], tmp_path: Path, options: str = "",
               partitions: str | None = None) -> Guest:
    options = f"state_dir: {tmp_path / 'state'}\n      {options}"
    svc = VmService(make_config(handler_yaml(options, partitions)))
    ram = mmap.mmap(-1, RAM_SIZE)
    svc.facts.memory = GuestMemory((RamRegion(RAM, RAM_SIZE),), 40, maps={0: ram})
    return Guest(svc, ram)


# ----------------------------------------------------------------- descriptors

@dataclass
class Desc:
    """A memory transaction descriptor, field by field (DEN0077 1.2 §10.11; 1.0 §5.11).
    ``raw`` overrides let a test set any field to any value."""

    sender: int = VM_ID
    attributes: int = 0x2F  # Normal, write-back, inner shareable (Linux's SHARE)
    flags: int = 0
    handle: int = 0
    tag: int = 0
    receivers: list[tuple[int, int]] = field(default_factory=lambda: [(ECHO, 0x2)])  # (id, access RW)
    ranges: list[tuple[int, int]] = field(default_factory=lambda: [(RAM + 0x10000, 2)])
    total_pages: int | None = None
    v10: bool = False
    emad_size: int = 16
    ep_offset: int | None = None
    composite_offset: int | None = None
    reserved_header: bytes = bytes(12)
    ep_flags: int = 0
    composite_reserved: int = 0
    range_reserved: int = 0
    trailing: bytes = b""

    def encode(self) -> bytes:
        n = len(self.receivers)
        if self.v10:
            head = struct.pack("<HBBIQQII", self.sender, self.attributes, 0, self.flags, self.handle, self.tag, 0, n)
            ep_off = 32
        else:
            ep_off = 48 if self.ep_offset is None else self.ep_offset
            head = struct.pack("<HHIQQIII", self.sender, self.attributes, self.flags, self.handle, self.tag,
                               self.emad_size, n, ep_off) + self.reserved_header
        esize = 16 if self.v10 else self.emad_size
        comp = ep_off + n * esize if self.composite_offset is None else self.composite_offset
        body = bytearray(head.ljust(ep_off, b"\0"))
        for rid, access in self.receivers:
            body += struct.pack("<HBBI8x", rid, access, self.ep_flags, comp).ljust(esize, b"\0")
        body = body.ljust(comp, b"\0")
        total = sum(p for _, p in self.ranges) if self.total_pages is None else self.total_pages
        body[comp:comp + 16] = struct.pack("<IIQ", total, len(self.ranges), self.composite_reserved)
        for addr, pages in self.ranges:
            body += struct.pack("<QII", addr, pages, self.range_reserved)
        return bytes(body) + self.trailing


async def share(g: Guest, desc: Desc | bytes, fid: int = MEM_SHARE) -> tuple[int, ...]:
    """Write ``desc`` into TX and send it in one fragment."""
    data = desc.encode() if isinstance(desc, Desc) else desc
    g.write(TX, data)
    return await g.call(fid, len(data), len(data), 0, 0)


def handle_of(regs: tuple[int, ...]) -> int:
    assert regs[0] == SUCCESS32, regs
    return regs[3] << 32 | regs[2]
