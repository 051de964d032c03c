"""Bounds checks on every guest address, through both access paths."""

from __future__ import annotations

import fcntl
import os

import pytest

from hvcproxyd.core.guestmem import GuestMemory, GuestMemoryError
from hvcproxyd.wire import RamRegion

REGIONS = (RamRegion(0x4000_0000, 0x10000, 0, 0), RamRegion(0x4001_0000, 0x10000, 0x10000, 0),
           RamRegion(0x8000_0000, 0x1000))


def memfd(size: int, *, sealed: bool = True) -> int:
    """Guest RAM as QEMU's memory-backend-memfd makes it: sealed against resizing."""
    fd = os.memfd_create("ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.mark.parametrize("gpa, length", [
    (0x3FFF_FFFF, 2), (0x4002_0000, 1), (0x4001_FFFF, 2), (0x8000_1000, 1), (0, 1),
    (0x4000_0000, 0), (0x4000_0000, -1), ((1 << 40) - 1, 2), (-1, 1),
])
def test_outside_ram_is_refused(gpa: int, length: int) -> None:
    mem = GuestMemory(REGIONS, 40)
    assert not mem.contains(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.check(gpa, length)


async def test_mapped_access_spans_adjacent_regions() -> None:
    fd = memfd(0x20000)
    mem = GuestMemory.from_fds(REGIONS, 40, [fd])
    os.close(fd)
    await mem.write(0x4000_FFFE, b"abcd")
    assert await mem.read(0x4000_FFFE, 4) == b"abcd"
    assert mem.contains(0x4000_0000, 0x20000)
    with pytest.raises(GuestMemoryError, match="no VMM connected"):
        await mem.read(0x8000_0000, 4)  # the region without an fd needs the VMM
    mem.close()


async def test_an_fd_that_could_shrink_is_not_mapped() -> None:
    """A mapping the VMM can truncate under us would SIGBUS the daemon: such a region
    goes through the VMM, and says so."""
    fd = memfd(0x20000, sealed=False)
    mem = GuestMemory.from_fds(REGIONS, 40, [fd])
    os.ftruncate(fd, 0)  # what a hostile VMM could do: harmless, nothing is mapped
    os.close(fd)
    assert not mem.mapped and mem.unsealed == (0x4000_0000, 0x4001_0000)
    with pytest.raises(GuestMemoryError, match="no VMM connected"):
        await mem.read(0x4000_0000, 4)
    mem.close()


def test_region_beyond_its_fd_is_refused() -> None:
    fd = memfd(0x1000)
    with pytest.raises(GuestMemoryError, match="beyond its fd"):
        GuestMemory.from_fds(REGIONS, 40, [fd])
    os.close(fd)


async def test_remote_access_is_chunked() -> None:
    calls: list[tuple[int, int]] = []
    store = bytearray(0x30000)

    async def read(gpa: int, n: int) -> bytes:
        calls.append((gpa, n))
        return bytes(store[gpa - 0x4000_0000:gpa - 0x4000_0000 + n])

    async def write(gpa: int, data: bytes) -> None:
        store[gpa - 0x4000_0000:gpa - 0x4000_0000 + len(data)] = data

    mem = GuestMemory(REGIONS[:2], 40, remote_read=read, remote_write=write)
    await mem.write(0x4000_0010, b"\x5a" * 0x18000)
    assert await mem.read(0x4000_0010, 0x18000) == b"\x5a" * 0x18000
    assert all(n <= 0x10000 for _, n in calls) and len(calls) >= 2
