"""The KVM side of the series cannot run on this x86_64 host; it must at least
compile (CONFIG_KVM, arm64 uAPI headers): integration/qemu/kvm-check.sh."""

from __future__ import annotations

import subprocess
from pathlib import Path

from qemu_harness import BUILD_TIMEOUT, INTEGRATION


def test_kvm_code_compiles(qemu_bin: Path) -> None:
    proc = subprocess.run([str(INTEGRATION / "qemu" / "kvm-check.sh")], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "target/arm/kvm.c: OK" in proc.stderr
    assert "hw/arm/hvc-forwarder.c: OK" in proc.stderr
    assert "target/arm/arm-powerctl.c: OK" in proc.stderr
