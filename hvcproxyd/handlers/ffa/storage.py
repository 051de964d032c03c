"""``storage``: a secure-storage partition keeping data per VM in the daemon's
state directory (``<state_dir>/<vm>/ffa-storage/<partition>/``).

Reachable by direct requests; bulk data travels through a memory
transaction the guest shares or lends with it, which the partition retrieves
for the one request and relinquishes before it answers, so the guest can
reclaim as soon as the call returns.  Requests (w3 = operation):

=========  ======================================================  ===================
op         arguments                                               response w3, w4
=========  ======================================================  ===================
1 STORE    w4 key, w5/w6 handle (low/high), w7 length              status, length stored
2 LOAD     w4 key, w5/w6 handle, w7 capacity (RW access needed)    status, length of the value
3 DELETE   w4 key                                                  status, 0
4 SIZE     w4 key                                                  status, length
=========  ======================================================  ===================

Status is 0 or an FF-A error code as a u32 (NO_DATA: no such key; NO_MEMORY:
over ``max_value`` / ``max_keys`` or a LOAD buffer too small).  Files are
written whole (temporary file, fsync, rename) in a worker thread, so the
daemon's event loop never blocks on the disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import trio

from ...config.diagnostics import Section
from ...smccc import MASK32
from .defs import DATA_RO, DATA_RW, PROP_DIRECT_RECV, Err, FfaError
from .partition import Partition, PartitionContext

OP_STORE, OP_LOAD, OP_DELETE, OP_SIZE = 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class StorageOptions:
    max_value: int = 1 << 20
    max_keys: int = 256


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_file(path: Path, limit: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _count(directory: Path) -> int:
    try:
        return sum(1 for p in directory.iterdir() if p.suffix != ".tmp")
    except FileNotFoundError:
        return 0


def _delete(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


class StoragePartition(Partition):
    PROPERTIES: ClassVar[int] = PROP_DIRECT_RECV
    ACCESS: ClassVar[frozenset[int]] = frozenset({DATA_RO, DATA_RW})

    def __init__(self, ctx: PartitionContext, options: StorageOptions) -> None:
        super().__init__(ctx, options)
        self.opts = options

    @classmethod
    def parse_options(cls, section: Section) -> StorageOptions:
        section.allow_keys(("max_value", "max_keys"))
        d = StorageOptions()
        return StorageOptions(section.integer("max_value", default=d.max_value, lo=1, hi=1 << 30),
                              section.integer("max_keys", default=d.max_keys, lo=1, hi=1 << 20))

    @property
    def directory(self) -> Path:
        return self.ctx.state_dir / "ffa-storage" / self.ctx.spec.name

    async def direct_request(self, sender: int, args: Sequence[int], *, wide: bool) -> Sequence[int] | Err:
        op, key = args[0] & MASK32, args[1] & MASK32
        path = self.directory / f"{key:08x}"
        try:
            if op == OP_STORE:
                length = await self._store(path, (args[3] & MASK32) << 32 | (args[2] & MASK32), args[4] & MASK32)
            elif op == OP_LOAD:
                length = await self._load(path, (args[3] & MASK32) << 32 | (args[2] & MASK32), args[4] & MASK32)
            elif op == OP_DELETE:
                if not await trio.to_thread.run_sync(_delete, path):
                    raise FfaError(Err.NO_DATA, f"no key {key:#x}")
                length = 0
            elif op == OP_SIZE:
                size = await trio.to_thread.run_sync(_size, path)
                if size is None:
                    raise FfaError(Err.NO_DATA, f"no key {key:#x}")
                length = size
            else:
                return Err.INVALID_PARAMETERS
        except FfaError as err:
            return [int(err.code) & MASK32, 0, 0, 0, 0]
        except OSError as err:
            self.ctx.log.error("storage %s: %s", path, err)
            return [int(Err.ABORTED) & MASK32, 0, 0, 0, 0]
        return [0, length, 0, 0, 0]

    async def _store(self, path: Path, handle: int, length: int) -> int:
        if length > self.opts.max_value:
            raise FfaError(Err.NO_MEMORY, f"{length} bytes, at most {self.opts.max_value}")
        if await trio.to_thread.run_sync(_size, path) is None and \
                await trio.to_thread.run_sync(_count, self.directory) >= self.opts.max_keys:
            raise FfaError(Err.NO_MEMORY, f"{self.opts.max_keys} keys stored already")
        mem = self.ctx.retrieve(handle)
        try:
            data = await mem.read(0, length) if length else b""
        finally:
            self.ctx.relinquish(handle)
        await trio.to_thread.run_sync(_write_file, path, data)
        return length

    async def _load(self, path: Path, handle: int, capacity: int) -> int:
        data = await trio.to_thread.run_sync(_read_file, path, self.opts.max_value)
        if data is None:
            raise FfaError(Err.NO_DATA, "no such key")
        if len(data) > capacity:
            raise FfaError(Err.NO_MEMORY, f"the value has {len(data)} bytes, the buffer {capacity}")
        mem = self.ctx.retrieve(handle)
        try:
            if data:
                await mem.write(0, data)
        finally:
            self.ctx.relinquish(handle)
        return len(data)
