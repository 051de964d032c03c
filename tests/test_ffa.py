"""The ffa handler without sockets: every call, its error paths, and the
decisions Linux's arm_ffa driver makes on our answers."""

from __future__ import annotations

import dataclasses
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from hvcproxyd.config import ConfigError
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.ffa.defs import FEAT_NPI, Err, FfaError
from hvcproxyd.handlers.ffa.echo import CMD_NOTIFY, CMD_RELINQUISH, CMD_RETRIEVE, EchoPartition
from hvcproxyd.wire import CALL_AARCH32, FEATURE_INTERRUPT, Accel, EventKind, Hello, RamRegion, VcpuInfo, VmEvent

from .ffa_support import (
    BIND,
    BITMAP_CREATE,
    BITMAP_DESTROY,
    BUSY,
    DENIED,
    DIRECT_REQ2,
    DIRECT_REQ32,
    DIRECT_REQ64,
    DIRECT_RESP2,
    DIRECT_RESP32,
    DIRECT_RESP64,
    ECHO,
    ECHO_UUID,
    FEATURES,
    ID_GET,
    INFO_GET,
    INFO_GET64,
    INVALID,
    MEM_DONATE,
    MEM_FRAG_RX,
    MEM_FRAG_TX,
    MEM_LEND,
    MEM_RECLAIM,
    MEM_RETRIEVE_REQ,
    MEM_SHARE,
    MEM_SHARE64,
    MSG_SEND2,
    NO_DATA,
    NO_MEMORY,
    NOT_SUPPORTED,
    NOTIF_GET,
    NOTIF_SET,
    PAGE,
    PART_INFO,
    PART_INFO_REGS,
    RAM,
    RAM_SIZE,
    RX,
    RX_RELEASE,
    RXTX_MAP,
    RXTX_UNMAP,
    SPM_ID_GET,
    STORE,
    STORE_UUID,
    SUCCESS32,
    SUCCESS64,
    TX,
    U64,
    UNBIND,
    VERSION,
    VM_ID,
    Desc,
    Guest,
    err,
    fid32,
    handle_of,
    handler_yaml,
    make_guest,
    share,
)


@pytest.fixture
def g(make_config: Callable[[str], VmConfig], tmp_path: Path) -> Guest:
    return make_guest(make_config, tmp_path)


def words(u: object) -> tuple[int, ...]:
    """A UUID as PARTITION_INFO_GET's w1..w4 (export_uuid then u32 loads, little-endian)."""
    raw = u.bytes  # type: ignore[attr-defined]
    return tuple(int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4))


# ----------------------------------------------------------------- version and discovery

async def test_version_negotiation(g: Guest) -> None:
    assert (await g.call(ID_GET))[:3] == err(INVALID)  # before FFA_VERSION, as pKVM answers
    assert (await g.call(VERSION, 0x20000))[0] == U64  # major 2: NOT_SUPPORTED in w0
    assert (await g.call(VERSION, 0x8001_0001))[0] == U64  # bit 31 must be zero
    assert (await g.call(VERSION, 0x10001))[0] == 0x10002  # our version; the caller keeps 1.1
    assert g.handler.endpoint.version == 0x10001
    assert (await g.call(VERSION, 0x10000))[0] == U64  # no going back to the 1.0 layouts
    assert (await g.call(VERSION, 0x10002))[0] == 0x10002
    assert g.handler.endpoint.version == 0x10001
    assert (await g.call(ID_GET))[:3] == (SUCCESS32, 0, VM_ID)
    assert (await g.call(SPM_ID_GET))[:3] == (SUCCESS32, 0, 0x8000)
    # 1.2-only calls do not exist for a 1.1 caller.
    assert (await g.call(PART_INFO_REGS))[:3] == err(NOT_SUPPORTED)
    assert (await g.call(FEATURES, DIRECT_REQ2))[:3] == err(NOT_SUPPORTED)


