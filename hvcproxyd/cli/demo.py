"""``hvcproxyd demo``: serve the demo config (shipped with the package as
``hvcproxyd/cli/demo.yaml``) in-process and drive it with the VMM simulator,
printing each routed call as it happens."""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

import trio

from ..config import ConfigError
from ..core.vmconfig import VmConfig, load_config
from ..handlers.psci_defs import Fn, Power, Ret
from ..ops.callview import CallView
from ..server.daemon import Daemon
from ..smccc import reg_to_signed
from ..smccc.names import function_name
from ..vmm.simulator import RAM_BASE, Program, Simulator, SimVcpu, TranscriptEntry
from ..wire import Call, Reply
from .registry import int_in, subcommand

SIP_UID, SIP_COUNT, HELLO, PROBE, TRNG_VERSION, PSCI_VERSION = (
    0x8200FF01, 0x8200FF00, 0x82000001, 0x82000042, 0x84000050, 0x84000000)
#: Where the simulated secondaries' code "lives": the program CPU_ON starts.
SECONDARY_ENTRY = RAM_BASE + 0x8_0000


def print_call(call: Call, reply: Reply, handler: str, seconds: float) -> None:
    """The same decoding `hvcproxyd trace` shows, so the demo teaches the trace format."""
    print(f"  {CallView.of(call, reply, handler, seconds).summary()}", flush=True)


def _print_local(entry: TranscriptEntry) -> None:
    if entry.kind == "local":
        func = entry.data["func"]
        print(f"  vcpu{entry.vcpu} --- {func:#010x} {function_name(func) or '-':24} -> "
              f"VMM {entry.data['action'].lower()} (not forwarded)", flush=True)
    elif entry.kind == "print":
        print(f"  vcpu{entry.vcpu} says: {entry.data['text']}", flush=True)


async def demo_boot(cpu: SimVcpu, x0: int) -> None:
    """A guest's first moves: identify the SiP service, use it, probe, hit a denied call."""
    count = (await cpu.call(SIP_COUNT))[0]
    uid = await cpu.call(SIP_UID)
    cpu.print(f"SiP service offers {count} call(s), UID words {' '.join(f'{w:#010x}' for w in uid)}")
    regs = await cpu.call(HELLO, 1, 2, 3)
    cpu.print(f"hello answered {regs[1]:#x}")
    await cpu.call(PROBE, 0xDEAD)
    await cpu.call(TRNG_VERSION)


def smp_programs(n_vcpus: int) -> tuple[Program, dict[int, Program]]:
    """The boot program and the secondaries' program for an SMP boot through PSCI,
    after the SiP calls: version, CPU_ON of every secondary, AFFINITY_INFO, one
    secondary's CPU_OFF watched from the boot vCPU, and SYSTEM_OFF to end the run."""
    reported = trio.Semaphore(0)
    last = n_vcpus - 1

    async def boot(cpu: SimVcpu, x0: int) -> None:
        await demo_boot(cpu, x0)
        version = (await cpu.call(Fn.PSCI_VERSION))[0]
        cpu.print(f"PSCI {version >> 16}.{version & 0xFFFF}; bringing up {last} secondary vCPU(s)")
        for vcpu in cpu.sim.vcpus[1:]:
            ret = reg_to_signed((await cpu.call(Fn.CPU_ON_64, vcpu.mpidr, SECONDARY_ENTRY, 0x100 + vcpu.index))[0])
            if ret != Ret.SUCCESS:
                cpu.print(f"CPU_ON of vCPU {vcpu.index} failed: {Ret(ret).name}")
                return
        for _ in range(last):
            await reported.acquire()
        if last:
            target = cpu.sim.vcpus[last].mpidr
            while (await cpu.call(Fn.AFFINITY_INFO_64, target, 0))[0] != Power.OFF:
                await trio.sleep(0.01)
            cpu.print(f"vCPU {last} reads OFF; powering the VM off")
        await cpu.call(Fn.SYSTEM_OFF)

    async def secondary(cpu: SimVcpu, x0: int) -> None:
        boot_state = Power((await cpu.call(Fn.AFFINITY_INFO, cpu.sim.vcpus[0].mpidr, 0))[0])
        cpu.print(f"up at {SECONDARY_ENTRY:#x} with x0={x0:#x}; boot vCPU is {boot_state.name}")
        reported.release()
        if cpu.index == last:
            await cpu.call(Fn.CPU_OFF)

    return boot, {SECONDARY_ENTRY: secondary}


async def _demo(config: VmConfig, n_vcpus: int) -> str:
    daemon = Daemon(config)
    daemon.vm.observers.append(print_call)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        boot, programs = smp_programs(n_vcpus)
        sim = Simulator(config.socket, n_vcpus=n_vcpus, name=config.name, boot=boot, programs=programs)
        sim.on_record = _print_local
        try:
            reason = await sim.run(timeout=30)
        finally:
            sim.close()
        daemon.stop()
    return reason


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="config to serve (default: the demo config shipped with hvcproxyd)")
    p.add_argument("--vcpus", type=int_in(1, 64), default=4, metavar="N",
                   help="simulated vCPUs, 1..64 (default 4)")


@subcommand("demo", "serve a demo config and drive it with the built-in VMM simulator (no QEMU needed)", _demo_args)
def run_demo(args: argparse.Namespace) -> int:
    with resources.as_file(resources.files(__package__) / "demo.yaml") as shipped, \
            tempfile.TemporaryDirectory(prefix="hvcproxyd-demo-") as tmp:
        path = args.config or shipped
        try:
            config = load_config(path, socket=str(Path(tmp) / "demo.sock"))
        except ConfigError as err:
            print(f"hvcproxyd demo: {path} has errors:\n{err}", file=sys.stderr)
            return 1
        print(f"hvcproxyd demo: serving {path} on {config.socket} to a simulated {args.vcpus}-vCPU VM")
        reason = trio.run(_demo, config, args.vcpus)
    print(f"hvcproxyd demo: the VM stopped ({reason})")
    return 0
