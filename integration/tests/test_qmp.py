"""QMP against a real QEMU (the project's build; no guest needed: -S keeps it at
the reset vector): vCPU cross-check, lifecycle events, run state, and a daemon
that keeps serving when QMP goes away."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from qemu_harness import Qemu, StartQemu

from hvcproxyd import wire
from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.vmm.qmp import QmpState, QmpWatcher
from hvcproxyd.vmm.simulator import Simulator, SimVcpu, default_mpidr
from tests.conftest import Serve
from tests.waiting import wait_until


def start_stopped_qemu(start_qemu: StartQemu, smp: int) -> Qemu:
    """A virt machine held at the reset vector (-S), its QMP socket ready."""
    vm = start_qemu("-S", cpu="cortex-a57", smp=smp, memory="128M", forwarder_opts="")
    vm.wait_qmp()
    return vm


def qmp_config(workdir: Path, qmp: Path) -> VmConfig:
    """A VM whose daemon watches the test QEMU's QMP socket; 0x82000001 answers x1 = 7."""
    path = workdir / "q.yaml"
    path.write_text(f"""\
vm: q
qmp: {qmp}
handlers:
  hello: {{type: static, options: {{regs: [0, 7]}}}}
rules:
  - {{match: 0x82000001, action: hello}}
""")
    return load_config(path, socket=str(workdir / "vm.sock"))


def hello(mpidrs: list[int]) -> wire.Hello:
    return wire.Hello("q", wire.Accel.TCG, 40,
                      tuple(wire.VcpuInfo(i, m, i == 0) for i, m in enumerate(mpidrs)),
                      (wire.RamRegion(0x4000_0000, 128 << 20),))


async def test_cross_check_events_and_run_state(start_qemu: StartQemu) -> None:
    vm = start_stopped_qemu(start_qemu, 4)
    events: list[tuple[str, dict[str, Any]]] = []
    watcher = QmpWatcher(str(vm.qmp_path), "q", on_event=lambda name, data: events.append((name, data)))
    # A fixture's contextvars do not reach the test's task under pytest-trio, so the
    # asyncio loop qemu.qmp needs is opened here.
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        # QEMU's own view agrees with a VMM that reports virt's MPIDRs ...
        assert await watcher.cross_check(hello([default_mpidr(i) for i in range(4)])) is None
        # ... and a VMM that lies about one vCPU or their number is caught, naming the difference.
        problem = await watcher.cross_check(hello([0, 1, 2, 0x100]))
        assert problem is not None and "vCPU 3: VMM says MPIDR 0x100, QEMU says MPIDR 0x3" in problem
        problem = await watcher.cross_check(hello([0, 1]))
        assert problem is not None and "vCPU 2: VMM says no such vCPU" in problem
        assert watcher.state is QmpState.RUNNING
        assert watcher.run_status == "prelaunch"
        for command in ("cont", "stop", "system_reset"):  # QEMU's QMP takes one client: ours
            await watcher.execute(command)
        await wait_until(lambda: [e for e, _ in events] == ["RESUME", "STOP", "RESET"], "the three QMP events")
        assert watcher.run_status == "paused"
        vm.kill()
        await wait_until(lambda: watcher.state is not QmpState.RUNNING, "the watcher to see QMP go")
        assert watcher.state in (QmpState.DISCONNECTED, QmpState.CONNECTING)
        nursery.cancel_scope.cancel()


async def test_daemon_keeps_serving_calls_when_qmp_goes_away(
        start_qemu: StartQemu, workdir: Path, serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hvcproxyd")
    vm = start_stopped_qemu(start_qemu, 2)
    config = qmp_config(workdir, vm.qmp_path)
    answers: list[int] = []
    qemu_status: list[dict[str, Any]] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        answers.append((await cpu.call(0x8200_0001))[1])
        await wait_until(lambda: "QMP confirms" in caplog.text, "the daemon's QMP cross-check")
        qemu_status.append(service.status()["qemu"])
        vm.kill()
        qmp = service.daemon.qmp
        assert qmp is not None
        await wait_until(lambda: qmp.state is not QmpState.RUNNING, "the daemon to see QMP go")
        qemu_status.append(service.status()["qemu"])
        answers.append((await cpu.call(0x8200_0001))[1])

    service = await serve.service(config)
    sim = Simulator(config.socket, n_vcpus=2, name="q", boot=boot)
    try:
        await sim.run(timeout=30)
    finally:
        sim.close()
    await serve.stop(service.daemon)
    assert answers == [7, 7]
    # `hvcproxyd status` shows QEMU's run state (-S: prelaunch) and that QMP went away.
    assert qemu_status[0]["run_state"] == "prelaunch" and qemu_status[0]["qmp_state"] == "running"
    assert qemu_status[1]["qmp_state"] in ("disconnected", "connecting")
    assert "QMP confirms the VMM's 2 vCPUs" in caplog.text
    assert "QMP connection lost; still serving calls" in caplog.text


async def test_a_vmm_that_qemu_contradicts_is_refused(start_qemu: StartQemu, workdir: Path,
                                                      serve: Serve) -> None:
    vm = start_stopped_qemu(start_qemu, 2)
    config = qmp_config(workdir, vm.qmp_path)
    await serve(config)
    sim = Simulator(config.socket, n_vcpus=3, name="q")  # QEMU has 2
    try:
        await sim.connect()  # the handshake itself succeeds: QMP is checked after it
        with trio.fail_after(20):
            refusal = await sim.next_event()
    finally:
        sim.close()
    assert isinstance(refusal, wire.Error) and refusal.code is wire.ErrorCode.REFUSED
    assert "disagrees with QEMU's QMP view" in refusal.reason and "vCPU 2: VMM says MPIDR 0x2" in refusal.reason