async def test_configured_version_is_the_ceiling(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    g = make_guest(make_config, tmp_path, 'version: "1.1"')
    assert (await g.call(VERSION, 0x10002))[0] == 0x10001
    assert g.handler.endpoint.version == 0x10001


async def test_features(g: Guest) -> None:
    await g.call(VERSION, 0x10002)
    assert (await g.call(FEATURES, RXTX_MAP))[:3] == (SUCCESS32, 0, 1 << 16)  # 4 KiB minimum, 1 page maximum
    for fid in (VERSION, ID_GET, PART_INFO, DIRECT_REQ32, DIRECT_REQ64, DIRECT_REQ2, MEM_SHARE, MEM_SHARE64,
                MEM_LEND, MEM_RECLAIM, MSG_SEND2, BITMAP_CREATE, INFO_GET64, PART_INFO_REGS):
        assert (await g.call(FEATURES, fid))[0] == SUCCESS32, hex(fid)
    # Not implemented, not offered (DONATE unless configured), a 64-bit form that does not exist,
    # the notification interrupts (no VMM is attached here: test_the_npi_follows_the_vmm), the guest-side retrieve.
    for fid in (MEM_DONATE, DIRECT_RESP32, fid32(0x6D), MEM_RETRIEVE_REQ, 0xC400_0063, 2, 1, 0x8400_00FF):
        assert (await g.call(FEATURES, fid))[:3] == err(NOT_SUPPORTED), hex(fid)
    assert (await g.call(FEATURES, MEM_SHARE, 1))[:3] == err(INVALID)


async def test_unknown_and_wrong_width_calls(g: Guest) -> None:
    await g.ready()
    assert (await g.call(fid32(0x6D)))[:3] == err(NOT_SUPPORTED)  # FFA_RUN
    assert (await g.call(0xC400_0063))[:3] == err(NOT_SUPPORTED)  # no 64-bit FFA_VERSION
    assert (await g.call(DIRECT_REQ64, VM_ID << 16 | ECHO, flags=CALL_AARCH32))[:3] == err(NOT_SUPPORTED)
    assert (await g.call(MEM_RETRIEVE_REQ))[:3] == err(NOT_SUPPORTED)
    assert (await g.call(fid32(0x8D)))[:3] == err(NOT_SUPPORTED)  # REQ2 exists only as SMC64
    # RX_ACQUIRE is the hypervisor's call for a VM's buffer (DEN0077 1.2 §13.4), never a VM's.
    assert (await g.call(fid32(0x84), VM_ID))[:3] == err(NOT_SUPPORTED)
    # Results carry x0..x7, so a caller never reads back its own stale x4..x7.
    assert len(await g.call(ID_GET)) == 8


# ----------------------------------------------------------------- RX/TX

async def test_rxtx_map_checks(g: Guest) -> None:
    await g.call(VERSION, 0x10002)
    assert (await g.call(RXTX_MAP, TX + 8, RX, 1))[:3] == err(INVALID)  # unaligned
    assert (await g.call(RXTX_MAP, TX, RAM + RAM_SIZE, 1))[:3] == err(INVALID)  # outside RAM
    assert (await g.call(RXTX_MAP, TX, TX, 1))[:3] == err(INVALID)  # overlapping
    assert (await g.call(RXTX_MAP, TX, RX, 0))[:3] == err(INVALID)
    assert (await g.call(RXTX_MAP, TX, RX, 2))[:3] == err(INVALID)  # over the 1-page limit
    assert (await g.call(RXTX_UNMAP))[:3] == err(INVALID)  # nothing mapped
    assert (await g.call(RX_RELEASE))[:3] == err(DENIED)
    # The 32-bit form uses only w1..w3.
    assert (await g.call(fid32(0x66), 1 << 32 | TX, 1 << 32 | RX, 1))[0] == SUCCESS32
    assert (await g.call(RXTX_MAP, TX + 2 * PAGE, RX + 2 * PAGE, 1))[:3] == err(DENIED)  # a second map
    assert (await g.call(RXTX_UNMAP, 1))[:3] == err(INVALID)
    assert (await g.call(RXTX_UNMAP))[0] == SUCCESS32
    assert (await g.call(RXTX_MAP, TX, RX, 1))[0] == SUCCESS32


async def test_rx_ownership(g: Guest) -> None:
    await g.ready()
    assert (await g.call(RX_RELEASE))[:3] == err(DENIED)  # the producer owns RX
    assert (await g.call(PART_INFO))[0] == SUCCESS32  # RX goes to the guest
    assert (await g.call(PART_INFO))[:3] == err(BUSY)  # ...which still holds it
    assert (await g.call(RX_RELEASE))[0] == SUCCESS32
    assert (await g.call(RX_RELEASE))[:3] == err(DENIED)
    assert (await g.call(PART_INFO))[0] == SUCCESS32


# ----------------------------------------------------------------- partition info

def records(data: bytes, count: int, size: int) -> list[tuple[object, ...]]:
    fmt = "<HHI16s" if size == 24 else "<HHI"
    return [struct.unpack_from(fmt, data, i * size) for i in range(count)]


async def test_partition_info_v1_1(g: Guest) -> None:
    await g.ready(0x10001)
    # Linux asks for the count first (flag bit 0), then for the records.
    assert (await g.call(PART_INFO, 0, 0, 0, 0, 1))[:4] == (SUCCESS32, 0, 2, 24)
    assert g.read(RX, 4) == bytes(4)  # count-only writes nothing
    regs = await g.call(PART_INFO)
    assert regs[:4] == (SUCCESS32, 0, 2, 24)
    got = records(g.read(RX, 48), 2, 24)
    # direct recv|REQ2 recv|indirect|notifications|AArch64, masked to 1.1's bits (no REQ2).
    assert got[0] == (ECHO, 1, 0x10D, ECHO_UUID.bytes)
    assert got[1] == (STORE, 1, 0x101, STORE_UUID.bytes)
    await g.call(RX_RELEASE)
    assert (await g.call(PART_INFO, *words(STORE_UUID)))[:3] == (SUCCESS32, 0, 1)
    assert records(g.read(RX, 24), 1, 24)[0][0] == STORE
    await g.call(RX_RELEASE)
    assert (await g.call(PART_INFO, 1, 2, 3, 4))[:3] == err(INVALID)  # no such UUID
    assert (await g.call(PART_INFO, 0, 0, 0, 0, 2))[:3] == err(INVALID)  # reserved flag


async def test_partition_info_v1_0_has_8_byte_records(g: Guest) -> None:
    await g.ready(0x10000)
    assert (await g.call(PART_INFO))[:4] == (SUCCESS32, 0, 2, 0)
    assert records(g.read(RX, 16), 2, 8) == [(ECHO, 1, 0x5), (STORE, 1, 0x1)]
    await g.call(RX_RELEASE)
    assert (await g.call(PART_INFO, 0, 0, 0, 0, 1))[:3] == err(INVALID)  # 1.0 has no count-only flag


async def test_partition_info_without_rx(g: Guest) -> None:
    await g.call(VERSION, 0x10001)
    assert (await g.call(PART_INFO, 0, 0, 0, 0, 1))[:3] == (SUCCESS32, 0, 2)  # the count needs no buffer
    assert (await g.call(PART_INFO))[:3] == err(BUSY)


async def test_partition_info_get_regs(g: Guest) -> None:
    await g.call(VERSION, 0x10002)
    regs = await g.call(PART_INFO_REGS, 0, 0, 0)
    assert regs[0] == SUCCESS64 and len(regs) == 18
    assert regs[2] == 1 | 1 << 16 | 24 << 48  # last index 1, current 1, 24-byte records
    assert regs[3] == ECHO | 1 << 16 | 0x30D << 32
    assert regs[4:6] == (int.from_bytes(ECHO_UUID.bytes[:8], "little"), int.from_bytes(ECHO_UUID.bytes[8:], "little"))
    assert regs[6] & 0xFFFF == STORE
    assert (await g.call(PART_INFO_REGS, 0, 0, 1))[2] & 0xFFFF_FFFF == 1 | 1 << 16
    assert (await g.call(PART_INFO_REGS, 0, 0, 2))[:3] == err(INVALID)  # past the last index
    assert (await g.call(PART_INFO_REGS, 0, 0, 1 << 16))[:3] == err(INVALID)  # a tag we never gave


# ----------------------------------------------------------------- direct messages

async def test_direct_requests_to_echo(g: Guest) -> None:
    await g.ready()
    regs = await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, 1 << 32 | 11, 12, 13, 14, 15)
    assert regs == (DIRECT_RESP32, ECHO << 16 | VM_ID, 0, 11, 12, 13, 14, 15)  # w-registers only
    regs = await g.call(DIRECT_REQ64, VM_ID << 16 | ECHO, 0, 1 << 40, 2, 3, 4, 5)
    assert regs == (DIRECT_RESP64, ECHO << 16 | VM_ID, 0, 1 << 40, 2, 3, 4, 5)
    lo, hi = int.from_bytes(ECHO_UUID.bytes[:8], "little"), int.from_bytes(ECHO_UUID.bytes[8:], "little")
    payload = tuple(range(100, 114))
    regs = await g.call(DIRECT_REQ2, VM_ID << 16 | ECHO, lo, hi, *payload)
    assert regs == (DIRECT_RESP2, ECHO << 16 | VM_ID, 0, 0, *payload)
    assert (await g.call(DIRECT_REQ2, VM_ID << 16 | ECHO, 0, 0, *payload))[0] == DIRECT_RESP2  # null UUID


