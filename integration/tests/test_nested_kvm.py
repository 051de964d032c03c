"""The KVM path of the QEMU series, for real: L2 guests under ``-accel kvm -cpu host``
in the emulated arm64 KVM host L1 (integration/nested/), their calls served by
hvcproxyd on this machine.

Every forwarded call travels L2 -> L1's KVM (the SMCCC filter, KVM_EXIT_HYPERCALL)
-> the patched QEMU in L1 -> its hvc-forwarder on ``-chardev serial,path=/dev/ttyAMA1``
-> L0's second UART -> integration/nested/line_adapter.py -> hvcproxyd, and back.
No fd crosses that line, so the daemon reaches guest memory through MEM_READ and
MEM_WRITE.  PSCI is forwarded (integration/configs/guests.yaml), so KVM's in-kernel
PSCI is bypassed and every CPU_ON, CPU_OFF and CPU_SUSPEND of the guests is the
daemon's.

One L1 boot and one line adapter serve the module; each test starts its own daemon
on the socket the adapter connects to.  ``HVCIT_KEEP=1`` keeps the logs (L1's
console, its report, the daemons', the adapter's).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nested
import pytest
from nested import Job, L1Host, build_l1
from qemu_harness import CONFIGS, GUESTS_CONFIG, REPO, Daemon, StartDaemon, _run_build, scratch_dir
from transcripts import (
    NOT_SUPPORTED,
    assert_daemon_log_clean,
    assert_daemon_saw,
    assert_forwarded_transcript,
    assert_power_cycles,
    assert_smp_transcript,
    assert_standby_waited,
    secondary_endianness,
    vendor_calls,
)

L1_BOOT_TIMEOUT = 600.0
L2_TIMEOUT = 300.0
LINUX_TIMEOUT = 600.0
#: L2's QEMU in L1: KVM, the forwarder on L1's second UART, the guest's console on L1's.
L2_QEMU = ("qemu-system-aarch64 -accel kvm -cpu host -nodefaults -no-user-config -display none"
           " -monitor none -nic none -serial mon:stdio -chardev serial,id=fw,path=/dev/ttyAMA1"
           " -object hvc-forwarder,id=hf0,chardev=fw,vm-name=guests")


@pytest.fixture(scope="module")
def nested_dir() -> Iterator[Path]:
    with scratch_dir("hvcit-kvm-") as d:
        yield d


@pytest.fixture(scope="module")
def line_adapter(nested_dir: Path) -> Iterator[Path]:
    """The daemon's socket, where the line adapter connects for each HELLO from L1."""
    with nested.line_adapter(nested_dir / "line.sock", nested_dir / "vm.sock", nested_dir / "line-adapter.log") as s:
        yield s


@pytest.fixture(scope="module")
def l1(qemu_bin: Path, nested_dir: Path, line_adapter: Path) -> Iterator[L1Host]:
    image = build_l1(_run_build("nested/build-qemu-arm64.sh"))
    with L1Host(qemu_bin, image, nested_dir, line=nested_dir / "line.sock", boot_timeout=L1_BOOT_TIMEOUT) as host:
        assert "VHE mode initialized successfully" in host.report.get("kvm_mode", ""), host.report
        assert host.report.get("qemu") == "yes", host.report
        yield host
        print(f"--- L1 console ({host.log_path}) ---\n{host.console_log()[-6000:]}")


@pytest.fixture
def daemon(start_daemon: StartDaemon, line_adapter: Path) -> Daemon:
    """hvcproxyd with the guests' config, where the line adapter connects."""
    return start_daemon(socket=line_adapter, qmp=False)


def _l2(l1: L1Host, guest_args: str, *, smp: int = 1, machine: str = "virt", extra: str = "",
        timeout: float = L2_TIMEOUT) -> str:
    """Run an L2 to its end; its console output.  QEMU must exit with 0."""
    start = time.monotonic()
    status, out = l1.run(f"timeout {int(timeout) - 10} {L2_QEMU} -M {machine} -smp {smp} -m 256 {extra} {guest_args}",
                         timeout=timeout)
    print(f"L2 ({guest_args}, -smp {smp}): exit {status} in {time.monotonic() - start:.1f}s")
    assert status == 0, out
    return out


def _guest(name: str) -> str:
    return f"-kernel /l2/guests/{name}"


