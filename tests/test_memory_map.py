"""Memory hotplug (protocol v2 MEMORY_MAP): the daemon's RAM map follows the VMM's.

The simulator stands for QEMU's forwarder, which sends the whole map again when
memory is plugged or unplugged (integration/tests/test_guests.py plugs a
pc-dimm and a virtio-mem device into a real QEMU)."""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path

import pytest

from hvcproxyd import wire
from hvcproxyd.core.guestmem import GuestMemory, GuestMemoryError
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.pkvm_memshare import MEM_SHARE_ID
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu

from .conftest import Serve

DIMM = 0x8000_0000
INVALID = (1 << 64) - 3


def test_map_round_trips_and_needs_v2() -> None:
    event = wire.MemoryMap((wire.RamRegion(0, 1 << 26, rom=True), wire.RamRegion(RAM_BASE, 1 << 28, 0, 0),
                            wire.RamRegion(DIMM, 1 << 27)))
    raw = wire.encode(event)
    assert wire.decode_payload(wire.MsgType.MEMORY_MAP, 0, memoryview(raw[wire.HEADER.size:])) == event
    with pytest.raises(wire.LocalProtocolError, match="must be sorted"):
        wire.MemoryMap((wire.RamRegion(DIMM, 4096), wire.RamRegion(RAM_BASE, 4096)))
    with pytest.raises(wire.LocalProtocolError, match="no RAM region"):
        wire.MemoryMap((wire.RamRegion(0, 4096, rom=True),))
    v1 = wire.Connection(wire.Role.VMM)
    v1.version, v1.state = 1, wire.State.RUNNING
    with pytest.raises(wire.LocalProtocolError, match="needs protocol version 2"):
        v1.send(event)


async def test_remap_keeps_the_mappings_of_regions_that_stay() -> None:
    ram = mmap.mmap(-1, 8192)
    kept = wire.RamRegion(RAM_BASE, 8192, 0, 0)
    memory = GuestMemory((kept,), 40, maps={0: ram})
    await memory.write(RAM_BASE, b"kept")
    memory.remap((kept, wire.RamRegion(DIMM, 4096)))
    assert await memory.read(RAM_BASE, 4) == b"kept" and memory.contains(DIMM, 4096)
    memory.remap((wire.RamRegion(DIMM, 4096),))  # the first region went: unmapped
    assert ram.closed and not memory.contains(RAM_BASE, 4)
    with pytest.raises(GuestMemoryError):
        await memory.read(RAM_BASE, 4)


async def test_a_hotplugged_dimm_is_guest_ram_at_once(make_config: Callable[[str], VmConfig], tmp_path: Path,
                                                     serve: Serve) -> None:
    config = make_config("""
        vm: t
        handlers: {ms: {type: pkvm-memshare, options: {stream: false}}, psci: {type: psci}}
        rules:
          - {match: kvm-vendor, action: ms}
          - {match: psci, action: psci}
        """)
    daemon = await serve(config)
    sim = Simulator(config.socket, n_vcpus=2, name="t")
    seen: list[int] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        seen.append((await cpu.call(MEM_SHARE_ID, DIMM))[0])
        seen.append((await cpu.call(0xC400_0003, 1, DIMM, 0))[0])  # CPU_ON into the DIMM
        await sim.send(wire.MemoryMap((wire.RamRegion(RAM_BASE, sim.ram_size, 0, 0),
                                       wire.RamRegion(DIMM, 1 << 27))))
        seen.append((await cpu.call(MEM_SHARE_ID, DIMM))[0])
        seen.append((await cpu.call(0xC400_0003, 1, DIMM, 0))[0])

    sim.boot = boot
    await sim.run(timeout=30)
    assert seen == [INVALID, (1 << 64) - 9, 0, 0]  # INVALID_PARAMETER, INVALID_ADDRESS; then both accepted
    assert daemon.vm.facts.executable[-1] == (DIMM, DIMM + (1 << 27))