async def test_direct_request_errors(g: Guest) -> None:
    await g.ready()
    assert (await g.call(DIRECT_REQ32, 7 << 16 | ECHO))[:3] == err(INVALID)  # sender is not the caller
    assert (await g.call(DIRECT_REQ32, VM_ID << 16 | 0x8009))[:3] == err(INVALID)  # no such partition
    assert (await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 1 << 31))[:3] == err(INVALID)  # framework message
    assert (await g.call(DIRECT_REQ2, VM_ID << 16 | STORE, 1, 2))[:3] == err(DENIED)  # storage takes no REQ2
    assert (await g.call(DIRECT_REQ2, VM_ID << 16 | ECHO, 1, 2))[:3] == err(INVALID)  # not echo's UUID
    assert (await g.call(DIRECT_RESP32))[:3] == err(NOT_SUPPORTED)  # the guest is never asked


async def test_partition_without_direct_receive(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    g = make_guest(make_config, tmp_path, partitions=f"""
          quiet: {{type: echo, id: {ECHO:#x}, uuids: ["{ECHO_UUID}"], properties: [indirect]}}""")
    await g.ready()
    assert (await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO))[:3] == err(DENIED)


# ----------------------------------------------------------------- indirect messages

def put_message(g: Guest, payload: bytes, receiver: int = ECHO, header: int = 20, sender: int = VM_ID,
                offset: int | None = None) -> None:
    off = header if offset is None else offset
    g.write(TX, struct.pack("<IIIII", 0, 0, off, sender << 16 | receiver, len(payload)).ljust(header, b"\0"))
    g.write(TX + off, payload)


