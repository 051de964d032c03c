"""optee_msg_arg and page-list parsing: exact cases, and hypothesis over
hostile bytes (never an exception other than MsgError, never a guest access
outside RAM)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvcproxyd.core.guestmem import GuestMemory
from hvcproxyd.handlers.tee_proxy import abi
from hvcproxyd.handlers.tee_proxy.msgarg import MsgArg, MsgError, Param, pack, parse
from hvcproxyd.handlers.tee_proxy.shm import Account, Buffer, Limits, contiguous, walk_pagelist
from hvcproxyd.wire import RamRegion

BASE, PAGES = 0x4000_0000, 64
SIZE = PAGES * 4096


class CheckedRam:
    """Guest RAM whose every access is asserted to lie inside RAM."""

    def __init__(self, data: bytes = b"") -> None:
        self.ram = bytearray(SIZE)
        self.ram[:len(data)] = data[:SIZE]
        self.accesses = 0

        async def read(gpa: int, n: int) -> bytes:
            assert gpa >= BASE and gpa + n <= BASE + SIZE, f"read {gpa:#x}+{n:#x} outside RAM"
            self.accesses += 1
            return bytes(self.ram[gpa - BASE:gpa - BASE + n])

        self.memory = GuestMemory([RamRegion(BASE, SIZE)], 40, remote_read=read)

    def put_list(self, page: int, entries: list[int]) -> None:
        self.ram[page * 4096:(page + 1) * 4096] = struct.pack("<512Q", *(entries + [0] * (512 - len(entries))))


def test_pack_parse_round_trip() -> None:
    arg = MsgArg(abi.CMD_INVOKE_COMMAND, 7, 3, 9, 0xFFFF0006, 4,
                 [Param(abi.ATTR_TYPE_VALUE_INOUT, 1, 2, 3),
                  Param(abi.ATTR_TYPE_TMEM_INPUT | abi.ATTR_NONCONTIG, 5, 6)])
    data = pack(arg)
    assert len(data) == abi.arg_size(2)
    assert parse(data, 2) == arg


def test_parse_refusals() -> None:
    with pytest.raises(MsgError) as err:
        parse(b"\0" * 16, 4)
    assert err.value.code == abi.RETURN_EBADCMD
    data = bytearray(pack(MsgArg(0, params=[Param(1)] * 3)))
    with pytest.raises(MsgError):
        parse(bytes(data), 2)  # num_params 3 over the limit 2
    with pytest.raises(MsgError):
        parse(bytes(data[:-1]), 3)  # short
    struct.pack_into("<Q", data, 32, 1 << 40)  # an unknown attribute bit
    with pytest.raises(MsgError):
        parse(bytes(data), 3)


@given(st.binary(max_size=600), st.integers(0, 200))
def test_parse_never_crashes(data: bytes, limit: int) -> None:
    try:
        arg = parse(data, limit)
    except MsgError as err:
        assert err.code == abi.RETURN_EBADCMD
        return
    assert len(arg.params) <= limit
    size = abi.arg_size(len(arg.params))
    assert pack(arg) == data[:16] + b"\0" * 4 + data[20:size]  # the same bytes, pad cleared


async def test_walk_pagelist_good() -> None:
    r = CheckedRam()
    r.put_list(1, [BASE + 10 * 4096, BASE + 5 * 4096])
    buf = await walk_pagelist(r.memory, BASE + 4096 + 100, 5000, Limits(), None)
    assert buf == Buffer((BASE + 10 * 4096, BASE + 5 * 4096), 100, 5000)
    assert buf.pieces(3990, 10) == [(BASE + 10 * 4096 + 4090, 6), (BASE + 5 * 4096, 4)]


async def test_walk_pagelist_two_list_pages_and_cycle() -> None:
    r = CheckedRam()
    data = [BASE + (20 + i % 40) * 4096 for i in range(511)]
    r.put_list(1, [*data, BASE + 2 * 4096])
    r.put_list(2, [BASE + 30 * 4096])
    buf = await walk_pagelist(r.memory, BASE + 4096, 512 * 4096, Limits(pages_per_buffer=600), None)
    assert len(buf.pages) == 512 and buf.pages[-1] == BASE + 30 * 4096
    r.put_list(2, [*data, BASE + 4096])  # links back to the first list page
    with pytest.raises(MsgError) as err:
        await walk_pagelist(r.memory, BASE + 4096, 1100 * 4096, Limits(pages_per_buffer=2000), None)
    assert err.value.code == abi.RETURN_EBADADDR


@pytest.mark.parametrize("entry,arg_page", [
    (BASE + SIZE, None),            # data page outside RAM
    (BASE + 10 * 4096 + 8, None),   # not page-aligned
    (BASE + 10 * 4096, BASE + 10 * 4096),  # the argument's page
    (BASE + 4096, None),            # the list page itself
])
async def test_walk_pagelist_refusals(entry: int, arg_page: int | None) -> None:
    r = CheckedRam()
    r.put_list(1, [entry])
    with pytest.raises(MsgError) as err:
        await walk_pagelist(r.memory, BASE + 4096, 16, Limits(), arg_page)
    assert err.value.code == abi.RETURN_EBADADDR


async def test_walk_pagelist_limits_and_list_outside() -> None:
    r = CheckedRam()
    with pytest.raises(MsgError) as err:
        await walk_pagelist(r.memory, BASE + 4096, 130 * 4096, Limits(), None)
    assert err.value.code == abi.RETURN_ENOMEM and r.accesses == 0  # refused before reading anything
    with pytest.raises(MsgError) as err:
        await walk_pagelist(r.memory, BASE + SIZE, 16, Limits(), None)
    assert err.value.code == abi.RETURN_EBADADDR


def test_contiguous() -> None:
    r = CheckedRam()
    assert contiguous(r.memory, BASE + 4096 + 8, 4096, Limits(), None).pages == (BASE + 4096, BASE + 8192)
    for gpa, size in ((BASE + SIZE - 4096, 8192), (BASE - 4096, 16), ((1 << 40) - 8, 16)):
        with pytest.raises(MsgError):
            contiguous(r.memory, gpa, size, Limits(), None)
    with pytest.raises(MsgError):
        contiguous(r.memory, BASE, 4096, Limits(), BASE)


def test_account() -> None:
    acc = Account(Limits(shared_pages=10, buffers=1))
    acc.take(4, True)
    with pytest.raises(MsgError) as err:
        acc.take(1, True)
    assert err.value.code == abi.RETURN_ENOMEM
    with pytest.raises(MsgError):
        acc.take(7, False)
    assert (acc.pages, acc.buffers) == (4, 1)
    acc.give(4, True)
    assert (acc.pages, acc.buffers) == (0, 0)


@given(st.binary(min_size=0, max_size=3 * 4096), st.integers(0, (1 << 64) - 1), st.integers(0, 1 << 24),
       st.lists(st.integers(0, (1 << 64) - 1), max_size=8), st.integers(1, 200))
async def test_walk_pagelist_never_crashes_or_leaves_ram(junk: bytes, buf_ptr: int, size: int, entries: list[int],
                                                         per_buffer: int) -> None:
    r = CheckedRam(junk)
    # Some entries point at real pages so walks get past the first check.
    r.put_list(3, [BASE + (e % (PAGES + 4)) * 4096 if e & 1 else e for e in entries])
    for ptr in (buf_ptr, BASE + 3 * 4096 + (buf_ptr & 0xFFF)):
        try:
            buf = await walk_pagelist(r.memory, ptr, size, Limits(pages_per_buffer=per_buffer), BASE)
        except MsgError as err:
            assert err.code in (abi.RETURN_EBADADDR, abi.RETURN_ENOMEM)
            continue
        assert len(buf.pages) <= per_buffer
        for page in buf.pages:
            assert BASE < page < BASE + SIZE and page % 4096 == 0
        if buf.size:
            await buf.read(r.memory, 0, buf.size)  # every byte of it is readable guest RAM