def test_l1_report_is_kept(l1: L1Host, daemon: Daemon) -> None:
    """The L1 report (kernel, KVM mode) and the SMCCC filter the L2 QEMU installs in
    KVM (its hvc_fwd_kvm_filter trace), saved with the logs."""
    out = _l2(l1, _guest("calls-hvc.elf"), extra="-trace hvc_fwd_kvm_filter")
    filters = re.findall(r"hvc_fwd_kvm_filter base (0x[0-9a-f]+) count (0x[0-9a-f]+) action (\d) ret (-?\d+)", out)
    report = (l1.workdir / "l1-report.txt").read_text()
    report += "".join(f"kvm_filter: base {b} count {c} action {a} ret {r}\n" for b, c, a, r in filters)
    (l1.workdir / "l1-report.txt").write_text(report)
    # Kept past the run (the module's directory goes unless HVCIT_KEEP=1): the last report.
    kept = Path(os.environ.get("HVCPROXYD_CACHE", Path.home() / ".cache" / "hvcproxyd")) / "nested" / "l1-report.txt"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(report)
    print(f"L1 report (also in {kept}):\n{report}")
    assert re.search(r"^uname: 6\.\d+\.", report, re.MULTILINE), report
    assert "kvm_mode: kvm [1]: VHE mode initialized successfully" in report, report
    installed = {(int(b, 16), int(c, 16), int(a)) for b, c, a, r in filters if r == "0"}
    assert len(installed) == len(filters), filters  # KVM took every range
    # guests.yaml's forwarded SiP calls (two adjacent rules, one range) with their SVE-hinted
    # twin, its denied OEM range with its twin, and PSCI 0.1's denied IDs (not SMCCC: no twin).
    assert {(0xC2000001, 0xFF, 2), (0xC2010001, 0xFF, 2), (0xC3000000, 0x100, 1), (0xC3010000, 0x100, 1),
            (0x84000000, 0x20, 2), (0xC4000000, 0x20, 2), (0x95C1BA5E, 4, 1)} <= installed, filters
    assert len([f for f in filters if int(f[0], 16) & 0xFFFF == 0xBA5E]) == 1, filters


@pytest.mark.parametrize("conduit", ["hvc", "smc"])
def test_calls_under_kvm(l1: L1Host, daemon: Daemon, conduit: str) -> None:
    """HVC and SMC from EL1 (KVM forwards SMC too since 6.4), the SVE-hinted ID, a denied
    range, and SYSTEM_OFF ending the L2 QEMU."""
    out = _l2(l1, _guest(f"calls-{conduit}.elf"))
    assert_forwarded_transcript(out, el=1, conduit=conduit, accel="kvm")
    daemon.wait_log(r"VMM attached")
    assert_daemon_saw(daemon, 0x84000000, 0xC2000001, 0xC2010001, 0xC20000FF, 0xC4000004, 0x84000008)
    log = daemon.log.lower()
    assert "0xc3000001" not in log and "0x80000000" not in log, daemon.log[-4000:]  # denied, and KVM's own
    assert_daemon_log_clean(daemon)


def test_smp_under_kvm(l1: L1Host, daemon: Daemon) -> None:
    """CPU_ON, AFFINITY_INFO and CPU_OFF of every secondary through the daemon's PSCI."""
    assert_smp_transcript(_l2(l1, _guest("smp.elf"), smp=4))
    assert_daemon_log_clean(daemon)


def test_cpu_on_carries_the_callers_endianness_under_kvm(l1: L1Host, daemon: Daemon) -> None:
    """The forwarder sets a big-endian caller's target big-endian before its registers
    go to KVM, as KVM's own PSCI does."""
    assert secondary_endianness(_l2(l1, _guest("endian.elf"), smp=3)) == {1: 1, 2: 0}
    assert_daemon_log_clean(daemon)