def rx_message(g: Guest, header: int = 20) -> tuple[int, int, bytes]:
    flags, _, off, ids, size = struct.unpack("<IIIII", g.read(RX, 20))
    assert flags == 0 and off == header
    return ids >> 16, ids & 0xFFFF, g.read(RX + off, size)


async def test_indirect_message_round_trip(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    g = make_guest(make_config, tmp_path, "limits: {pending_messages: 1}")
    await g.ready(0x10001)
    await g.call(BITMAP_CREATE, VM_ID, 1)
    put_message(g, b"ping")
    assert (await g.call(MSG_SEND2))[0] == SUCCESS32
    assert rx_message(g) == (ECHO, VM_ID, b"ping")  # echo's own message, in our RX
    regs = await g.call(NOTIF_GET, VM_ID, 0xF)
    assert regs[:8] == (SUCCESS32, 0, 0, 0, 0, 0, 0, 1)  # w7: hypervisor framework, RX full
    # RX is the guest's now: the next answer waits in the queue, the one after is refused.
    put_message(g, b"two")
    assert (await g.call(MSG_SEND2))[0] == SUCCESS32
    put_message(g, b"three")
    assert (await g.call(MSG_SEND2))[:3] == err(BUSY)
    assert rx_message(g)[2] == b"ping"
    assert (await g.call(RX_RELEASE))[0] == SUCCESS32  # the queued message moves in at once
    assert rx_message(g)[2] == b"two"


async def test_indirect_message_errors(g: Guest) -> None:
    await g.call(VERSION, 0x10002)
    assert (await g.call(MSG_SEND2))[:3] == err(DENIED)  # no TX buffer
    assert (await g.call(fid32(0x66), TX, RX, 1))[0] == SUCCESS32
    put_message(g, b"x", header=40)  # 1.2 header is 40 bytes
    assert (await g.call(MSG_SEND2))[0] == SUCCESS32
    assert struct.unpack_from("<I", g.read(RX, 12), 8)[0] == 40
    await g.call(RX_RELEASE)
    put_message(g, b"x", header=40, offset=20)
    assert (await g.call(MSG_SEND2))[:3] == err(INVALID)  # payload inside the header
    put_message(g, b"x", header=40, sender=5)
    assert (await g.call(MSG_SEND2))[:3] == err(INVALID)
    put_message(g, b"x", header=40, receiver=STORE)
    assert (await g.call(MSG_SEND2))[:3] == err(DENIED)  # storage takes no indirect messages
    put_message(g, b"x", header=40, offset=PAGE - 1)
    g.write(TX + 16, struct.pack("<I", 2))
    assert (await g.call(MSG_SEND2))[:3] == err(INVALID)  # runs past TX
    assert (await g.call(MSG_SEND2, 1))[:3] == err(INVALID)
    assert (await g.call(MSG_SEND2, 0, 1))[:3] == err(INVALID)


# ----------------------------------------------------------------- notifications

async def test_notifications(g: Guest) -> None:
    await g.ready(0x10001)
    bit = 1 << 35
    assert (await g.call(BIND, ECHO << 16 | VM_ID, 0, 0, bit >> 32))[:3] == err(DENIED)  # no bitmap yet
    assert (await g.call(BITMAP_CREATE, 7, 1))[:3] == err(INVALID)  # not our ID
    assert (await g.call(BITMAP_CREATE, VM_ID, 2))[0] == SUCCESS32
    assert (await g.call(BITMAP_CREATE, VM_ID, 2))[:3] == err(DENIED)
    assert (await g.call(INFO_GET))[:3] == err(NO_DATA)
    assert (await g.call(BIND, ECHO << 16 | VM_ID, 1, 0, 8))[:3] == err(INVALID)  # per-vCPU: global only
    assert (await g.call(BIND, 0x8009 << 16 | VM_ID, 0, 0, 8))[:3] == err(INVALID)  # no such sender
    assert (await g.call(BIND, ECHO << 16 | VM_ID, 0, 0, bit >> 32))[0] == SUCCESS32
    assert (await g.call(BIND, STORE << 16 | VM_ID, 0, 0, bit >> 32))[:3] == err(DENIED)  # echo's bit
    # Echo raises it on command; an unbound bit is refused.
    regs = await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_NOTIFY, 1, 0, 0, 0)
    assert regs[7] == DENIED & 0xFFFF_FFFF
    regs = await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_NOTIFY, 0, bit >> 32, 0, 0)
    assert regs[7] == 0
    regs = await g.call(INFO_GET64)
    assert regs[:4] == (SUCCESS64, 0, 1 << 7, VM_ID)  # one list: our ID
    assert (await g.call(BITMAP_DESTROY, VM_ID))[:3] == err(DENIED)  # pending
    assert (await g.call(NOTIF_GET, 2 << 16 | VM_ID, 1))[:3] == err(INVALID)  # vCPU 2 of 1
    assert (await g.call(NOTIF_GET, VM_ID, 2))[2:6] == (0, 0, 0, 0)  # VM senders: none
    assert (await g.call(NOTIF_GET, VM_ID, 1))[2:4] == (0, bit >> 32)  # SP senders: echo
    assert (await g.call(NOTIF_GET, VM_ID, 1))[2:4] == (0, 0)  # GET clears
    assert (await g.call(UNBIND, STORE << 16 | VM_ID, 0, 0, bit >> 32))[:3] == err(DENIED)
    assert (await g.call(UNBIND, ECHO << 16 | VM_ID, 0, 0, bit >> 32))[0] == SUCCESS32
    # The guest notifies a partition.
    assert (await g.call(NOTIF_SET, VM_ID << 16 | ECHO, 0, 5))[0] == SUCCESS32
    echo = g.handler.endpoint.partitions[ECHO].plugin
    assert isinstance(echo, EchoPartition) and echo.notified_bits == 5
    assert (await g.call(NOTIF_SET, VM_ID << 16 | ECHO, 1, 5))[:3] == err(INVALID)  # per-vCPU
    assert (await g.call(NOTIF_SET, VM_ID << 16 | STORE, 0, 5))[:3] == err(NOT_SUPPORTED)  # storage declines
    assert (await g.call(NOTIF_SET, 9 << 16 | ECHO, 0, 5))[:3] == err(INVALID)
    assert (await g.call(BITMAP_DESTROY, VM_ID))[0] == SUCCESS32
    assert (await g.call(NOTIF_GET, VM_ID, 1))[:3] == err(DENIED)


