"""Guest physical memory, bounds-checked against the VM's RAM map and IPA size.

Every address and length a handler takes from a guest goes through
:meth:`GuestMemory.check` before any byte moves, whichever way the bytes move:
mapped memfds (the fast way) or MEM_READ/MEM_WRITE frames (the portable way).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Sequence

from ..errors import HvcproxydError
from ..wire import MAX_MEM_CHUNK, RamRegion


class GuestMemoryError(HvcproxydError):
    """An access outside guest RAM, or the VMM could not complete it."""


RemoteRead = Callable[[int, int], Awaitable[bytes]]
RemoteWrite = Callable[[int, bytes], Awaitable[None]]


def cannot_shrink(fd: int) -> bool:
    """Is ``fd`` a memfd sealed against shrinking (F_SEAL_SHRINK), as QEMU's memfd
    backend seals guest RAM by default?  Anything else (no seals, not a memfd) could
    be truncated by the VMM while we have it mapped."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return bool(seals & fcntl.F_SEAL_SHRINK)


class GuestMemory:
    """One VM's RAM.  Regions with a mapping are accessed directly; the rest go
    through the VMM in chunks of at most 64 KiB."""

    def __init__(self, regions: Sequence[RamRegion], ipa_bits: int, *,
                 maps: dict[int, mmap.mmap] | None = None,
                 remote_read: RemoteRead | None = None, remote_write: RemoteWrite | None = None) -> None:
        self.regions = tuple(sorted(regions, key=lambda r: r.gpa))
        self.limit = 1 << ipa_bits
        self._starts = [r.gpa for r in self.regions]
        self._maps = maps or {}
        self._remote_read = remote_read
        self._remote_write = remote_write
        #: Regions (by guest address) whose fd was passed but not mapped: not sealed.
        self.unsealed: tuple[int, ...] = ()

    @classmethod
    def from_fds(cls, regions: Sequence[RamRegion], ipa_bits: int, fds: Sequence[int],
                 **remote: RemoteRead | RemoteWrite) -> GuestMemory:
        """Map every region that names an fd sealed against shrinking (MAP_SHARED, as
        vhost-user does).  A region whose fd could shrink under us is reached through
        the VMM instead (MEM_READ/MEM_WRITE): a shrunk mapping would kill the daemon
        with SIGBUS on the next access.  ``unsealed`` lists those regions' addresses."""
        maps: dict[int, mmap.mmap] = {}
        unsealed: list[int] = []
        for i, r in enumerate(regions):
            if r.fd_index < 0:
                continue
            if r.fd_index >= len(fds):
                raise GuestMemoryError(f"region {r.gpa:#x} names fd {r.fd_index}, only {len(fds)} attached")
            if not cannot_shrink(fds[r.fd_index]):
                unsealed.append(r.gpa)
                continue
            size = os.fstat(fds[r.fd_index]).st_size
            if r.fd_offset + r.size > size:
                raise GuestMemoryError(f"region {r.gpa:#x}+{r.size:#x} is beyond its fd ({size:#x} bytes)")
            # mmap wants a page-aligned offset; map from the page below and slice.
            page_off = r.fd_offset % mmap.ALLOCATIONGRANULARITY
            m = mmap.mmap(fds[r.fd_index], r.size + page_off, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE, offset=r.fd_offset - page_off)
            maps[i] = m if not page_off else _Offset(m, page_off)  # type: ignore[assignment]
        memory = cls(regions, ipa_bits, maps=maps, **remote)  # type: ignore[arg-type]
        memory.unsealed = tuple(unsealed)
        return memory

    @property
    def mapped(self) -> bool:
        return bool(self._maps)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps = {}
        self._remote_read = self._remote_write = None

    def remap(self, regions: Sequence[RamRegion]) -> None:
        """The RAM map after memory hotplug (protocol MEMORY_MAP), in place, so every
        holder of this object sees it: a region that stays keeps its mapping, a new
        one is reached through the VMM (fds travel with HELLO only), one that went
        is unmapped."""
        new = tuple(sorted(regions, key=lambda r: r.gpa))
        old = {r: i for i, r in enumerate(self.regions)}
        maps: dict[int, mmap.mmap] = {}
        for j, r in enumerate(new):
            i = old.get(r)
            if i is not None and i in self._maps:
                maps[j] = self._maps.pop(i)
        for m in self._maps.values():
            m.close()
        self.regions, self._starts, self._maps = new, [r.gpa for r in new], maps

    # -- checks
    def _pieces(self, gpa: int, length: int) -> list[tuple[int, int, int]]:
        """(region index, offset in region, length) covering [gpa, gpa+length)."""
        if length <= 0:
            raise GuestMemoryError(f"empty or negative length {length}")
        if gpa < 0 or gpa + length > self.limit:
            raise GuestMemoryError(f"{gpa:#x}+{length:#x} is beyond the {self.limit.bit_length() - 1}-bit IPA space")
        pieces = []
        pos, end = gpa, gpa + length
        i = bisect_right(self._starts, pos) - 1
        while pos < end:
            if i < 0 or i >= len(self.regions) or not self.regions[i].gpa <= pos < self.regions[i].end:
                raise GuestMemoryError(f"{pos:#x} (in {gpa:#x}+{length:#x}) is not guest RAM")
            r = self.regions[i]
            n = min(end, r.end) - pos
            pieces.append((i, pos - r.gpa, n))
            pos += n
            i += 1
        return pieces

    def check(self, gpa: int, length: int) -> None:
        self._pieces(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._pieces(gpa, length)
        except GuestMemoryError:
            return False
        return True

    # -- access
    async def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        for i, off, n in self._pieces(gpa, length):
            m = self._maps.get(i)
            if m is not None:
                out += m[off:off + n]
                continue
            base = self.regions[i].gpa + off
            for chunk in range(0, n, MAX_MEM_CHUNK):
                out += await self._read_remote(base + chunk, min(MAX_MEM_CHUNK, n - chunk))
        return bytes(out)

    async def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for i, off, n in self._pieces(gpa, len(data)):
            m = self._maps.get(i)
            if m is not None:
                m[off:off + n] = data[pos:pos + n]
            else:
                base = self.regions[i].gpa + off
                for chunk in range(0, n, MAX_MEM_CHUNK):
                    await self._write_remote(base + chunk, data[pos + chunk:pos + min(n, chunk + MAX_MEM_CHUNK)])
            pos += n

    async def _read_remote(self, gpa: int, n: int) -> bytes:
        if self._remote_read is None:
            raise GuestMemoryError("no VMM connected to read guest memory through")
        data = await self._remote_read(gpa, n)
        if len(data) != n:
            raise GuestMemoryError(f"VMM returned {len(data)} bytes for a {n}-byte read at {gpa:#x}")
        return data

    async def _write_remote(self, gpa: int, data: bytes) -> None:
        if self._remote_write is None:
            raise GuestMemoryError("no VMM connected to write guest memory through")
        await self._remote_write(gpa, data)


class _Offset:
    """An mmap viewed from a non-page-aligned start."""

    def __init__(self, m: mmap.mmap, off: int) -> None:
        self._m, self._off = m, off

    def __getitem__(self, s: slice) -> bytes:
        return self._m[s.start + self._off:s.stop + self._off]

    def __setitem__(self, s: slice, data: bytes) -> None:
        self._m[s.start + self._off:s.stop + self._off] = data

    def close(self) -> None:
        self._m.close()
