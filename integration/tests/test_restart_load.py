"""Nothing lost: a daemon killed (SIGKILL, and once SIGTERM) at random points
under full load from 8 vCPUs, restarted on the same state directory, while the
simulator reconnects as QEMU does.  Every call is answered exactly once, no
answer contradicts an earlier one, and the state at the end is what the calls
made it.

No QEMU, but about ten seconds (six daemon starts), so it sits in this tier.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import trio

from hvcproxyd.cli import main
from hvcproxyd.core import state
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu, default_mpidr
from tests.process import DaemonProcess

CPU_OFF, CPU_ON, AFFINITY_INFO = 0x84000002, 0xC4000003, 0xC4000004
SHARE, UNSHARE = 0xC6000003, 0xC6000004
ENTRY = RAM_BASE + 0x8_0000
PAGES = 16  # per vCPU, two granules apart so no two vCPUs' ranges merge
N_VCPUS = 8
KILLS = 6  # the third is a SIGTERM


def page(vcpu: int, k: int) -> int:
    return RAM_BASE + 0x10_0000 + (vcpu * PAGES + k) * 0x2000


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "load.yaml"
    path.write_text("\n".join([
        "vm: load", f"socket: {tmp_path / 'vm.sock'}", "metrics: false",
        f"state: {{dir: {tmp_path / 'state'}, fsync: batch}}", "versions: {psci: '1.1'}",
        "handlers:", "  psci: {type: psci}", "  ms:", "    type: pkvm-memshare", "    options:",
        f"      socket: {tmp_path / 'ms.sock'}",
        "rules:", "  - {match: psci, action: psci}", "  - {match: kvm-vendor, action: ms}", ""]))
    return path


async def test_restart_under_load(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    sock = tmp_path / "vm.sock"
    daemon = DaemonProcess(config, socket=sock, log_path=tmp_path / "daemon.log").start()
    await trio.to_thread.run_sync(daemon.wait_listening)
    rng = random.Random(int.from_bytes(os.urandom(4)))
    shared: list[set[int]] = [set() for _ in range(N_VCPUS)]
    problems: list[str] = []
    killed = trio.Event()
    answers = 0

    async def memop(cpu: SimVcpu) -> None:
        nonlocal answers
        addr = page(cpu.index, rng.randrange(PAGES))
        mine = shared[cpu.index]
        fid = UNSHARE if addr in mine else SHARE
        x0 = (await cpu.call(fid, addr))[0]
        answers += 1
        if x0 != 0:
            problems.append(f"vCPU {cpu.index}: {'UNSHARE' if fid == UNSHARE else 'SHARE'} {addr:#x} got {x0:#x}")
        elif fid == SHARE:
            mine.add(addr)
        else:
            mine.discard(addr)

    async def secondary(cpu: SimVcpu, x0: int) -> None:
        for _ in range(rng.randrange(5, 40)):
            await memop(cpu)
        await cpu.call(CPU_OFF)

    async def boot(cpu: SimVcpu, x0: int) -> None:
        nonlocal answers
        rounds = 0
        while not killed.is_set() or rounds < 3:
            for t in range(1, N_VCPUS):
                if not sim.vcpus[t].powered_on:
                    # Off by the VMM's word, which follows the daemon's CPU_OFF reply:
                    # anything but SUCCESS contradicts an answer already given.
                    x0 = (await cpu.call(CPU_ON, default_mpidr(t), ENTRY, t))[0]
                    if x0 != 0:
                        problems.append(f"CPU_ON of vCPU {t}, which had turned itself off, got {x0:#x}")
                else:
                    await cpu.call(AFFINITY_INFO, default_mpidr(t), 0)
                answers += 1
                await memop(cpu)
            rounds += 1
        while any(v.powered_on for v in sim.vcpus[1:]):
            await trio.sleep(0.01)  # waits for the secondaries to finish; decides nothing

    async def killer() -> None:
        assert daemon.proc is not None
        served = 0
        for i in range(KILLS):
            if i != 4:  # the fifth lands wherever the restarted daemon is (loading, compacting)
                while len(sim.entries("reconnect")) < served:
                    await trio.sleep(0.01)  # until the VMM is served again; decides nothing
                served = len(sim.entries("reconnect")) + 1
            await trio.sleep(rng.uniform(0.02, 0.3))
            if i == 2:  # SIGTERM before its handler is installed kills it like SIGKILL
                await trio.to_thread.run_sync(daemon.wait_log, "listening on")
            daemon.proc.send_signal(signal.SIGTERM if i == 2 else signal.SIGKILL)
            status = await trio.to_thread.run_sync(daemon.wait)
            daemon.log_path = tmp_path / f"daemon{i}.log"
            assert status == (0 if i == 2 else -signal.SIGKILL), daemon.log[-3000:]
            daemon.start()
        killed.set()

    sim = Simulator(sock, n_vcpus=N_VCPUS, boot=boot, programs={ENTRY: secondary}, reconnect_timeout=30)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            assert await sim.run(timeout=120) == "idle"
    finally:
        sim.close()
        assert daemon.stop() == 0, daemon.log[-3000:]

    assert not problems, problems
    assert not sim.entries("stray-reply"), "a call was answered twice"
    calls = sim.entries("call")
    assert len(calls) >= answers > 100
    assert len(sim.entries("reconnect")) >= KILLS - 1
    assert "state restored" in daemon.log

    # The state as a restart would load it: exactly what the answered calls made.
    out = tmp_path / "export.json"
    assert main(["state", "export", str(config), "-o", str(out)]) == 0
    doc = state.decode(out.read_bytes())
    expected = sorted([addr, 0x1000] for mine in shared for addr in mine)
    assert doc["handlers"]["ms"]["ledger"]["ranges"] == expected
    power = doc["handlers"]["psci"]["power"]
    assert power == {str(v.index): "ON" if v.powered_on else "OFF" for v in sim.vcpus}
    assert power["0"] == "ON" and all(power[str(t)] == "OFF" for t in range(1, N_VCPUS))
