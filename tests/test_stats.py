"""The one stats model: results classified by each service's own convention,
and status showing the power states the PSCI handler holds."""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from hvcproxyd.core.guestmem import GuestMemory
from hvcproxyd.core.stats import CallStats, outcome
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.pkvm_memshare import MEM_SHARE_ID
from hvcproxyd.ops.metrics import scrape_unix
from hvcproxyd.ops.sdnotify import Notifier
from hvcproxyd.ops.service import Service
from hvcproxyd.ops.status import vcpu_power
from hvcproxyd.server.daemon import Daemon
from hvcproxyd.smccc.results import ResultClass, classify
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu, default_mpidr
from hvcproxyd.wire import FEATURE_EFFECT_DONE, Accel, Call, Effect, EffectKind, Hello, RamRegion, Reply, VcpuInfo

MASK64 = (1 << 64) - 1
RAM = 0x4000_0000


def neg(code: int, bits: int = 64) -> int:
    return code & ((1 << bits) - 1)


@pytest.mark.parametrize(("fid", "regs", "want"), [
    (0x8600_FF01, (0xB66F_B428, 0xE911_C52E, 0x564B_CAA9, 0x743A_004D), ResultClass.VALUE),  # KVM's UID word
    (0x8600_FF01, (neg(-1, 32),), ResultClass.NOT_SUPPORTED),   # UID not implemented
    (0x8600_FF00, (5,), ResultClass.VALUE),                      # call count
    (0x8400_0000, (0x1_0001,), ResultClass.VALUE),               # PSCI_VERSION 1.1
    (0x8400_0004, (2,), ResultClass.VALUE),                      # AFFINITY_INFO: ON_PENDING
    (0xC400_0003, (neg(-4),), ResultClass.ERROR),                # CPU_ON: ALREADY_ON
    (0xC400_0003, (0,), ResultClass.SUCCESS),
    (0x8400_0063, (0x1_0002,), ResultClass.VALUE),               # FFA_VERSION
    (0x8400_006F, (0x8400_0060, 0, neg(-2, 32)), ResultClass.ERROR),  # FFA_ERROR(INVALID_PARAMETERS)
    (0x8400_0066, (0x8400_0061,), ResultClass.SUCCESS),          # FFA_SUCCESS
    (0x8200_0003, (neg(-3),), ResultClass.ERROR),                # a SiP call's INVALID_PARAMETER
    (0x8200_0003, (0x9000_0000,), ResultClass.VALUE),            # a 32-bit word with the top bit set
])
def test_results_follow_the_service_convention(fid: int, regs: tuple[int, ...], want: ResultClass) -> None:
    assert classify(fid, regs)[0] is want


@pytest.mark.parametrize(("fid", "regs", "want"), [
    (0xC400_0004, (0,), (ResultClass.SUCCESS, "ON")),            # AFFINITY_INFO speaks PSCI's states
    (0x8400_0004, (1,), (ResultClass.VALUE, "OFF")),
    (0xC400_0004, (2,), (ResultClass.VALUE, "ON_PENDING")),
    (0x8400_0004, (neg(-2, 32),), (ResultClass.ERROR, "INVALID_PARAMETERS")),  # an error stays the error
    (0x8400_0000, (0x1_0003,), (ResultClass.VALUE, "1.3")),     # versions as versions
    (0x8000_0000, (0x1_0002,), (ResultClass.VALUE, "1.2")),
    (0x8000_0000, (neg(-1, 32),), (ResultClass.NOT_SUPPORTED, "NOT_SUPPORTED")),
    (0x8400_0063, (0x1_0001,), (ResultClass.VALUE, "1.1")),
    (0xC600_0002, (4096,), (ResultClass.VALUE, "granule 4096")),  # memshare's HYP_MEMINFO, its handler's words
    (0x3200_0004, (0,), (ResultClass.SUCCESS, "OK")),            # OP-TEE's own return codes
    (0x3200_0004, (4,), (ResultClass.ERROR, "EBADADDR")),
    (0x3200_0004, (0xFFFF_0005,), (ResultClass.VALUE, "RPC_CMD")),  # the TEE asks the guest for an RPC
    (0xB200_0009, (0xFFFF_FFFF,), (ResultClass.NOT_SUPPORTED, "UNKNOWN_FUNCTION")),
])
def test_results_are_named_in_the_service_language(fid: int, regs: tuple[int, ...],
                                                   want: tuple[ResultClass, str]) -> None:
    assert classify(fid, regs) == want


