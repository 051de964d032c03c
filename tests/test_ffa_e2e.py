"""FF-A end to end: the daemon and the VMM simulator over the real UNIX socket,
guest RAM passed by memfd.  One guest walks every path a driver takes:
negotiate, map RX/TX, enumerate partitions, direct requests to echo, an
indirect message and its notification, a share the storage partition reads,
a value stored and read back, reclaim, unmap."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.ffa.defs import FEAT_NPI, FEAT_SRI
from hvcproxyd.handlers.ffa.echo import CMD_NOTIFY
from hvcproxyd.smccc import MASK64
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu

from .conftest import Serve
from .ffa_support import (
    BIND,
    BITMAP_CREATE,
    DIRECT_REQ32,
    DIRECT_REQ64,
    DIRECT_RESP32,
    DIRECT_RESP64,
    ECHO,
    ECHO_UUID,
    ERROR,
    FEATURES,
    INFO_GET,
    MEM_RECLAIM,
    MEM_SHARE,
    MSG_SEND2,
    NOT_SUPPORTED,
    NOTIF_GET,
    PAGE,
    PART_INFO,
    RX_RELEASE,
    RXTX_MAP,
    RXTX_UNMAP,
    STORE,
    STORE_UUID,
    SUCCESS32,
    VERSION,
    VM_ID,
    Desc,
    handler_yaml,
)
from .ops_support import CPU_ON64

TX, RX = RAM_BASE + 0x10_0000, RAM_BASE + 0x10_1000
DATA, BACK = RAM_BASE + 0x20_0000, RAM_BASE + 0x30_0000
SECONDARY = RAM_BASE + 0x1000  # the second vCPU's entry point


class FfaGuest:
    """A guest driver's FF-A walk, against the simulator's RAM."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.seen: dict[str, object] = {}

    def write(self, gpa: int, data: bytes) -> None:
        self.sim.ram[gpa - RAM_BASE:gpa - RAM_BASE + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.sim.ram[gpa - RAM_BASE:gpa - RAM_BASE + n])

    async def share(self, cpu: SimVcpu, receiver: int, gpa: int) -> int:
        desc = Desc(receivers=[(receiver, 2)], ranges=[(gpa, 1)]).encode()
        self.write(TX, desc)
        regs = await cpu.call(MEM_SHARE, len(desc), len(desc), 0, 0)
        assert regs[0] == SUCCESS32, regs
        return regs[3] << 32 | regs[2]

    async def boot(self, cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(VERSION, 0x10001))[0] == 0x10002
        assert (await cpu.call(RXTX_MAP, TX, RX, 1))[0] == SUCCESS32
        # Enumerate: count first, then the records, then give RX back.
        assert (await cpu.call(PART_INFO, 0, 0, 0, 0, 1))[2:4] == (2, 24)
        assert (await cpu.call(PART_INFO))[0] == SUCCESS32
        self.seen["uuids"] = [self.read(RX + i * 24 + 8, 16) for i in range(2)]
        assert (await cpu.call(RX_RELEASE))[0] == SUCCESS32
        # Direct requests to echo.
        self.seen["direct32"] = await cpu.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, 1, 2, 3, 4, 5)
        self.seen["direct64"] = await cpu.call(DIRECT_REQ64, VM_ID << 16 | ECHO, 0, 1 << 60, 2, 3, 4, 5)
        # An indirect message, echo's answer in RX, and the notifications that tell of it.
        assert (await cpu.call(BITMAP_CREATE, VM_ID, len(self.sim.vcpus)))[0] == SUCCESS32
        assert (await cpu.call(BIND, ECHO << 16 | VM_ID, 0, 1 << 4, 0))[0] == SUCCESS32
        self.write(TX, struct.pack("<IIIII", 0, 0, 20, VM_ID << 16 | ECHO, 5) + b"hello")
        assert (await cpu.call(MSG_SEND2))[0] == SUCCESS32
        self.seen["info"] = (await cpu.call(INFO_GET))[:4]
        self.seen["rx_full"] = (await cpu.call(NOTIF_GET, VM_ID, 0x8))[7]
        _, _, off, ids, size = struct.unpack("<IIIII", self.read(RX, 20))
        self.seen["reply"] = (ids >> 16, self.read(RX + off, size))
        assert (await cpu.call(RX_RELEASE))[0] == SUCCESS32
        assert (await cpu.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_NOTIFY, 1 << 4, 0, 0, 0))[7] == 0
        self.seen["echo_bits"] = (await cpu.call(NOTIF_GET, VM_ID, 0x1))[2]
        # Store a value through a share, read it back through another.
        value = b"kept by the storage partition"
        self.write(DATA, value)
        h1 = await self.share(cpu, STORE, DATA)
        stored = await cpu.call(DIRECT_REQ32, VM_ID << 16 | STORE, 0, 1, 42, h1 & 0xFFFF_FFFF, h1 >> 32, len(value))
        h2 = await self.share(cpu, STORE, BACK)
        loaded = await cpu.call(DIRECT_REQ32, VM_ID << 16 | STORE, 0, 2, 42, h2 & 0xFFFF_FFFF, h2 >> 32, PAGE)
        self.seen["store"] = (stored[3:5], loaded[3:5], self.read(BACK, len(value)))
        for h in (h1, h2):
            assert (await cpu.call(MEM_RECLAIM, h & 0xFFFF_FFFF, h >> 32, 0))[0] == SUCCESS32
        assert (await cpu.call(RXTX_UNMAP))[0] == SUCCESS32
        self.seen["done"] = True


