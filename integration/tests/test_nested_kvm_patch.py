"""The KVM series (integration/kernel/patches: KVM_REG_ARM_SMCCC_VERSION) in an L1 host.

``integration/kernel/build-l1-kernel.sh`` builds the L1 host kernel from Debian's
6.12 source with the series applied, and the series' KVM selftests linked
statically (cached by content hash).  The module boots that kernel as L1 with
``nested.L1Host`` (the stock L1 initramfs of ``build-l1.sh``, plus a second cpio
archive with the selftests under ``/opt/kvm-selftests``: Linux unpacks
concatenated archives in order) and runs them inside L1, under its KVM:

- ``smccc_version``: the register defaults to SMCCC v1.1 (GET_ONE_REG and the
  guest's own SMCCC_VERSION call), v1.2 set before the first run is what the
  guest reads, EBUSY once the VM has run, EINVAL for unknown versions, listed by
  KVM_GET_REG_LIST, x4-x17 preserved across the call;
- ``get-reg-list``: the blessed register list, which the series extends with
  KVM_REG_ARM_FW_REG(4).

Each selftest's output is kept in the module's directory, with L1's console log.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from nested import L1Host, build_l1
from qemu_harness import _run_build

#: A cold kernel build on 2 busy cores; a cache hit takes a second.
KERNEL_BUILD_TIMEOUT = 90 * 60
BOOT_TIMEOUT = 600.0
SELFTEST_TIMEOUT = 900.0
SELFTEST_DIR = "/opt/kvm-selftests"
SELFTESTS = ("smccc_version", "get-reg-list")


@pytest.fixture(scope="module")
def l1_kernel() -> Path:
    """build-l1-kernel.sh's output: Image, config and the static selftests."""
    return _run_build("kernel/build-l1-kernel.sh", timeout=KERNEL_BUILD_TIMEOUT)


@pytest.fixture(scope="module")
def l1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's work and log directory (pytest keeps the last runs' base temp)."""
    return tmp_path_factory.mktemp("l1-kvm-patch")


def selftests_cpio(kernel_dir: Path, work: Path) -> bytes:
    """A newc archive with the selftests under SELFTEST_DIR."""
    root = work / "selftests-root"
    dest = root / SELFTEST_DIR.lstrip("/")
    dest.mkdir(parents=True)
    for name in SELFTESTS:
        shutil.copy(kernel_dir / name, dest / name)
        (dest / name).chmod(0o755)
    names = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    return subprocess.run(["cpio", "-o", "-H", "newc", "--owner=0:0", "--quiet"], cwd=root, input=names,
                          check=True, capture_output=True).stdout


@pytest.fixture(scope="module")
def l1(qemu_bin: Path, l1_kernel: Path, l1_dir: Path) -> Iterator[L1Host]:
    """L1 = the patched kernel + the stock L1 initramfs + the selftests."""
    stock = build_l1()
    stock_initrd = stock / "initramfs.cpio"
    assert stock_initrd.exists(), f"build-l1.sh left no uncompressed initramfs in {stock}"
    image = l1_dir / "image"
    image.mkdir()
    (image / "vmlinuz").symlink_to(l1_kernel / "Image")
    with (image / "initramfs.cpio").open("wb") as out:
        with stock_initrd.open("rb") as f:
            shutil.copyfileobj(f, out)
        out.write(selftests_cpio(l1_kernel, l1_dir))
    with L1Host(qemu_bin, image, l1_dir, boot_timeout=BOOT_TIMEOUT) as host:
        yield host
        print(f"--- L1 console ({host.log_path}) ---\n{host.console_log()[-8000:]}")


def run_selftest(l1: L1Host, name: str) -> str:
    status, out = l1.run(f"{SELFTEST_DIR}/{name}", timeout=SELFTEST_TIMEOUT)
    (l1.workdir / f"{name}.out").write_text(out)
    print(f"--- {name} in L1 (exit {status}) ---\n{out}")
    assert status == 0, f"{name} failed in L1 (exit {status}):\n{out}"
    return out


def test_l1_runs_the_patched_kernel_with_kvm(l1: L1Host, l1_kernel: Path) -> None:
    info = (l1_kernel / "info").read_text()
    print(f"L0+L1 boot: {l1.boot_seconds:.1f}s\n{info}" + (l1.workdir / "l1-report.txt").read_text())
    assert l1.report["uname"].startswith("6.12."), l1.report
    assert "VHE mode initialized successfully" in l1.report["kvm_mode"], l1.report
    assert "started at EL2" in l1.report["current_el_hint"], l1.report
    assert l1.report["dev_kvm"] == "yes", l1.report
    assert "ttyAMA1" in l1.report.get("tty", ""), l1.report


def test_smccc_version_selftest(l1: L1Host) -> None:
    out = run_selftest(l1, "smccc_version")
    for line in ("ok 1 default v1.1, fixed once the VM has run",
                 "ok 2 v1.2 set before the first run, VM-wide",
                 "ok 3 unknown versions refused",
                 "ok 4 listed by KVM_GET_REG_LIST"):
        assert line in out, out
    assert "# Totals: pass:4 fail:0" in out, out


def test_get_reg_list_selftest(l1: L1Host) -> None:
    out = run_selftest(l1, "get-reg-list")
    assert "Test Assertion Failure" not in out, out
    # Printed only as a new (unblessed) or a missing register.
    assert "KVM_REG_ARM_FW_REG(4)" not in out, out
