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

Then the proof issue 14 asks for, under that KVM: the client kernel
(CONFIG_ARM_FFA_TRANSPORT) as L2, its FF-A range forwarded to hvcproxyd through
the serial line (config/ffa.yaml).  With the forwarder's smccc-version=1.2, QEMU
sets the register, Linux reports SMCCC 1.2 and its FF-A driver probes the
daemon's endpoint and finds the partitions; with the default, KVM's 1.1, the
driver declines, as it does on every KVM today.

Each selftest's output is kept in the module's directory, with L1's console log.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import nested
import pytest
from linux_clients import ffa_config
from nested import Job, L1Host, build_l1
from qemu_harness import Daemon, _run_build

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


def payload_cpio(files: dict[str, Path], work: Path) -> bytes:
    """A newc archive with ``files`` (path in L1 -> file here), executable."""
    root = work / "payload-root"
    for dest, src in files.items():
        target = root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, target)
        target.chmod(0o755)
    names = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
    return subprocess.run(["cpio", "-o", "-H", "newc", "--owner=0:0", "--quiet"], cwd=root, input=names,
                          check=True, capture_output=True).stdout


@pytest.fixture(scope="module")
def line_adapter(l1_dir: Path) -> Iterator[Path]:
    """The daemon's socket, where the line adapter connects for each HELLO from L1."""
    with nested.line_adapter(l1_dir / "line.sock", l1_dir / "vm.sock", l1_dir / "line-adapter.log") as sock:
        yield sock


@pytest.fixture(scope="module")
def l1(qemu_bin: Path, l1_kernel: Path, l1_dir: Path, line_adapter: Path) -> Iterator[L1Host]:
    """L1 = the patched kernel + the stock L1 initramfs + the selftests and the
    client kernel (CONFIG_ARM_FFA_TRANSPORT) for L2."""
    client = _run_build("linux/build-kernel.sh", timeout=KERNEL_BUILD_TIMEOUT)
    payload = {f"{SELFTEST_DIR}/{name}": l1_kernel / name for name in SELFTESTS}
    payload |= {"/l2/client/Image": client / "Image", "/l2/client/initramfs.cpio.gz": client / "initramfs.cpio.gz"}
    stock = build_l1(_run_build("nested/build-qemu-arm64.sh"))
    stock_initrd = stock / "initramfs.cpio"
    assert stock_initrd.exists(), f"build-l1.sh left no uncompressed initramfs in {stock}"
    image = l1_dir / "image"
    image.mkdir()
    (image / "vmlinuz").symlink_to(l1_kernel / "Image")
    with (image / "initramfs.cpio").open("wb") as out:
        with stock_initrd.open("rb") as f:
            shutil.copyfileobj(f, out)
        out.write(payload_cpio(payload, l1_dir))
    with L1Host(qemu_bin, image, l1_dir, line=l1_dir / "line.sock", boot_timeout=BOOT_TIMEOUT) as host:
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


#: The client kernel as L2 under L1's KVM, its FF-A range forwarded to hvcproxyd
#: through the line (config/ffa.yaml); {opts} adds hvc-forwarder properties.
L2_FFA = ("timeout 500 qemu-system-aarch64 -M virt -accel kvm -cpu host -smp 2 -m 512 -nodefaults"
          " -no-user-config -display none -monitor none -nic none -serial mon:stdio"
          " -chardev serial,id=fw,path=/dev/ttyAMA1 -object hvc-forwarder,id=hf0,chardev=fw,vm-name=linux{opts}"
          " -kernel /l2/client/Image -initrd /l2/client/initramfs.cpio.gz"
          " -append 'console=ttyAMA0 rdinit=/init panic=-1'")
FFA_BOOT_TIMEOUT = 600.0


def _ffa_guest(l1: L1Host, start_daemon: Callable[..., Daemon], line_adapter: Path, workdir: Path,
               opts: str) -> tuple[Daemon, str, int, dict[str, tuple[int, str]], Job]:
    config, vm_id, offered = ffa_config(workdir)
    daemon = start_daemon(config=config, socket=line_adapter, qmp=False)
    job = l1.start(L2_FFA.format(opts=opts), stdin=True)
    job.expect(r"^HVCTEST: ready", timeout=FFA_BOOT_TIMEOUT)
    return daemon, job.output(), vm_id, offered, job


def _power_off(job: Job) -> None:
    job.send("poweroff\n")
    status, out = job.wait(timeout=120)
    assert status == 0, out[-4000:]