def test_kvm_answers_ptp_beside_an_owned_vendor_range(l1: L1Host, start_daemon: StartDaemon,
                                                      line_adapter: Path) -> None:
    """pkvm-memshare owns the vendor-hypervisor range with `except: kvm-ptp`: its
    FEATURES lists PTP under KVM, and KVM's own PTP answers (ptp_kvm keeps working)."""
    daemon = start_daemon(config=CONFIGS / "vendor-ptp.yaml", socket=line_adapter, qmp=False)
    features, ptp = vendor_calls(_l2(l1, _guest("vendor.elf")))
    assert features == 0b11111 and ptp != NOT_SUPPORTED, (hex(features), hex(ptp))
    assert re.search(r"vcpu\d+ HVC 0x86000000 KVM_FUNC_FEATURES.* -> memshare", daemon.log), daemon.log
    assert not re.search(r"vcpu\d+ HVC 0x86000001", daemon.log)  # KVM answered it: never forwarded


def test_linux_ptp_kvm_beside_an_owned_vendor_range(l1: L1Host, start_daemon: StartDaemon,
                                                    line_adapter: Path) -> None:
    """Debian's kernel (PTP_1588_CLOCK_KVM=y) with pkvm-memshare owning the vendor range
    and `except: kvm-ptp`: its KVM services probe sees PTP in the handler's FEATURES,
    and ptp_kvm registers KVM's clock, which KVM itself answers."""
    daemon = start_daemon(config=CONFIGS / "vendor-ptp.yaml", socket=line_adapter, qmp=False)
    job = _boot_linux(l1)
    job.expect(r"HVCTEST: ready for a command", timeout=LINUX_TIMEOUT)
    out = job.output()
    job.send("poweroff\n")
    status, _ = job.wait(timeout=LINUX_TIMEOUT)
    assert status == 0, job.output()[-3000:]
    assert "HVCTEST: kvm_services=hypervisor services detected (0x00000000 0x00000000 0x00000000 0x0000001f)" \
        in out, out
    assert "HVCTEST: ptp=KVM virtual PTP" in out, out
    assert re.search(r"vcpu\d+ HVC 0x86000000 KVM_FUNC_FEATURES.* -> memshare", daemon.log), daemon.log[-3000:]
    assert not re.search(r"vcpu\d+ HVC 0x86000001", daemon.log)  # KVM answered PTP itself


def test_power_cycles_under_kvm(l1: L1Host, daemon: Daemon) -> None:
    """120 power cycles of the secondaries (60 of CPU 1 back to back) with 4 vCPUs:
    no abort, no hang, no lost vCPU (each CPU_ON resets its target with every vCPU out
    of KVM_RUN, arm-powerctl's patch)."""
    assert_power_cycles(_l2(l1, _guest("cycles.elf"), smp=4))
    assert_daemon_log_clean(daemon)


def test_cpu_suspend_standby_waits_under_kvm(l1: L1Host, daemon: Daemon) -> None:
    """A standby CPU_SUSPEND sleeps in L1's kernel (KVM_MP_STATE_SUSPENDED) until the
    virtual timer's interrupt is pending."""
    assert_standby_waited(_l2(l1, _guest("standby.elf"), machine="virt,gic-version=3"))
    assert_daemon_log_clean(daemon)


def _boot_linux(l1: L1Host, cmdline: str = "") -> Job:
    """Debian's kernel as L2 with -smp 4, waiting at its prompt (integration/linux/init)."""
    return l1.start(f"timeout {int(LINUX_TIMEOUT)} {L2_QEMU} -M virt -smp 4 -m 512 -kernel /l2/vmlinuz"
                    f" -initrd /l2/linux-initramfs.cpio.gz -append 'console=ttyAMA0 rdinit=/init panic=-1 quiet"
                    f" {cmdline}'", stdin=True)


def _assert_linux_booted(text: str) -> None:
    assert "HVCTEST: online=0-3" in text, text
    assert re.search(r"HVCTEST: cpu2 offline ok value=0 online=0-1,3\b", text), text
    assert re.search(r"HVCTEST: cpu2 online ok value=1 online=0-3\b", text), text
    assert "HVCTEST: psci=psci: PSCIv1.1 detected in firmware" in text, text  # the daemon's PSCI


