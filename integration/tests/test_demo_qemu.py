"""`./dev demo --qemu`: the README's demo against the real patched QEMU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from qemu_harness import REPO


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "integration" / "demo_qemu.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)


def test_demo_boots_the_smp_guest_under_the_patched_qemu(qemu_bin: Path, guests: Path) -> None:
    done = run_demo(dict(os.environ))
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:] + out[-3000:]
    assert "QEMU exited with status 0" in out
    assert out.count("PSCI_CPU_ON64(") >= 3 and "guest: SMP DONE" in out
    assert re.search(r"vcpu0 HVC 0x84000008 PSCI_SYSTEM_OFF\(.*\) -> psci: does not return \+SYSTEM_OFF\(vcpu0\)", out)


def test_demo_says_how_to_build_what_is_missing(tmp_path: Path) -> None:
    done = run_demo(dict(os.environ, HVCPROXYD_CACHE=str(tmp_path)))
    assert done.returncode == 1
    assert "the patched QEMU is not built" in done.stderr and "integration/qemu/build.sh" in done.stderr