def test_ffa_driver_probes_under_kvm_with_smccc_1_2(l1: L1Host, start_daemon: Callable[..., Daemon],
                                                    line_adapter: Path, workdir: Path) -> None:
    """smccc-version=1.2: QEMU sets KVM_REG_ARM_SMCCC_VERSION, Linux reports SMCCC 1.2
    and its FF-A driver probes hvcproxyd's FF-A endpoint through the forwarded range,
    finding the configured partitions; a direct message to echo round-trips, and a
    notification echo raises arrives by its interrupt: SGI 8, which QEMU makes
    pending in KVM's vGICv3 (GICR_ISPENDR0, with every vCPU out of KVM_RUN)."""
    daemon, out, vm_id, offered, job = _ffa_guest(l1, start_daemon, line_adapter, workdir, ",smccc-version=1.2")
    try:
        assert "SMC Calling Convention v1.2" in out, out
        assert "ARM FF-A: Driver version 1.1" in out, out
        assert "ARM FF-A: Firmware version 1.2 found" in out, out
        assert "failed to setup partitions" not in out and "No partitions found" not in out, out
        # A direct message to the echo partition round-trips (integration/linux/ffa-echo-test).
        assert re.search(r"^HVCTEST: klog ffa-echo-test: reply data0=0xec40ffa0d0d0e0e0 .* ok$", out, re.MULTILINE), out
        assert "Notification setup failed" not in out, out
        assert re.search(r"^HVCTEST: klog ffa-echo-test: notification 4 received on cpu \d+$", out, re.MULTILINE), out
        job.send("sh grep -H . /sys/bus/arm_ffa/devices/*/uuid /sys/bus/arm_ffa/devices/*/partition_id\n")
        job.expect(r"^HVCTEST: end sh .* rc=\d+", timeout=120)
        found: dict[str, dict[str, str]] = {}
        for m in re.finditer(r"^HVCTEST: out /sys/bus/arm_ffa/devices/([^/]+)/(uuid|partition_id):(\S+)$",
                             job.output(), re.MULTILINE):
            found.setdefault(m[1], {})[m[2]] = m[3]
        got = {(int(attrs["partition_id"], 0), attrs["uuid"]) for attrs in found.values()}
        host = (vm_id, "00000000-0000-0000-0000-000000000000")  # the driver's own device
        assert got == {*offered.values(), host}, (job.output()[-3000:], offered)
        log = daemon.log
        order = [log.find(name) for name in ("FFA_VERSION", "FFA_ID_GET", "FFA_RXTX_MAP64", "FFA_PARTITION_INFO_GET",
                                             "FFA_RX_RELEASE")]
        assert all(i >= 0 for i in order) and order == sorted(order), log[-4000:]
    finally:
        _power_off(job)


def _monitor(job: Job, command: str, until: str, timeout: float = 300.0) -> str:
    """Run an HMP command on the L2 QEMU's monitor (-serial mon:stdio: Ctrl-A c
    switches the console to it and back); the output up to ``until``."""
    start = len(job.output())
    job.send("\x01c")
    job.send(command + "\n")
    job.expect(until, timeout=timeout, count=len(re.findall(until, job.output(), re.MULTILINE)) + 1)
    job.send("\x01c")
    return job.output()[start:]


def test_ffa_survives_a_migration_under_kvm(l1: L1Host, start_daemon: Callable[..., Daemon],
                                            line_adapter: Path, workdir: Path) -> None:
    """A guest whose FF-A driver is bound migrates to a new QEMU under KVM (to a file
    in L1 and back in with -incoming): KVM_REG_ARM_SMCCC_VERSION (1.2) travels with
    the other firmware registers, the daemon's FF-A state (the mapped RX/TX buffers,
    the negotiated version) in the forwarder's section, and a new direct message
    from the guest round-trips on the destination."""
    daemon, out, _, _, job = _ffa_guest(l1, start_daemon, line_adapter, workdir, ",smccc-version=1.2")
    assert re.search(r"^HVCTEST: klog ffa-echo-test: reply .* ok$", out, re.MULTILINE), out
    mig = _monitor(job, 'migrate "exec:cat > /tmp/l2.mig"', r"^\(qemu\) ")
    assert "rror" not in mig, mig
    status = _monitor(job, "info migrate", r"^Migration status: \w+")
    assert "Migration status: completed" in status, status
    job.send("\x01cquit\n")
    code, _ = job.wait(timeout=120)
    assert code == 0, job.output()[-3000:]
    daemon.wait_log(r"state saved for the VMM")

    dest = l1.start(L2_FFA.format(opts=",smccc-version=1.2") + ' -incoming "exec:cat /tmp/l2.mig"', stdin=True)
    try:
        daemon.wait_log(r"state loaded from the VMM", timeout=300)
        dest.send("\n")
        dest.send("sh rmmod ffa_echo_test; insmod /lib/modules/ffa_echo_test.ko\n")
        dest.expect(r"^HVCTEST: end sh rmmod .* rc=0", timeout=300)
        # The destination's console: a new probe of the echo partition, and its direct message.
        assert re.search(r"ffa-echo-test: probe partition .*\n(.*\n)*.*ffa-echo-test: reply .* ok", dest.output()), \
            dest.output()[-4000:]
        assert re.search(r"ffa-echo-test: notification 4 received on cpu \d+", dest.output()), dest.output()[-4000:]
        dest.send("dmesg SMC Calling Convention\n")
        dest.expect(r"^HVCTEST: end dmesg .* rc=\d+", timeout=120)
        assert "SMC Calling Convention v1.2" in dest.output(), dest.output()[-3000:]
        assert re.search(r"vcpu\d+ HVC 0x[8c]400006f ", daemon.log.split("state loaded")[-1]), \
            daemon.log[-4000:]
    finally:
        _power_off(dest)


def test_ffa_driver_declines_with_kvms_default_smccc_1_1(l1: L1Host, start_daemon: Callable[..., Daemon],
                                                         line_adapter: Path, workdir: Path) -> None:
    """Without smccc-version the patched KVM still says 1.1, as every KVM does today,
    and Linux's FF-A driver gives up before its first call."""
    daemon, out, _, _, job = _ffa_guest(l1, start_daemon, line_adapter, workdir, "")
    try:
        assert "SMC Calling Convention v1.1" in out, out
        assert "ARM FF-A" not in out, out
        assert "FFA_VERSION" not in daemon.log, daemon.log[-4000:]
    finally:
        _power_off(job)
