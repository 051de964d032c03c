"""QMP against a real QEMU (the project's build; no guest needed: -S keeps it at
the reset vector): vCPU cross-check, lifecycle events, run state, and a daemon
that keeps serving when QMP goes away."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio

from hvcproxyd import wire
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.ops.service import Service
from hvcproxyd.server.daemon import Daemon
from hvcproxyd.vmm.qmp import QmpState, QmpWatcher
from hvcproxyd.vmm.simulator import Simulator, SimVcpu, default_mpidr

from .conftest import REPO


@pytest.fixture(scope="session")
def qemu_binary() -> Path:
    """The patched QEMU, built (or found in the cache) by the project's own script,
    or $HVCPROXYD_QEMU.  Fails loudly when it cannot be had: this test never skips."""
    if os.environ.get("HVCPROXYD_QEMU"):
        return Path(os.environ["HVCPROXYD_QEMU"])
    done = subprocess.run([str(REPO / "integration/qemu/build.sh")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"integration/qemu/build.sh failed:\n{done.stderr[-3000:]}"
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_file(), path
    return path


class Qemu:
    def __init__(self, binary: Path, qmp: Path, smp: int) -> None:
        self.qmp = qmp
        self.proc = subprocess.Popen(
            [str(binary), "-M", "virt", "-cpu", "cortex-a57", "-smp", str(smp), "-m", "128", "-S",
             "-display", "none", "-nodefaults", "-nic", "none", "-qmp", f"unix:{qmp},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def ready(self) -> None:
        with trio.fail_after(30):
            while not self.qmp.is_socket():
                assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
                await trio.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def qemu(qemu_binary: Path, tmp_path: Path) -> Iterator[Callable[[int], Qemu]]:
    started: list[Qemu] = []

    def start(smp: int = 4) -> Qemu:
        q = Qemu(qemu_binary, tmp_path / "qmp.sock", smp)
        started.append(q)
        return q

    yield start
    for q in started:
        q.kill()


def qmp_config(tmp_path: Path) -> str:
    """A VM whose daemon watches the test QEMU's QMP socket; 0x82000001 answers x1 = 7."""
    return f"""\
vm: q
qmp: {tmp_path / "qmp.sock"}
handlers:
  hello: {{type: static, options: {{regs: [0, 7]}}}}
rules:
  - {{match: 0x82000001, action: hello}}
"""


def hello(mpidrs: list[int]) -> wire.Hello:
    return wire.Hello("q", wire.Accel.TCG, 40,
                      tuple(wire.VcpuInfo(i, m, i == 0) for i, m in enumerate(mpidrs)),
                      (wire.RamRegion(0x4000_0000, 128 << 20),))


async def test_cross_check_events_and_run_state(qemu: Callable[[int], Qemu]) -> None:
    vm = qemu(4)
    await vm.ready()
    events: list[tuple[str, dict[str, Any]]] = []
    watcher = QmpWatcher(str(vm.qmp), "q", on_event=lambda name, data: events.append((name, data)))
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
        with trio.fail_after(10):
            while [e for e, _ in events] != ["RESUME", "STOP", "RESET"]:
                await trio.sleep(0.05)
        assert watcher.run_status == "paused"
        vm.kill()
        with trio.fail_after(10):
            while watcher.state is QmpState.RUNNING:
                await trio.sleep(0.05)
        assert watcher.state in (QmpState.DISCONNECTED, QmpState.CONNECTING)
        nursery.cancel_scope.cancel()


async def test_daemon_keeps_serving_calls_when_qmp_goes_away(
        qemu: Callable[[int], Qemu], make_config: Callable[[str], VmConfig], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hvcproxyd")
    vm = qemu(2)
    await vm.ready()
    config = make_config(qmp_config(tmp_path))
    answers: list[int] = []
    qemu_status: list[dict[str, Any]] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        answers.append((await cpu.call(0x8200_0001))[1])
        with trio.fail_after(10):
            while "QMP confirms" not in caplog.text:
                await trio.sleep(0.05)
        qemu_status.append(service.status()["qemu"])
        vm.kill()
        with trio.fail_after(10):
            while daemon.qmp is not None and daemon.qmp.state is QmpState.RUNNING:
                await trio.sleep(0.05)
        qemu_status.append(service.status()["qemu"])
        answers.append((await cpu.call(0x8200_0001))[1])

    async with trio.open_nursery() as nursery:
        service = Service(config)
        daemon = service.daemon
        await nursery.start(daemon.serve)
        sim = Simulator(config.socket, n_vcpus=2, name="q", boot=boot)
        await sim.run(timeout=30)
        sim.close()
        daemon.stop()
    assert answers == [7, 7]
    # `hvcproxyd status` shows QEMU's run state (-S: prelaunch) and that QMP went away.
    assert qemu_status[0]["run_state"] == "prelaunch" and qemu_status[0]["qmp_state"] == "running"
    assert qemu_status[1]["qmp_state"] in ("disconnected", "connecting")
    assert "QMP confirms the VMM's 2 vCPUs" in caplog.text
    assert "QMP connection lost; still serving calls" in caplog.text


async def test_a_vmm_that_qemu_contradicts_is_refused(
        qemu: Callable[[int], Qemu], make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    vm = qemu(2)
    await vm.ready()
    config = make_config(qmp_config(tmp_path))
    async with trio.open_nursery() as nursery:
        daemon = Daemon(config)
        await nursery.start(daemon.serve)
        sim = Simulator(config.socket, n_vcpus=3, name="q")  # QEMU has 2
        await sim._connect(reconnect=False)  # the handshake itself succeeds: QMP is checked after it
        with trio.fail_after(20):
            refusal = await sim._next_event()
        sim.close()
        daemon.stop()
    assert isinstance(refusal, wire.Error) and refusal.code is wire.ErrorCode.REFUSED
    assert "disagrees with QEMU's QMP view" in refusal.reason and "vCPU 2: VMM says MPIDR 0x2" in refusal.reason