def test_linux_under_kvm(l1: L1Host, daemon: Daemon) -> None:
    """Debian's arm64 kernel with -smp 4: all CPUs online through hvcproxyd, CPU 2 off
    and on through sysfs, a reboot in the same QEMU with all CPUs back, a power-off."""
    job = _boot_linux(l1)
    job.expect(r"HVCTEST: ready for a command", timeout=LINUX_TIMEOUT)
    _assert_linux_booted(job.output())
    job.send("reboot\n")
    job.expect(r"HVCTEST: ready for a command", timeout=LINUX_TIMEOUT, count=2)
    second = job.output().split("HVCTEST: reboot -f", 1)[1]
    _assert_linux_booted(second)
    job.send("poweroff\n")
    status, out = job.wait(timeout=120)
    assert status == 0, out
    assert "HVCTEST: poweroff -f" in out, out
    assert_daemon_saw(daemon, 0xC4000003, 0x84000002, 0x84000009, 0x84000008)  # CPU_ON, CPU_OFF, RESET, OFF
    assert_daemon_log_clean(daemon)


def test_daemon_restart_while_l2_runs(l1: L1Host, start_daemon: StartDaemon, line_adapter: Path,
                                      workdir: Path) -> None:
    """The filter is fixed once L2 has run (KVM: EBUSY).  A restarted daemon whose config
    would change it refuses the VM and says why, and the L2 QEMU keeps its calls waiting;
    the daemon with the original config gets HELLO(RECONNECT) with the filter in force,
    accepts it, and serves the guest's next call (the SYSTEM_OFF of its power-off)."""
    first = start_daemon(socket=line_adapter, qmp=False)
    job = _boot_linux(l1)
    job.expect(r"HVCTEST: ready for a command", timeout=LINUX_TIMEOUT)
    _assert_linux_booted(job.output())
    first.stop()
    job.expect(r"lost the connection to the handler", timeout=60)

    changed = workdir / "changed-filter.yaml"
    changed.write_text(GUESTS_CONFIG.read_text().replace("[0xC3000000, 0xC30000FF]", "[0xC3000000, 0xC30000FE]"))
    refusing = start_daemon(changed, socket=line_adapter, qmp=False)
    refusing.wait_log(r"closing VMM connection: the filter in force differs from this config: "
                      r"entry \d+: in force 0xc3000000\+0x100 DENY, config wants 0xc3000000\+0xff DENY",
                      timeout=60)
    job.expect(r"the handler sent ERROR code 3: the filter in force differs", timeout=60)  # FILTER_MISMATCH
    refusing.stop()

    second = start_daemon(socket=line_adapter, qmp=False)
    second.wait_log(r"VMM attached", timeout=60)
    job.expect(r"reconnected to the handler", timeout=60)
    job.send("poweroff\n")
    status, out = job.wait(timeout=180)
    assert status == 0, out
    assert "reconnect" in second.log and "0x84000008" in second.log.lower(), second.log[-4000:]  # SYSTEM_OFF
    assert_daemon_log_clean(second)


def test_smccc_1_2_is_refused_without_the_kvm_patch(l1: L1Host, daemon: Daemon) -> None:
    """Debian's stock KVM cannot be told to report SMCCC 1.2: with smccc-version=1.2
    QEMU refuses to start and names the missing kernel support (issue 14's KVM patch,
    test_nested_kvm_patch.py, adds it)."""
    qemu = L2_QEMU.replace("vm-name=guests", "vm-name=guests,smccc-version=1.2")
    status, out = l1.run(f"timeout 120 {qemu} -M virt -smp 1 -m 128 -kernel /l2/guests/calls-hvc.elf",
                         timeout=L2_TIMEOUT)
    assert status == 1, out
    assert "no KVM_REG_ARM_SMCCC_VERSION firmware register" in out, out
    assert "smccc-version=1.2 needs a host kernel whose KVM lets the VMM raise the version" in out, out
    assert "GUEST" not in out, out  # the guest never ran


def test_arch_range_config_is_refused_before_qemu_starts(workdir: Path) -> None:
    """KVM refuses a filter entry in the Arm architecture range (EEXIST), so the daemon's
    check refuses a config that forwards one, naming the rule."""
    bad = workdir / "arch.yaml"
    bad.write_text(GUESTS_CONFIG.read_text().replace("  - match: 0xC2000001\n",
                                                     "  - match: 0x80000000\n    action: hello\n"
                                                     "  - match: 0xC2000001\n"))
    proc = subprocess.run([sys.executable, "-m", "hvcproxyd", "check", str(bad)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert re.search(rf"{re.escape(str(bad))}:\d+:\d+: error: rules\[1\]\.match: 0x80000000 is in the Arm "
                     r"architecture range .*refuses to filter \(EEXIST\); the only valid action here is kvm", out), out