# ----------------------------------------------------------------- memory sharing

async def test_share_retrieve_relinquish_reclaim(g: Guest) -> None:
    await g.ready(0x10001)
    regs = await share(g, Desc())
    handle = handle_of(regs)
    assert handle >> 63  # allocated by the hypervisor
    lo, hi = handle & 0xFFFF_FFFF, handle >> 32
    cmd = await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_RETRIEVE, lo, hi, 0, 0)
    assert cmd[7] == 0
    assert (await g.call(MEM_RECLAIM, lo, hi, 0))[:3] == err(DENIED)  # still borrowed
    cmd = await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_RELINQUISH, lo, hi, 0, 0)
    assert cmd[7] == 0
    cmd = await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_RELINQUISH, lo, hi, 0, 0)
    assert cmd[7] == DENIED & 0xFFFF_FFFF  # nothing left to relinquish
    assert (await g.call(MEM_RECLAIM, lo, hi, 1))[:3] == err(INVALID)  # shared memory is not zeroed
    assert (await g.call(MEM_RECLAIM, lo, hi, 4))[:3] == err(INVALID)  # reserved flag
    assert (await g.call(MEM_RECLAIM, lo, hi, 0))[0] == SUCCESS32
    assert (await g.call(MEM_RECLAIM, lo, hi, 0))[:3] == err(INVALID)  # gone
    # The pages are free again.
    assert handle_of(await share(g, Desc())) != handle  # never the same handle twice


