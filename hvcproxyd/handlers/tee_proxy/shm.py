"""Guest shared memory as the mediator holds it: buffers resolved to validated
guest pages, OP-TEE's non-contiguous page lists, and the per-VM accounting that
enforces Xen's limits.

A buffer the guest names (a temporary memref, a REGISTER_SHM, the answer to an
RPC SHM_ALLOC) becomes a :class:`Buffer`: the guest-physical pages it covers,
each checked against guest RAM, never overlapping the page that holds the
call's argument, and counted against the VM's limits *before* any of its bytes
are touched.  Byte access then goes through :class:`GuestMemory` again, which
checks every piece a second time.

The non-contiguous format (optee_msg.h, OPTEE_MSG_ATTR_NONCONTIG): ``buf_ptr``
is the guest-physical address of the first page of a list, with the buffer's
offset inside its first data page in the low 12 bits; each list page holds
511 data-page addresses and, in its last u64, the address of the next list
page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...core.guestmem import GuestMemory, GuestMemoryError
from . import abi
from .msgarg import MsgError

PAGE = abi.PAGE_SIZE
PAGE_MASK = PAGE - 1
_LIST = struct.Struct(f"<{PAGE // 8}Q")


@dataclass(frozen=True, slots=True)
class Limits:
    """Per VM; Xen's optee.c values are the defaults (MAX_TOTAL_SMH_BUF_PG,
    MAX_SHM_BUFFER_PG, MAX_SHM_BUFFER_COUNT).  ``max_calls`` None means the
    backend's thread count."""

    shared_pages: int = 16384
    pages_per_buffer: int = 129
    buffers: int = 16
    max_calls: int | None = None


@dataclass(frozen=True, slots=True)
class Buffer:
    """A guest buffer: ``size`` bytes starting ``offset`` bytes into ``pages[0]``."""

    pages: tuple[int, ...]
    offset: int
    size: int

    def pieces(self, start: int, length: int) -> list[tuple[int, int]]:
        """(gpa, length) pieces covering bytes [start, start+length) of the buffer."""
        if start < 0 or length < 0 or start + length > self.size:
            raise MsgError(abi.RETURN_EBADADDR, f"bytes {start}+{length} are outside a {self.size}-byte buffer")
        out: list[tuple[int, int]] = []
        pos, end = self.offset + start, self.offset + start + length
        while pos < end:
            page, off = divmod(pos, PAGE)
            n = min(end - pos, PAGE - off)
            out.append((self.pages[page] + off, n))
            pos += n
        return out

    async def read(self, memory: GuestMemory, start: int, length: int) -> bytes:
        out = bytearray()
        for gpa, n in self.pieces(start, length):
            out += await memory.read(gpa, n)
        return bytes(out)

    async def write(self, memory: GuestMemory, start: int, data: bytes) -> None:
        pos = 0
        for gpa, n in self.pieces(start, len(data)):
            await memory.write(gpa, data[pos:pos + n])
            pos += n


def pages_for(offset: int, size: int) -> int:
    return (offset + size + PAGE_MASK) // PAGE


def _check_page(memory: GuestMemory, gpa: int, arg_page: int | None, what: str) -> None:
    if gpa & PAGE_MASK:
        raise MsgError(abi.RETURN_EBADADDR, f"{what} {gpa:#x} is not page-aligned")
    if arg_page is not None and gpa == arg_page:
        raise MsgError(abi.RETURN_EBADADDR, f"{what} {gpa:#x} is the page holding the call's argument")
    if not memory.contains(gpa, PAGE):
        raise MsgError(abi.RETURN_EBADADDR, f"{what} {gpa:#x} is not guest RAM")


