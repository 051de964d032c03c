"""Helpers for the operations tests: a small power handler and a config with every
operations key pointed into a test directory.  ``hvcproxyd run`` as a subprocess
is tests/process.py's DaemonProcess."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from hvcproxyd.handlers import Handler, Result
from hvcproxyd.wire import EFFECT_AARCH64, Call, Effect, EffectKind

from .process import REPO

__all__ = ["CPU_OFF", "CPU_ON64", "HELLO", "MINUS3", "REPO", "SIP_UID", "UNRULED", "Power", "ops_config"]

CPU_ON64, CPU_OFF = 0xC400_0003, 0x8400_0002
HELLO, SIP_UID, UNRULED, MINUS3 = 0x8200_0001, 0x8200_FF01, 0x8200_0006, 0x8200_0003


class Power(Handler):
    """Just enough PSCI to move power states: CPU_ON and CPU_OFF, as effects."""

    async def handle(self, call: Call) -> Result:
        if call.func_id == CPU_ON64:
            target = self.vm.vcpu_by_mpidr(call.args[0])
            if target is None:
                return Result.of(-2)
            return Result.of(0, effects=(Effect(EffectKind.CPU_ON, target, call.args[1], call.args[2],
                                                eflags=EFFECT_AARCH64),))
        if call.func_id == CPU_OFF:
            return Result.of(0, effects=(Effect(EffectKind.CPU_OFF, call.vcpu),))
        return Result.of(-1)


def ops_config(directory: Path, *, extra: str = "", hello: int = 1, more_handlers: str = "") -> str:
    """A VM with a static, a discovery and a power handler; sockets under ``directory``."""
    return textwrap.dedent(f"""\
        vm: opsvm
        socket: {directory}/opsvm.sock
        vmm: {{uid: {os.getuid()}}}
        handlers:
          hello: {{type: static, options: {{regs: [0, {hello}]}}}}
          minus3: {{type: static, options: {{regs: [0xFFFFFFFFFFFFFFFD]}}}}
          ident:
            type: discovery
            options: {{uid: 5f9b0a5e-6f1c-4a8e-9d7e-2b3c4d5e6f70, call_count: 2}}
          power: {{type: "tests.ops_support:Power"}}
        {textwrap.indent(more_handlers, "  ").rstrip()}
        rules:
          - {{match: [0x8200FF00, 0x8200FF03], action: ident}}
          - {{match: 0x82000001, action: hello}}
          - {{match: 0x82000003, action: minus3}}
          - {{match: 0x82000006, conduit: smc, action: deny}}
          - {{match: psci, action: power}}
        """) + textwrap.dedent(extra)
