"""A guest-side OP-TEE driver for the tests, shaped after Linux's smc_abi.c: it
lays out ``optee_msg_arg`` and non-contiguous page lists in the simulated RAM,
issues CALL_WITH_ARG, and answers RPCs (RPC_FUNC_ALLOC/FREE/FOREIGN_INTR/CMD
with SHM_ALLOC, SHM_FREE and GET_TIME) until the call returns."""

from __future__ import annotations

import mmap
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hvcproxyd.handlers.tee_proxy import abi
from hvcproxyd.handlers.tee_proxy.msgarg import MsgArg, Param, pack, parse
from hvcproxyd.handlers.tee_proxy.reftee import RPC_CMD_TEST_REVERSE, uuid_params
from hvcproxyd.smccc import MASK32

CallFn = Callable[..., Awaitable[tuple[int, ...]]]
PAGE = abi.PAGE_SIZE


@dataclass
class GuestRam:
    """Bump allocation of pages in a RAM mapping at ``base``."""

    ram: mmap.mmap | bytearray
    base: int
    next_page: int = 1 << 20  # leave the first MiB alone

    def alloc(self, pages: int = 1) -> int:
        gpa = self.base + self.next_page
        self.next_page += pages * PAGE
        assert self.next_page <= len(self.ram), "test guest RAM exhausted"
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        self.ram[gpa - self.base:gpa - self.base + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa - self.base:gpa - self.base + n])

    def pagelist(self, pages: list[int], offset: int = 0) -> int:
        """A non-contiguous list naming ``pages``; buf_ptr for it (offset in the low bits)."""
        lists = [self.alloc() for _ in range(max(1, -(-len(pages) // abi.PAGELIST_ENTRIES)))]
        for i, lp in enumerate(lists):
            chunk = pages[i * abi.PAGELIST_ENTRIES:(i + 1) * abi.PAGELIST_ENTRIES]
            nxt = lists[i + 1] if i + 1 < len(lists) else 0
            entries = chunk + [0] * (abi.PAGELIST_ENTRIES - len(chunk)) + [nxt]
            self.write(lp, struct.pack(f"<{len(entries)}Q", *entries))
        return lists[0] | offset

    def buffer(self, data: bytes, capacity: int | None = None, offset: int = 0) -> tuple[int, int]:
        """Scattered pages holding ``data``: (buf_ptr, size) of a NONCONTIG memref."""
        size = capacity if capacity is not None else len(data)
        n = -(-(offset + size) // PAGE)
        pages = [self.alloc() for _ in range(2 * n)][::2]  # every other page: not contiguous
        blob = bytearray((offset + size) * b"\0")
        blob[offset:offset + len(data)] = data
        for i, p in enumerate(pages):
            self.write(p, bytes(blob[i * PAGE:(i + 1) * PAGE]))
        return self.pagelist(pages, offset), size

    def pages_of(self, buf_ptr: int, size: int) -> tuple[list[int], int]:
        lp, off = buf_ptr & ~(PAGE - 1), buf_ptr & (PAGE - 1)
        n = -(-(off + size) // PAGE)
        return list(struct.unpack(f"<{n}Q", self.read(lp, 8 * n))), off

    def write_buffer(self, buf_ptr: int, start: int, data: bytes) -> None:
        pages, off = self.pages_of(buf_ptr, start + len(data))
        for i, byte in enumerate(data):
            page, at = divmod(off + start + i, PAGE)
            self.write(pages[page] + at, bytes([byte]))

    def read_buffer(self, buf_ptr: int, size: int) -> bytes:
        lp = buf_ptr & ~(PAGE - 1)
        off = buf_ptr & (PAGE - 1)
        n = -(-(off + size) // PAGE)
        entries = struct.unpack(f"<{n}Q", self.read(lp, 8 * n))
        blob = b"".join(self.read(p, PAGE) for p in entries)
        return blob[off:off + size]


def memref(kind: int, buf_ptr: int, size: int, shm_ref: int = 0) -> Param:
    return Param(kind | abi.ATTR_NONCONTIG, buf_ptr, size, shm_ref)


def open_session_arg(ta: uuid.UUID, *params: Param) -> MsgArg:
    a, b = uuid_params(ta)
    return MsgArg(abi.CMD_OPEN_SESSION, params=[
        Param(abi.ATTR_TYPE_VALUE_INPUT | abi.ATTR_META, a, b, 0),
        Param(abi.ATTR_TYPE_VALUE_INPUT | abi.ATTR_META, 0, 0, 0),  # client UUID, login public
        *params])


@dataclass
class GuestTee:
    """One guest's driver: ``call`` runs a message to completion, answering RPCs."""

    ram: GuestRam
    smc: CallFn
    w7: int = 0xBAD
    rpc_seen: list[int] = field(default_factory=list)
    #: Changes a hostile guest makes to its answer to an RPC command, after answering it properly.
    tamper: Callable[[MsgArg], None] | None = None
    shm: dict[int, int] = field(default_factory=dict)  # cookie -> gpa of RPC allocations still held
    _cookie: int = 0x1000

    async def raw(self, fid: int, *args: int) -> tuple[int, ...]:
        return await self.smc(fid, *args)

    async def call(self, arg: MsgArg, gpa: int | None = None) -> tuple[int, MsgArg]:
        gpa = gpa if gpa is not None else self.ram.alloc() + 0x80
        self.ram.write(gpa, pack(arg))
        regs = await self.smc(abi.CALL_WITH_ARG, gpa >> 32, gpa & MASK32, 0, 0, 0, 0, self.w7)
        while (regs[0] & 0xFFFF_0000) == abi.RPC_PREFIX and regs[0] != abi.RETURN_UNKNOWN_FUNCTION:
            regs = await self.smc(abi.RETURN_FROM_RPC, *self._rpc(regs), self.w7)
        return regs[0], parse(self.ram.read(gpa, abi.arg_size(len(arg.params))), len(arg.params))

    def _new_cookie(self) -> int:
        self._cookie += 1
        return self._cookie

    def _rpc(self, regs: tuple[int, ...]) -> tuple[int, ...]:
        func = regs[0] & 0xFFFF
        self.rpc_seen.append(func)
        a1, a2, a3 = regs[1], regs[2], regs[3]
        a4 = a5 = 0
        if func == abi.RPC_FUNC_ALLOC:
            gpa = self.ram.alloc()
            cookie = self._new_cookie()
            self.shm[cookie] = gpa
            a1, a2, a4, a5 = gpa >> 32, gpa & MASK32, cookie >> 32, cookie & MASK32
        elif func == abi.RPC_FUNC_FREE:
            self.shm.pop((a1 << 32) | a2, None)
        elif func == abi.RPC_FUNC_CMD:
            at = self.shm.get((a1 << 32) | a2)
            if at is not None:  # Linux, too, ignores a command in memory it does not know
                n = min(struct.unpack_from("<8I", self.ram.read(at, 32))[7], 4)
                rpc = self.rpc_cmd(parse(self.ram.read(at, abi.arg_size(n)), n))
                if self.tamper is not None:
                    self.tamper(rpc)
                self.ram.write(at, pack(rpc))
        return a1, a2, a3, a4, a5, 0

    def rpc_cmd(self, rpc: MsgArg) -> MsgArg:
        """Answer an RPC command, checking its parameters as Linux's handlers do."""
        rpc.ret = abi.TEEC_SUCCESS
        p = rpc.params[0] if len(rpc.params) == 1 else None
        if rpc.cmd == abi.RPC_CMD_SHM_ALLOC and p is not None and p.attr == abi.ATTR_TYPE_VALUE_INPUT:
            if p.b > 64 * PAGE:
                rpc.ret = abi.TEEC_ERROR_OUT_OF_MEMORY
                return rpc
            cookie = self._new_cookie()
            buf_ptr, _ = self.ram.buffer(b"", capacity=p.b)
            self.shm[cookie] = buf_ptr
            rpc.params[0] = memref(abi.ATTR_TYPE_TMEM_OUTPUT, buf_ptr, p.b, cookie)
        elif rpc.cmd == abi.RPC_CMD_SHM_FREE and p is not None and p.attr == abi.ATTR_TYPE_VALUE_INPUT:
            if self.shm.pop(p.b, None) is None:
                rpc.ret = abi.TEEC_ERROR_BAD_PARAMETERS
        elif rpc.cmd == abi.RPC_CMD_GET_TIME and p is not None and p.type == abi.ATTR_TYPE_VALUE_OUTPUT:
            rpc.params[0] = Param(p.attr, 1234, 5678, 0)
        elif rpc.cmd == RPC_CMD_TEST_REVERSE and p is not None and p.type == abi.ATTR_TYPE_RMEM_INOUT \
                and p.c in self.shm:  # as tee-supplicant would: the memref lies in SHM we allocated
            data = self.ram.read_buffer(self.shm[p.c], p.a + p.b)[p.a:]
            self.ram.write_buffer(self.shm[p.c], p.a, data[::-1])
        else:
            rpc.ret = abi.TEEC_ERROR_BAD_PARAMETERS
        return rpc