def test_a_call_that_does_not_return_is_a_success_whatever_x0_holds() -> None:
    call = Call(1, 2, 0x8400_0002, (0,) * 17)  # CPU_OFF
    reply = Reply(1, 2, (neg(-3), 0, 0, 0), (Effect(EffectKind.CPU_OFF, 2),))
    assert outcome(call, reply) == (ResultClass.SUCCESS, "does not return")
    stats = CallStats()
    stats.record(call, reply, "psci", 1e-5)
    assert stats.by_result() == {"success": 1}


PSCI_CONFIG = """\
vm: st
handlers:
  psci: {type: psci}
rules:
  - {match: psci, action: psci}
"""


async def test_status_shows_the_power_states_psci_holds(make_config: Callable[[str], VmConfig]) -> None:
    daemon = Daemon(make_config(PSCI_CONFIG))
    vm = daemon.vm
    vcpus = tuple(VcpuInfo(i, default_mpidr(i), i == 0) for i in range(3))
    vm.attach(Hello("st", Accel.TCG, 40, vcpus, (RamRegion(RAM, 1 << 24),), FEATURE_EFFECT_DONE),
              GuestMemory((RamRegion(RAM, 1 << 24),), 40))
    seq = itertools.count(1)

    async def cpu_on(target: int) -> Reply:
        return await vm.dispatch(Call(next(seq), 0, 0xC400_0003, (default_mpidr(target), RAM, 0) + (0,) * 14))

    first = await cpu_on(1)
    second = await cpu_on(2)
    power, source = vcpu_power(daemon, vm.reports())
    assert source == "handler psci" and power == {0: "on", 1: "on_pending", 2: "on_pending"}
    vm.effect_done(first.seq, 0, 0)
    vm.effect_done(second.seq, 0, -errno.EIO)  # the VMM could not start vCPU 2
    power, _ = vcpu_power(daemon, vm.reports())
    assert power == {0: "on", 1: "on", 2: "off"}  # as PSCI holds it, not as the effect hoped
    assert vm.vmm_power == {0: True, 1: True, 2: False}


async def test_without_a_power_handler_status_takes_the_vmm_word(make_config: Callable[[str], VmConfig]) -> None:
    daemon = Daemon(make_config("vm: st\nhandlers:\n  d: {type: deny}\nrules:\n  - {match: 0x82000001, action: d}\n"))
    vcpus = tuple(VcpuInfo(i, default_mpidr(i), i == 0) for i in range(2))
    daemon.vm.attach(Hello("st", Accel.TCG, 40, vcpus, (RamRegion(RAM, 1 << 24),)),
                     GuestMemory((RamRegion(RAM, 1 << 24),), 40))
    assert vcpu_power(daemon, daemon.vm.reports()) == ({0: "on", 1: "off"}, "the VMM")


async def test_status_and_metrics_render_the_handler_reports(make_config: Callable[[str], VmConfig],
                                                            tmp_path: Path) -> None:
    config = make_config(f"""\
vm: rep
vmm: {{uid: {os.getuid()}}}
handlers:
  ms: {{type: pkvm-memshare, options: {{socket: {tmp_path / "ms.sock"}}}}}
rules:
  - {{match: kvm-vendor, action: ms}}
""")

    async def guest(cpu: SimVcpu, x0: int) -> None:
        for page in (0, 1, 5):
            assert (await cpu.call(MEM_SHARE_ID, RAM_BASE + page * 4096))[0] == 0

    async with trio.open_nursery() as nursery:
        service: Service = await nursery.start(Service(config, Notifier({})).run)
        sim = Simulator(config.socket, n_vcpus=1, name="rep", boot=guest)
        try:
            await sim.run(timeout=30)
        finally:
            sim.close()
        st = service.status()
        assert config.metrics is not None and config.metrics.socket is not None
        text = (await trio.to_thread.run_sync(scrape_unix, str(config.metrics.socket))).decode()
        service.stop()
    report = st["calls"]["handlers"]["ms"]["report"]
    assert report["shared_bytes"] == 3 * 4096 and report["ranges"] == 2 and report["shares"] == 3
    assert report["MemshareSidecar"]["stream"] == str(tmp_path / "ms.sock")
    assert 'hvcproxyd_handler_state{handler="ms",key="shared_bytes",vm="rep"} 12288.0' in text
    assert 'hvcproxyd_handler_state{handler="ms",key="MemshareSidecar.connected",vm="rep"} 0.0' in text
    assert 'hvcproxyd_handler_state{handler="ms",key="MemshareSidecar.stalled",vm="rep"} 0.0' in text
    assert st["control_refused"] == 0 and 'hvcproxyd_control_refused_total{vm="rep"} 0.0' in text