async def walk_pagelist(memory: GuestMemory, buf_ptr: int, size: int, limits: Limits,
                        arg_page: int | None) -> Buffer:
    """Resolve a non-contiguous buffer.  Refuses (EBADADDR) a list or data page
    outside RAM, unaligned, or the argument page, and a list that links back to
    a list page already seen; ENOMEM past ``pages_per_buffer``.  Reads at most
    ceil(n/511) list pages, so a hostile list costs bounded work."""
    offset = buf_ptr & PAGE_MASK
    n = pages_for(offset, size)
    if n > limits.pages_per_buffer:
        raise MsgError(abi.RETURN_ENOMEM, f"{n} pages is over the {limits.pages_per_buffer}-page buffer limit")
    pages: list[int] = []
    seen: set[int] = set()
    list_gpa = buf_ptr & ~PAGE_MASK
    while len(pages) < n:
        if list_gpa in seen:
            raise MsgError(abi.RETURN_EBADADDR, f"page list links back to {list_gpa:#x}")
        seen.add(list_gpa)
        _check_page(memory, list_gpa, arg_page, "page-list page")
        try:
            entries = _LIST.unpack(await memory.read(list_gpa, PAGE))
        except GuestMemoryError as err:
            raise MsgError(abi.RETURN_EBADADDR, f"page list at {list_gpa:#x}: {err}") from err
        for gpa in entries[:min(abi.PAGELIST_ENTRIES, n - len(pages))]:
            _check_page(memory, gpa, arg_page, "data page")
            if gpa in seen:
                raise MsgError(abi.RETURN_EBADADDR, f"data page {gpa:#x} is also a page of its own list")
            pages.append(gpa)
        list_gpa = entries[abi.PAGELIST_ENTRIES]
    return Buffer(tuple(pages), offset, size)


def contiguous(memory: GuestMemory, gpa: int, size: int, limits: Limits, arg_page: int | None) -> Buffer:
    """A physically contiguous buffer (Linux's answer to an RPC SHM_ALLOC of
    kernel memory): the same checks as a page list, page by page."""
    offset = gpa & PAGE_MASK
    n = pages_for(offset, size)
    if n > limits.pages_per_buffer:
        raise MsgError(abi.RETURN_ENOMEM, f"{n} pages is over the {limits.pages_per_buffer}-page buffer limit")
    base = gpa & ~PAGE_MASK
    if base + n * PAGE > memory.limit:
        raise MsgError(abi.RETURN_EBADADDR, f"{gpa:#x}+{size:#x} is beyond the IPA space")
    pages = tuple(base + i * PAGE for i in range(n))
    for page in pages:
        _check_page(memory, page, arg_page, "buffer page")
    return Buffer(pages, offset, size)


class Account:
    """What a VM holds against its limits: shared pages (registered, RPC-allocated
    and in-flight temporary buffers alike) and registered buffers."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.pages = 0
        self.buffers = 0
        #: Memref bytes the daemon holds for calls in flight (copies, registered buffers' included),
        #: bounded like the pages so a guest cannot make the daemon hold more than it may share.
        self.inflight = 0

    def take(self, pages: int, buffer: bool) -> None:
        """Charge a buffer, or raise ENOMEM and charge nothing."""
        if self.pages + pages > self.limits.shared_pages:
            raise MsgError(abi.RETURN_ENOMEM, f"{pages} more pages would pass the VM's "
                                              f"{self.limits.shared_pages}-page limit")
        if buffer and self.buffers + 1 > self.limits.buffers:
            raise MsgError(abi.RETURN_ENOMEM, f"the VM already holds {self.limits.buffers} buffers")
        self.pages += pages
        self.buffers += int(buffer)

    def give(self, pages: int, buffer: bool) -> None:
        self.pages = max(0, self.pages - pages)
        self.buffers = max(0, self.buffers - int(buffer))

    def hold(self, nbytes: int) -> None:
        """Charge bytes copied for a call, or raise ENOMEM and charge nothing."""
        if self.inflight + nbytes > self.limits.shared_pages * PAGE:
            raise MsgError(abi.RETURN_ENOMEM, f"calls in flight would hold more than {self.limits.shared_pages} "
                                              "pages of memref data")
        self.inflight += nbytes

    def release(self, nbytes: int) -> None:
        self.inflight = max(0, self.inflight - nbytes)


__all__ = ["Account", "Buffer", "Limits", "contiguous", "pages_for", "walk_pagelist"]
