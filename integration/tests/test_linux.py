"""Debian's arm64 kernel with a busybox initramfs (integration/linux/) on four
vCPUs under TCG, PSCI served entirely by hvcproxyd's psci handler."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from qemu_harness import Daemon, Qemu, StartDaemon, StartQemu

LINUX_BOOT_TIMEOUT = 240



def _boot(start_qemu: StartQemu, linux_guest: Path, daemon: Daemon, cmdline: str = "",
          machine: str = "virt") -> Qemu:
    return start_qemu(
        "-kernel", str(linux_guest / "vmlinuz"), "-initrd", str(linux_guest / "initramfs.cpio.gz"),
        "-append", f"console=ttyAMA0 rdinit=/init panic=-1 {cmdline}".strip(),
        forwarder=daemon.socket, smp=4, memory="512M", machine=machine)


def _assert_boot_ok(out: str) -> None:
    """All four CPUs came up through the daemon, and CPU 2 went offline and back."""
    assert "HVCTEST: online=0-3" in out, out
    assert re.search(r"HVCTEST: cpu2 offline ok value=0 online=0-1,3\b", out), out
    assert re.search(r"HVCTEST: cpu2 online ok value=1 online=0-3\b", out), out
    assert "psci: PSCIv1.1 detected in firmware" in out, out
    assert "SMC Calling Convention v1.2" in out, out  # QEMU answers SMCCC_VERSION under TCG


def test_linux_smp_hotplug_and_poweroff(start_daemon: StartDaemon, start_qemu: StartQemu,
                                        linux_guest: Path) -> None:
    daemon = start_daemon()
    q = _boot(start_qemu, linux_guest, daemon, "hvctest=poweroff")
    rc = q.wait(LINUX_BOOT_TIMEOUT)
    out = q.output()
    assert rc == 0, f"QEMU exited with {rc}:\n{out[-6000:]}"
    _assert_boot_ok(out)
    assert "HVCTEST: poweroff -f" in out
    log = daemon.log.lower()
    for fid in (0xC4000003, 0x84000002, 0x84000008):  # CPU_ON, CPU_OFF, SYSTEM_OFF
        assert f"{fid:#010x}" in log, f"no {fid:#010x} in the daemon log:\n{daemon.log[-4000:]}"


@pytest.mark.parametrize("mode", ["nvhe", "protected"])
def test_linux_at_el2_brings_its_secondaries_up_at_el2(start_daemon: StartDaemon, start_qemu: StartQemu,
                                                      linux_guest: Path, mode: str) -> None:
    """With EL2 (virtualization=on) an nVHE or protected-mode (pKVM) Linux calls
    CPU_ON from EL1 and needs its secondaries at EL2, where QEMU's own PSCI and
    TF-A start them: through hvcproxyd all four come online."""
    daemon = start_daemon()
    q = _boot(start_qemu, linux_guest, daemon, f"kvm-arm.mode={mode} hvctest=poweroff",
              machine="virt,virtualization=on")
    rc = q.wait(LINUX_BOOT_TIMEOUT)
    out = q.output()
    assert rc == 0, f"QEMU exited with {rc}:\n{out[-6000:]}"
    assert "CPU: All CPU(s) started at EL2" in out, out[-6000:]
    assert "HVCTEST: online=0-3" in out, out[-6000:]
    assert "0xc4000003" in daemon.log.lower(), daemon.log[-3000:]  # the CPU_ONs were the daemon's


def test_linux_reboot_resets_vm(start_daemon: StartDaemon, start_qemu: StartQemu, linux_guest: Path) -> None:
    daemon = start_daemon()
    q = _boot(start_qemu, linux_guest, daemon)
    q.wait_output(r"HVCTEST: ready for a command", timeout=LINUX_BOOT_TIMEOUT)
    q.send("reboot\n")
    # The VM resets and boots again: the daemon serves the second boot as well.
    q.wait_output(r"HVCTEST: ready for a command", timeout=LINUX_BOOT_TIMEOUT, count=2)
    out = q.output()
    assert out.count("HVCTEST: init start") == 2, out
    assert out.count("HVCTEST: online=0-3") == 2, out
    q.send("poweroff\n")
    rc = q.wait(60)
    assert rc == 0, q.output()[-4000:]
    log = daemon.log.lower()
    assert "0x84000009" in log, f"the daemon did not see SYSTEM_RESET:\n{daemon.log[-4000:]}"
    daemon.wait_log(r"VMM event VM_RESET", timeout=5)


def test_daemon_restart_while_guest_waits(start_daemon: StartDaemon, start_qemu: StartQemu,
                                          linux_guest: Path) -> None:
    """A restarted daemon gets HELLO(RECONNECT) with the filter in force and serves the
    guest's next PSCI calls (CPU_OFF of the secondaries, then SYSTEM_OFF)."""
    daemon = start_daemon()
    q = _boot(start_qemu, linux_guest, daemon)
    q.wait_output(r"HVCTEST: ready for a command", timeout=LINUX_BOOT_TIMEOUT)
    daemon.stop()
    q.wait_output(r"lost the connection to the handler", timeout=20, stderr=True)
    daemon2 = start_daemon()
    daemon2.wait_log(r"VMM attached", timeout=30)
    q.wait_output(r"reconnected to the handler", timeout=20, stderr=True)
    q.send("poweroff\n")
    rc = q.wait(60)
    assert rc == 0, q.output()[-4000:]
    log = daemon2.log.lower()
    assert "0x84000008" in log, f"the new daemon did not see SYSTEM_OFF:\n{daemon2.log[-4000:]}"
