"""Building a tee-proxy handler for unit tests: real guest memory over a
bytearray (reached the way the VMM path reaches it, through read/write
callbacks), a real reference TEE on a socket, and a call helper."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hvcproxyd.core.guestmem import GuestMemory
from hvcproxyd.core.handler import VmContext, VmFacts
from hvcproxyd.handlers.tee_proxy import TeeProxyHandler
from hvcproxyd.handlers.tee_proxy.options import TeeOptions
from hvcproxyd.handlers.tee_proxy.reftee import RefTee
from hvcproxyd.handlers.tee_proxy.shm import Limits
from hvcproxyd.wire import N_ARGS, Call, RamRegion

from .tee_guest import GuestRam, GuestTee

RAM = 0x4000_0000
RAM_SIZE = 8 << 20


def memory_over(ram: bytearray, base: int = RAM) -> GuestMemory:
    def inside(gpa: int, n: int) -> None:
        assert base <= gpa and gpa + n <= base + len(ram), f"access {gpa:#x}+{n:#x} outside guest RAM"

    async def read(gpa: int, n: int) -> bytes:
        inside(gpa, n)
        await trio.lowlevel.checkpoint()  # as a MEM_READ through the VMM lets other vCPUs run
        return bytes(ram[gpa - base:gpa - base + n])

    async def write(gpa: int, data: bytes) -> None:
        inside(gpa, len(data))
        await trio.lowlevel.checkpoint()
        ram[gpa - base:gpa - base + len(data)] = data

    return GuestMemory([RamRegion(base, len(ram))], 40, remote_read=read, remote_write=write)


def options(sock: Path, **kw: Any) -> TeeOptions:
    limits = {k: kw.pop(k) for k in ("shared_pages", "pages_per_buffer", "buffers", "max_calls") if k in kw}
    # The production 300 ms for reaching the backend is tight for a unit run on a loaded
    # 2-core machine (the reference TEE shares this process's loop); tests that are
    # about a dead or hung backend fail fast on their own (ENOENT, slice_ms, call_timeout_ms).
    kw.setdefault("backend_timeout_ms", 5_000)
    return TeeOptions(client_id=kw.pop("client_id", 5), socket=str(sock), limits=Limits(**limits), **kw)


@dataclass
class Rig:
    handler: TeeProxyHandler
    ref: RefTee
    ram: bytearray
    guest: GuestTee
    sock: Path
    seq: int = 0

    async def smc(self, fid: int, *args: int) -> tuple[int, ...]:
        self.seq += 1
        full = tuple(args) + (0,) * (N_ARGS - len(args))
        return (await self.handler.handle(Call(self.seq, 0, fid, full))).regs


def make_handler(opts: TeeOptions, ram: bytearray) -> TeeProxyHandler:
    facts = VmFacts("t", {})
    facts.memory = memory_over(ram)
    facts.attached = True
    handler = TeeProxyHandler("tee", opts, VmContext(facts, logging.getLogger("test.tee")))
    handler.attach(reconnect=False)
    return handler


@asynccontextmanager
async def rig(tmp_path: Path, serve_tee: bool = True, **kw: Any) -> AsyncIterator[Rig]:
    sock = tmp_path / "tee.sock"
    ref = RefTee(threads=kw.pop("threads", 4))
    ram = bytearray(RAM_SIZE)
    async with trio.open_nursery() as nursery:
        if serve_tee:
            await nursery.start(ref.serve, str(sock))
        handler = make_handler(options(sock, **kw), ram)
        r = Rig(handler, ref, ram, GuestTee(GuestRam(ram, RAM), lambda *a: r.smc(*a)), sock)
        yield r
        await handler.backend.close()
        nursery.cancel_scope.cancel()