async def test_share_refusals(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    g = make_guest(make_config, tmp_path, "limits: {shares: 2}")
    await g.call(VERSION, 0x10001)
    assert (await share(g, Desc()))[:3] == err(INVALID)  # no TX buffer to read from
    await g.call(RXTX_MAP, TX, RX, 1)
    data = Desc().encode()
    g.write(TX, data)
    assert (await g.call(MEM_SHARE, len(data), len(data), RAM + 0x8000, 1))[:3] == err(NOT_SUPPORTED)
    assert (await g.call(MEM_SHARE, len(data), len(data) + 1, 0, 0))[:3] == err(INVALID)  # fragment > total
    assert (await g.call(MEM_SHARE, PAGE + 16, len(data), 0, 0))[:3] == err(NO_MEMORY)  # needs 2 fragments
    assert (await share(g, Desc(), MEM_DONATE))[:3] == err(NOT_SUPPORTED)  # not configured
    handle_of(await share(g, Desc()))
    assert (await share(g, Desc()))[:3] == err(DENIED)  # the same pages again
    assert (await share(g, Desc(ranges=[(TX, 1)])))[:3] == err(DENIED)  # the TX buffer
    handle_of(await share(g, Desc(ranges=[(RAM + 0x20000, 1)])))
    assert (await share(g, Desc(ranges=[(RAM + 0x30000, 1)])))[:3] == err(NO_MEMORY)  # 2 shares at most
    assert (await g.call(RXTX_MAP, RAM + 0x10000, RAM + 0x40000, 1))[:3] == err(DENIED)


async def test_fragmented_share(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    g = make_guest(make_config, tmp_path, "limits: {fragments: 3, ranges_per_share: 512, pages_per_share: 512}")
    await g.ready(0x10001)
    # 252 one-page ranges (pages 2..253, in reverse order): 4112 bytes, so two fragments.
    data = Desc(ranges=[(RAM + p * PAGE, 1) for p in range(253, 1, -1)]).encode()
    assert len(data) > PAGE
    g.write(TX, data[:PAGE])
    regs = await g.call(MEM_SHARE, len(data), PAGE, 0, 0)
    assert regs[0] == MEM_FRAG_RX and regs[3] == PAGE
    lo, hi = regs[1], regs[2]
    assert (await g.call(MEM_SHARE, len(data), PAGE, 0, 0))[:3] == err(BUSY)  # one at a time
    assert (await g.call(MEM_FRAG_TX, lo + 1, hi, 16))[:3] == err(INVALID)  # not that handle
    g.write(TX, data[PAGE:])
    regs = await g.call(MEM_FRAG_TX, lo, hi, len(data) - PAGE)
    assert regs[0] == SUCCESS32 and (regs[2], regs[3]) == (lo, hi)  # the handle named at the first fragment
    assert len(g.handler.endpoint.ledger) == 1


async def test_fragment_limit(g: Guest) -> None:
    await g.ready(0x10001)
    assert (await g.call(MEM_SHARE, 2 * PAGE, PAGE, 0, 0))[:3] == err(NO_MEMORY)  # Xen's one fragment


async def test_lend_reclaim_zeroes(g: Guest) -> None:
    await g.ready(0x10001)
    g.write(RAM + 0x10000, b"secret" * 10)
    handle = handle_of(await share(g, Desc(attributes=0, flags=0), MEM_LEND))
    assert g.read(RAM + 0x10000, 6) == b"secret"  # lent as it is
    assert (await g.call(MEM_RECLAIM, handle & 0xFFFF_FFFF, handle >> 32, 1))[0] == SUCCESS32
    assert g.read(RAM + 0x10000, 2 * PAGE) == bytes(2 * PAGE)


async def test_lend_zeroed_before_the_borrower_sees_it(g: Guest) -> None:
    await g.ready(0x10001)
    g.write(RAM + 0x10000, b"secret")
    handle = handle_of(await share(g, Desc(attributes=0, flags=1), MEM_LEND))
    mem = g.handler.endpoint.partitions[ECHO].plugin.ctx.retrieve(handle)
    assert await mem.read(0, 6) == bytes(6)


async def test_donate_never_comes_back(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    g = make_guest(make_config, tmp_path, "donate: true")
    await g.ready(0x10001)
    assert (await g.call(FEATURES, MEM_DONATE))[0] == SUCCESS32
    handle = handle_of(await share(g, Desc(attributes=0, receivers=[(ECHO, 0)]), MEM_DONATE))
    lo, hi = handle & 0xFFFF_FFFF, handle >> 32
    assert (await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_RETRIEVE, lo, hi, 0, 0))[7] == 0
    assert (await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_RELINQUISH, lo, hi, 0, 0))[7] == \
        DENIED & 0xFFFF_FFFF
    assert (await g.call(MEM_RECLAIM, lo, hi, 0))[:3] == err(DENIED)


async def test_partition_memory_access_is_bounded(g: Guest) -> None:
    await g.ready(0x10001)
    g.write(RAM + 0x10000, b"hello")
    handle = handle_of(await share(g, Desc(receivers=[(ECHO, 1)])))  # read-only
    ctx = g.handler.endpoint.partitions[ECHO].plugin.ctx
    with pytest.raises(FfaError) as e:
        ctx.retrieve(handle + 1)
    assert e.value.code == Err.INVALID_PARAMETERS
    mem = ctx.retrieve(handle)
    assert await mem.read(0, 5) == b"hello"
    assert mem.size == 2 * PAGE
    for offset, n in ((2 * PAGE - 1, 2), (-1, 1)):
        with pytest.raises(FfaError):
            await mem.read(offset, n)
    with pytest.raises(FfaError) as e:
        await mem.write(0, b"x")
    assert e.value.code == Err.DENIED  # read-only for this borrower
    ctx.relinquish(handle)
    with pytest.raises(FfaError) as e:
        await mem.read(0, 1)
    assert e.value.code == Err.DENIED  # not retrieved any more
    store = g.handler.endpoint.partitions[STORE].plugin.ctx
    with pytest.raises(FfaError):
        store.retrieve(handle)  # not a borrower


async def test_partition_reads_across_ranges(g: Guest) -> None:
    await g.ready(0x10001)
    g.write(RAM + 0x30000 - 2, b"ab")
    g.write(RAM + 0x10000, b"cd")
    handle = handle_of(await share(g, Desc(ranges=[(RAM + 0x2F000, 1), (RAM + 0x10000, 1)])))
    mem = g.handler.endpoint.partitions[ECHO].plugin.ctx.retrieve(handle)
    assert await mem.read(PAGE - 2, 4) == b"abcd"
    await mem.write(PAGE - 1, b"XY")
    assert g.read(RAM + 0x30000 - 1, 1) == b"X" and g.read(RAM + 0x10000, 1) == b"Y"


# ----------------------------------------------------------------- storage

async def store_req(g: Guest, op: int, key: int, handle: int = 0, n: int = 0) -> tuple[int, int]:
    regs = await g.call(DIRECT_REQ32, VM_ID << 16 | STORE, 0, op, key, handle & 0xFFFF_FFFF, handle >> 32, n)
    assert regs[0] == DIRECT_RESP32
    return regs[3], regs[4]


async def test_storage_store_and_load(g: Guest, tmp_path: Path) -> None:
    await g.ready(0x10001)
    value = b"the guest's secret value"
    g.write(RAM + 0x10000, value)
    handle = handle_of(await share(g, Desc(receivers=[(STORE, 2)])))
    assert await store_req(g, 1, 7, handle, len(value)) == (0, len(value))
    # Relinquished before answering: the guest can reclaim at once.
    assert (await g.call(MEM_RECLAIM, handle & 0xFFFF_FFFF, handle >> 32, 0))[0] == SUCCESS32
    path = tmp_path / "state" / "t" / "ffa-storage" / "store" / "00000007"
    assert path.read_bytes() == value
    assert await store_req(g, 4, 7) == (0, len(value))
    handle = handle_of(await share(g, Desc(receivers=[(STORE, 2)], ranges=[(RAM + 0x40000, 1)])))
    assert await store_req(g, 2, 7, handle, 4) == (NO_MEMORY & 0xFFFF_FFFF, 0)  # buffer too small
    assert await store_req(g, 2, 7, handle, PAGE) == (0, len(value))
    assert g.read(RAM + 0x40000, len(value)) == value
    assert (await store_req(g, 2, 8, handle, PAGE))[0] == NO_DATA & 0xFFFF_FFFF
    assert await store_req(g, 3, 7) == (0, 0)
    assert (await store_req(g, 3, 7))[0] == NO_DATA & 0xFFFF_FFFF
    assert (await g.call(DIRECT_REQ32, VM_ID << 16 | STORE, 0, 99))[:3] == err(INVALID)


async def test_storage_limits(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    g = make_guest(make_config, tmp_path, partitions=f"""
          store: {{type: storage, id: {STORE:#x}, uuids: ["{STORE_UUID}"], options: {{max_value: 8, max_keys: 1}}}}""")
    await g.ready(0x10001)
    handle = handle_of(await share(g, Desc(receivers=[(STORE, 2)])))
    assert (await store_req(g, 1, 1, handle, 9))[0] == NO_MEMORY & 0xFFFF_FFFF
    assert await store_req(g, 1, 1, handle, 8) == (0, 8)
    assert (await store_req(g, 1, 2, handle, 8))[0] == NO_MEMORY & 0xFFFF_FFFF  # one key at most
    assert await store_req(g, 1, 1, handle, 4) == (0, 4)  # overwriting is fine
    assert (await store_req(g, 1, 1, handle + 1, 4))[0] == INVALID & 0xFFFF_FFFF  # no such handle


# ----------------------------------------------------------------- state

async def test_snapshot_restore_and_reset(g: Guest, make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    await g.ready(0x10001)
    await g.call(BITMAP_CREATE, VM_ID, 1)
    await g.call(BIND, ECHO << 16 | VM_ID, 0, 1, 0)
    handle = handle_of(await share(g, Desc()))
    lo, hi = handle & 0xFFFF_FFFF, handle >> 32
    await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_RETRIEVE, lo, hi, 0, 0)
    snap = g.handler.snapshot()
    other = make_guest(make_config, tmp_path)
    other.handler.restore(snap)
    other.handler.attach(reconnect=True)  # the VM that has run (a daemon restart) keeps it
    assert other.handler.snapshot() == snap
    assert (await other.call(MEM_RECLAIM, lo, hi, 0))[:3] == err(DENIED)
    assert (await other.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_RELINQUISH, lo, hi, 0, 0))[7] == 0
    assert (await other.call(RXTX_MAP, TX, RX, 1))[:3] == err(DENIED)  # still mapped
    with pytest.raises((ValueError, KeyError)):
        other.handler.restore({**snap, "version": 0x30000})
    g.handler.event(VmEvent(EventKind.VM_RESET, 0))
    assert (await g.call(ID_GET))[:3] == err(INVALID)  # the guest starts over
    assert len(g.handler.endpoint.ledger) == 0
    assert g.handler.report()["version"] == "none"
    other.handler.attach(reconnect=False)  # a fresh VM process: nothing carried over
    assert len(other.handler.endpoint.ledger) == 0 and other.handler.report()["version"] == "none"


async def test_failure_is_an_ffa_error(g: Guest) -> None:
    await g.ready(0x10001)
    g.svc.facts.memory = None  # no VMM: guest memory cannot be reached
    assert (await g.call(PART_INFO))[:3] == err(-8)  # ABORTED


# ----------------------------------------------------------------- config

def test_option_errors_name_file_line_key(make_config: Callable[[str], VmConfig]) -> None:
    bad = handler_yaml("bogus: 1\n      limits: {shares: 0}", f"""
          a: {{type: echo, id: {VM_ID}, uuids: ["{ECHO_UUID}"]}}
          b: {{type: echo, id: 0x8003, uuids: [not-a-uuid]}}
          c: {{type: nosuch, id: 0x8004, uuids: ["{STORE_UUID}"]}}
          d: {{type: echo, id: 0x8005, uuids: ["{STORE_UUID}"], properties: [fly]}}
          e: {{type: storage, id: 0x8005, uuids: ["{ECHO_UUID}"], options: {{max_keys: 0}}}}""")
    with pytest.raises(ConfigError) as e:
        make_config(bad)
    text = str(e.value)
    for needle in ("handlers.ffa.options.bogus", "limits.shares", "partitions.a.id", "partitions.b.uuids",
                   "partitions.c.type", "partitions.d.properties", "partitions.e.options.max_keys", "vm.yaml:"):
        assert needle in text, (needle, text)


def test_pinned_version_must_be_offered(make_config: Callable[[str], VmConfig]) -> None:
    with pytest.raises(ConfigError, match="ffa"):
        make_config(handler_yaml('version: "1.1"', top='versions: {ffa: "1.2"}'))


async def test_multi_service_partition(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    """A partition with two UUIDs: one 1.1 record per UUID, one 1.0 record in all."""
    other = "5b2c0000-0000-4000-8000-000000000001"
    parts = f"""
          echo: {{type: echo, id: {ECHO:#x}, uuids: ["{ECHO_UUID}", "{other}"]}}"""
    g = make_guest(make_config, tmp_path, partitions=parts)
    await g.ready(0x10001)
    assert (await g.call(PART_INFO))[2] == 2
    assert [r[3] for r in records(g.read(RX, 48), 2, 24)] == [ECHO_UUID.bytes, uuid.UUID(other).bytes]
    g10 = make_guest(make_config, tmp_path, partitions=parts)
    await g10.ready(0x10000)
    assert (await g10.call(PART_INFO))[2] == 1


async def test_features_ignores_the_sve_hint(g: Guest) -> None:
    await g.call(VERSION, 0x10002)
    assert (await g.call(FEATURES, DIRECT_REQ64 | 1 << 16))[0] == SUCCESS32
    assert (await g.call(FEATURES, DIRECT_REQ64 | 1 << 17))[:3] == err(NOT_SUPPORTED)  # a must-be-zero bit


def test_shipped_config_offers_partitions(tmp_path: Path) -> None:
    """Linux's driver refuses to load without a partition; config/ffa.yaml offers two."""
    from hvcproxyd.core.vmconfig import load_config

    from .conftest import REPO
    config = load_config(REPO / "config" / "ffa.yaml", socket=str(tmp_path / "s"))
    opts = config.handlers["ffa"].options
    assert [p.cls.__name__ for p in opts.partitions] == ["EchoPartition", "StoragePartition"]
    assert opts.id == 1 and opts.version == 0x10002


async def test_the_npi_follows_the_vmm(g: Guest) -> None:
    """FEATURES offers the NPI only while a VMM that raises interrupts is attached,
    and a notification still pending when one reattaches (its interrupt may have
    been lost with the old connection) is raised again on vCPU 0."""
    sent: list[tuple[int, int]] = []
    hello = Hello("t", Accel.TCG, 40, (VcpuInfo(0, 0, True), VcpuInfo(1, 1, True)),
                  (RamRegion(RAM, RAM_SIZE),), FEATURE_INTERRUPT)
    assert (await g.call(VERSION, 0x10002))[0] == 0x10002
    assert (await g.call(FEATURES, FEAT_NPI))[:3] == err(NOT_SUPPORTED)  # no VMM yet
    g.svc.attach(hello, g.svc.facts.memory, lambda vcpu, intid: sent.append((vcpu, intid)))  # type: ignore[arg-type]
    assert (await g.call(VERSION, 0x10002))[0] == 0x10002  # a fresh boot negotiates again
    assert (await g.call(FEATURES, FEAT_NPI))[:3] == (SUCCESS32, 0, 8)
    assert (await g.call(BITMAP_CREATE, VM_ID, 2))[0] == SUCCESS32
    assert (await g.call(BIND, ECHO << 16 | VM_ID, 0, 1, 0))[0] == SUCCESS32
    assert (await g.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_NOTIFY, 1, 0, 0, 0, vcpu=1))[7] == 0
    assert sent == [(1, 8)]  # the caller's vCPU
    memory = g.svc.facts.memory
    g.svc.detach()
    assert (await g.call(FEATURES, FEAT_NPI))[:3] == (SUCCESS32, 0, 8)  # the guest's view holds until reattach
    g.svc.attach(dataclasses.replace(hello, reconnect=True, filter_in_force=g.svc.filter), memory,  # type: ignore[arg-type]
                 lambda vcpu, intid: sent.append((vcpu, intid)))
    assert sent == [(1, 8), (0, 8)]  # pending, so raised again
    assert (await g.call(NOTIF_GET, VM_ID, 1))[2] == 1
    g.svc.attach(dataclasses.replace(hello, features=0, reconnect=True, filter_in_force=g.svc.filter),
                 memory)  # type: ignore[arg-type]
    assert (await g.call(FEATURES, FEAT_NPI))[:3] == err(NOT_SUPPORTED)
