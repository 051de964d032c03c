"""Helpers for the operations tests: a small power handler, a config with every
operations key pointed into a test directory, and ``hvcproxyd run`` as a real
subprocess for the tests that need signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvcproxyd.handlers import Handler, Result
from hvcproxyd.ops.control import request_status
from hvcproxyd.wire import EFFECT_AARCH64, Call, Effect, EffectKind

REPO = Path(__file__).resolve().parent.parent
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


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class DaemonProcess:
    """``python -m hvcproxyd run CONFIG`` with its log in a file, stopped by SIGTERM."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = config.with_suffix(".log")
        # The repository on the path, for handlers loaded as ``tests.ops_support:Power``.
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DaemonProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "hvcproxyd", "--log-format", "text", "run",
                                          str(self.config)], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def status(self, control: Path) -> dict[str, Any]:
        return request_status(control)

    def wait_ready(self, control: Path) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"hvcproxyd exited with {self.proc.returncode}:\n{self.log}")
            try:
                return request_status(control)
            except Exception:
                return None
        return wait_for(ready, what=f"the control socket {control}")  # type: ignore[no-any-return]

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