async def test_guest_walks_every_path(make_config: Callable[[str], VmConfig], tmp_path: Path,
                                      serve: Serve) -> None:
    config = make_config(handler_yaml(f"state_dir: {tmp_path / 'state'}"))
    daemon = await serve(config)
    sim = Simulator(config.socket, n_vcpus=2, name="t")
    guest = FfaGuest(sim)
    sim.boot = guest.boot
    try:
        assert await sim.run(timeout=60) == "idle"
    finally:
        sim.close()
    seen = guest.seen
    assert seen.get("done"), seen
    assert seen["uuids"] == [ECHO_UUID.bytes, STORE_UUID.bytes]
    assert seen["direct32"] == (DIRECT_RESP32, ECHO << 16 | VM_ID, 0, 1, 2, 3, 4, 5)
    assert seen["direct64"] == (DIRECT_RESP64, ECHO << 16 | VM_ID, 0, 1 << 60, 2, 3, 4, 5)
    assert seen["info"] == (SUCCESS32, 0, 1 << 7, VM_ID)
    assert seen["rx_full"] == 1
    assert seen["reply"] == (ECHO, b"hello")
    assert seen["echo_bits"] == 1 << 4
    value = b"kept by the storage partition"
    assert seen["store"] == ((0, len(value)), (0, len(value)), value)
    assert (tmp_path / "state" / "t" / "ffa-storage" / "store" / "0000002a").read_bytes() == value
    handler = daemon.vm.instances["ffa"]
    assert handler.report()["transactions"] == 0  # type: ignore[union-attr]


def _with_psci(yaml: str) -> str:
    """The FF-A config plus PSCI, so that the guest can start its second vCPU."""
    return (yaml.replace("handlers:\n", "handlers:\n  psci: {type: psci}\n", 1)
            .replace("rules:\n", "rules:\n  - {match: psci, action: psci}\n", 1))


class NpiGuest:
    """A driver that takes notifications by interrupt: asks FEATURES for the NPI,
    binds echo, and has echo raise a notification from the second vCPU."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    async def boot(self, cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(VERSION, 0x10002))[0] == 0x10002
        self.seen["npi"] = (await cpu.call(FEATURES, FEAT_NPI))[:3]
        self.seen["sri"] = (await cpu.call(FEATURES, FEAT_SRI))[:3]
        assert (await cpu.call(BITMAP_CREATE, VM_ID, len(cpu.sim.vcpus)))[0] == SUCCESS32
        assert (await cpu.call(BIND, ECHO << 16 | VM_ID, 0, 1 << 4, 0))[0] == SUCCESS32
        assert (await cpu.call(CPU_ON64, 1, SECONDARY, 0))[0] == 0

    async def secondary(self, cpu: SimVcpu, x0: int) -> None:
        status = (await cpu.call(DIRECT_REQ32, VM_ID << 16 | ECHO, 0, CMD_NOTIFY, 1 << 4, 0, 0, 0))[7]
        # The INTERRUPT frame went out before the REPLY: pending when the call returns.
        self.seen["notify"] = (status, cpu.pending_irqs, cpu.sim.vcpus[0].pending_irqs)
        self.seen["bits"] = (await cpu.call(NOTIF_GET, 1 << 16 | VM_ID, 0x1))[2]
        self.seen["done"] = True


async def _run_npi(config: VmConfig, **sim_args: object) -> tuple[NpiGuest, Simulator]:
    guest = NpiGuest()
    sim = Simulator(config.socket, n_vcpus=2, name="t", boot=guest.boot, programs={SECONDARY: guest.secondary},
                    **sim_args)  # type: ignore[arg-type]
    try:
        assert await sim.run(timeout=60) == "idle"
    finally:
        sim.close()
    assert guest.seen.get("done"), guest.seen
    return guest, sim


async def test_a_notification_raises_the_npi_on_the_calling_vcpu(make_config: Callable[[str], VmConfig],
                                                                 serve: Serve) -> None:
    """FEATURES offers SGI 8 (Xen's NPI) to a VMM with the INTERRUPT feature; the
    notification echo raises inside vCPU 1's call interrupts vCPU 1, and GET finds it."""
    config = make_config(_with_psci(handler_yaml()))
    await serve(config)
    guest, sim = await _run_npi(config)
    assert guest.seen["npi"] == (SUCCESS32, 0, 8)
    assert guest.seen["sri"][0] == ERROR and guest.seen["sri"][2] == NOT_SUPPORTED & MASK64  # type: ignore[index]
    assert guest.seen["notify"] == (0, 1 << 8, 0)
    assert guest.seen["bits"] == 1 << 4
    assert [(e.vcpu, e.data["intid"]) for e in sim.entries("interrupt")] == [(1, 8)]


@pytest.mark.parametrize(("options", "interrupts"), [("", False), ("notification_interrupt: null", True)])
async def test_no_npi_is_offered_without_a_way_to_raise_it(make_config: Callable[[str], VmConfig], serve: Serve,
                                                          options: str, interrupts: bool) -> None:
    """A VMM without INTERRUPT, or a config that turns the NPI off: FEATURES says
    NOT_SUPPORTED, nothing is sent, and the notification still waits for GET."""
    config = make_config(_with_psci(handler_yaml(options)))
    await serve(config)
    guest, sim = await _run_npi(config, interrupts=interrupts)
    assert guest.seen["npi"][0] == ERROR and guest.seen["npi"][2] == NOT_SUPPORTED & MASK64  # type: ignore[index]
    assert guest.seen["notify"] == (0, 0, 0)
    assert guest.seen["bits"] == 1 << 4
    assert not sim.entries("interrupt")
