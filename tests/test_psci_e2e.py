"""An SMP boot through the PSCI handler, end to end: the VMM simulator talks to a
daemon over a real UNIX socket, on the HVC and on the SMC conduit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from hvcproxyd.cli.demo import _demo
from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.handlers.psci import PsciHandler
from hvcproxyd.handlers.psci_defs import Power
from hvcproxyd.smccc import reg_to_signed
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu
from hvcproxyd.wire import Call, FilterAction, FilterRange, Reply

from .conftest import REPO, Serve

PSCI_VERSION, CPU_OFF, SYSTEM_OFF = 0x8400_0000, 0x8400_0002, 0x8400_0008
CPU_ON, CPU_ON64, AFFINITY_INFO, AFFINITY_INFO64 = 0x8400_0003, 0xC400_0003, 0x8400_0004, 0xC400_0004
SUCCESS, ALREADY_ON, ON_PENDING = 0, -4, -5
AFF_ON, AFF_OFF, AFF_ON_PENDING = 0, 1, 2

SECONDARY_ENTRY = RAM_BASE + 0x1_0000
FIRST_CONTEXT, SECOND_CONTEXT = 0xC0DE_0000, 0x2_0000_0000  # x0 >= SECOND: the second start
N_VCPUS = 4
OFF_VCPU = 2

#: The PSCI part of config/psci.yaml, for a daemon under test (socket in tmp).
PSCI_VM = """
vm: smp
versions: {psci: "1.1"}
handlers:
  psci: {type: psci}
rules:
  - {match: psci, conduit: any, action: psci}
"""


class SmpGuest:
    """The boot vCPU and the secondaries' code at SECONDARY_ENTRY, with what they saw."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, int]] = []  # (vCPU, x0 at entry)
        self.siblings: dict[int, dict[int, int]] = {}  # vCPU -> sibling -> AFFINITY_INFO
        self.all_on = trio.Event()
        self.reported = trio.Semaphore(0)
        self.all_reported = trio.Event()
        self.back = trio.Event()
        self.polls = 0
        self.second_on: list[int] = []

    async def boot(self, cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(PSCI_VERSION))[0] == 0x1_0001
        for vcpu in cpu.sim.vcpus[1:]:
            # Both widths; SMC32 ignores the upper halves a careless guest leaves in x1..x3.
            fid, junk = (CPU_ON64, 0) if vcpu.index % 2 else (CPU_ON, 0xFFFF_FFFF << 32)
            ret = await cpu.call(fid, junk | vcpu.mpidr, junk | SECONDARY_ENTRY, junk | FIRST_CONTEXT + vcpu.index)
            assert reg_to_signed(ret[0]) == SUCCESS
        self.all_on.set()
        for _ in range(N_VCPUS - 1):
            await self.reported.acquire()
        self.all_reported.set()
        # The secondary turns itself off; poll until PSCI says so, then bring it back.
        target = cpu.sim.vcpus[OFF_VCPU].mpidr
        while (await cpu.call(AFFINITY_INFO64, target, 0))[0] != AFF_OFF:
            self.polls += 1
            await trio.sleep(0.001)
        self.polls += 1
        for context in (SECOND_CONTEXT, SECOND_CONTEXT + 1):  # the second must not start it twice
            self.second_on.append(reg_to_signed((await cpu.call(CPU_ON64, target, SECONDARY_ENTRY, context))[0]))
        await self.back.wait()
        assert (await cpu.call(AFFINITY_INFO, 0, 1))[0] == AFF_ON  # cluster 0: everyone
        await cpu.call(SYSTEM_OFF)
        raise AssertionError("SYSTEM_OFF returned")

    async def secondary(self, cpu: SimVcpu, x0: int) -> None:
        self.starts.append((cpu.index, x0))
        if x0 >= SECOND_CONTEXT:
            self.back.set()
            return
        await self.all_on.wait()
        self.siblings[cpu.index] = {
            v.index: (await cpu.call(AFFINITY_INFO, v.mpidr, 0))[0] for v in cpu.sim.vcpus if v is not cpu}
        self.reported.release()
        if cpu.index == OFF_VCPU:
            await self.all_reported.wait()  # its siblings have seen it ON before it goes
            await cpu.call(CPU_OFF)
            raise AssertionError("CPU_OFF returned")


@pytest.mark.parametrize("smc", [False, True], ids=["hvc", "smc"])
async def test_smp_boot(make_config: Callable[[str], VmConfig], serve: Serve, smc: bool,
                        autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(PSCI_VM)
    daemon = await serve(config)
    seen: list[tuple[Call, Reply]] = []
    daemon.vm.observers.append(lambda c, r, name, s: seen.append((c, r)))
    guest = SmpGuest()
    sim = Simulator(config.socket, n_vcpus=N_VCPUS, conduit_smc=smc, boot=guest.boot,
                    programs={SECONDARY_ENTRY: guest.secondary})
    try:
        assert await sim.run(timeout=20) == "system-off"
    finally:
        sim.close()

    # Each secondary started at its entry with x0 = the context ID it was given,
    # and the one that turned itself off started again with the new one.
    assert sorted(guest.starts) == sorted([(i, FIRST_CONTEXT + i) for i in range(1, N_VCPUS)]
                                          + [(OFF_VCPU, SECOND_CONTEXT)])
    assert [e.data["x0"] for e in sim.entries("start") if e.vcpu == OFF_VCPU] == [FIRST_CONTEXT + OFF_VCPU,
                                                                                 SECOND_CONTEXT]
    # Every secondary saw the boot vCPU on and its siblings on or on their way.
    for index, states in guest.siblings.items():
        assert states[0] == AFF_ON
        assert set(states.values()) <= {AFF_ON, AFF_ON_PENDING}, (index, states)
    assert guest.polls >= 1
    assert guest.second_on[0] == SUCCESS and guest.second_on[1] in (ALREADY_ON, ON_PENDING)

    # Everything went through the daemon on the conduit under test, and the
    # handler's table matches the machine that stopped.
    assert seen and all(c.smc == smc for c, _ in seen)
    assert [c.vcpu for c, _ in seen if c.func_id == CPU_OFF] == [OFF_VCPU]
    handler = daemon.vm.instances["psci"]
    assert isinstance(handler, PsciHandler)
    assert [handler.power[i] for i in range(N_VCPUS)] == [Power.ON] * N_VCPUS


async def test_demo_boots_smp_and_powers_off(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = load_config(REPO / "hvcproxyd" / "cli" / "demo.yaml", socket=str(tmp_path / "demo.sock"))
    assert await _demo(config, 4) == "system-off"
    out = capsys.readouterr().out
    for text in ("PSCI_VERSION", "+CPU_ON(vcpu3)", "PSCI_AFFINITY_INFO", "+CPU_OFF(vcpu3)", "+SYSTEM_OFF(vcpu0)",
                 "with x0=0x103", "SiP service offers"):
        assert text in out


def test_psci_yaml_forwards_psci_and_denies_psci_0_1() -> None:
    config = load_config(REPO / "config" / "psci.yaml", socket="/tmp/psci-test.sock")
    assert config.socket == Path("/tmp/psci-test.sock")
    assert config.table.filter_ranges() == (
        FilterRange(0x8400_0000, 0x20, FilterAction.FORWARD),
        FilterRange(0x95C1_BA5E, 4, FilterAction.DENY),
        FilterRange(0xC400_0000, 0x20, FilterAction.FORWARD),
    )
    assert isinstance(config.handlers["psci"].cls, type) and issubclass(config.handlers["psci"].cls, PsciHandler)
