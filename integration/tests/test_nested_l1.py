"""L1, the emulated arm64 KVM host (integration/nested/): Debian's arm64 kernel at
EL2 under TCG in the patched QEMU, with KVM in VHE mode, /dev/kvm and the second
UART (ttyAMA1) that hvcproxyd's line will use.

One L1 boot serves the module.  L1 also runs the arm64 QEMU
(integration/nested/build-qemu-arm64.sh, or HVCIT_QEMU_ARM64=DIR) and a bare-metal
L2 guest under KVM with KVM's own PSCI, the baseline for test_nested_kvm.py, where
hvcproxyd serves the same guests through the line.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nested import L1Host, build_l1
from qemu_harness import _run_build, parse_calls, scratch_dir

BOOT_TIMEOUT = 600.0
L2_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def l1_dir() -> Iterator[Path]:
    """The module's work and log directory (HVCIT_KEEP=1 keeps it)."""
    with scratch_dir("hvcit-l1-") as d:
        yield d


@pytest.fixture(scope="module")
def qemu_bundle() -> Path:
    """The arm64 QEMU for L1: $HVCIT_QEMU_ARM64, else build-qemu-arm64.sh's output."""
    if env := os.environ.get("HVCIT_QEMU_ARM64"):
        return Path(env)
    return _run_build("nested/build-qemu-arm64.sh")


@pytest.fixture(scope="module")
def line_server(l1_dir: Path) -> Iterator[socket.socket]:
    """The host end of L1's ttyAMA1: a listening UNIX socket L0 connects to."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(l1_dir / "line.sock"))
    srv.listen(1)
    srv.settimeout(60)
    with srv:
        yield srv


@pytest.fixture(scope="module")
def l1(qemu_bin: Path, qemu_bundle: Path, l1_dir: Path, line_server: socket.socket) -> Iterator[L1Host]:
    image = build_l1(qemu_bundle)
    with L1Host(qemu_bin, image, l1_dir, line=l1_dir / "line.sock", boot_timeout=BOOT_TIMEOUT) as host:
        yield host
        # The console transcript for the test's log (shown with -rA or on failure).
        print(f"--- L1 console ({host.log_path}) ---\n{host.console_log()[-8000:]}")


def test_l1_kvm_vhe(l1: L1Host) -> None:
    print(f"L0+L1 boot: {l1.boot_seconds:.1f}s\n" + (l1.workdir / "l1-report.txt").read_text())
    assert "VHE mode initialized successfully" in l1.report["kvm_mode"], l1.report
    assert l1.report["uname"].endswith("-arm64"), l1.report
    assert l1.report["cpus"] == "2", l1.report
    assert "started at EL2" in l1.report["current_el_hint"], l1.report


def test_l1_dev_kvm(l1: L1Host) -> None:
    assert l1.report["dev_kvm"] == "yes", l1.report
    assert l1.check("test -c /dev/kvm && echo ok", timeout=30).strip() == "ok"


def test_l1_second_uart(l1: L1Host) -> None:
    # virt's second PL011 (0x9040000), raw for hvcproxyd's binary frames.
    assert "ttyAMA1 9040000.pl011" in l1.report["tty_dev"], l1.report
    assert l1.report["dt_uart"].split() == ["pl011@9000000", "pl011@9040000"], l1.report
    stty = l1.check("stty -F /dev/ttyAMA1 -a", timeout=30)
    for flag in ("-icanon", "-echo", "-opost", "-isig", "-ixon", "-crtscts"):
        assert flag in stty.split(), stty
    # No console or getty on it.
    assert "ttyAMA1" not in l1.report["cmdline"], l1.report
    assert l1.report["consoles"] == "ttyAMA0", l1.report


def test_l1_line_is_binary_clean(l1: L1Host, line_server: socket.socket) -> None:
    """Bytes cross ttyAMA1 <-> L0's second UART <-> the host socket unchanged, both ways
    (NUL, 0xff, LF without CR, XON/XOFF, ^C)."""
    conn, _ = line_server.accept()
    with conn:
        conn.settimeout(60)
        payload = bytes([0x00, 0xFF, 0x0A, 0x0D, 0x11, 0x13, 0x03, 0x7F])
        l1.check("printf '\\000\\377\\n\\r\\021\\023\\003\\177' > /dev/ttyAMA1", timeout=30)
        got = b""
        while len(got) < len(payload):
            chunk = conn.recv(64)
            assert chunk, f"line closed after {got!r}"
            got += chunk
        assert got == payload
        # Host -> L1: a reader on ttyAMA1 first (bytes for a closed tty are dropped).
        l1.check(f"(dd if=/dev/ttyAMA1 bs=1 count={len(payload)} 2>/dev/null | od -An -tx1 > /tmp/rx.tmp;"
                 " mv /tmp/rx.tmp /tmp/rx) & sleep 1", timeout=30)
        conn.sendall(payload)
        out = l1.check("for i in $(seq 100); do [ -e /tmp/rx ] && break; sleep 0.2; done; cat /tmp/rx", timeout=60)
        assert out.split() == [f"{b:02x}" for b in payload], out


def test_l1_run_status_and_output(l1: L1Host) -> None:
    status, out = l1.run("echo one; echo two >&2; exit 3", timeout=30)
    assert (status, out) == (3, "one\ntwo\n")


def test_l1_qemu_version(l1: L1Host, qemu_bundle: Path) -> None:
    assert l1.report.get("qemu") == "yes", l1.report
    out = l1.check("/opt/qemu/bin/qemu-system-aarch64 --version", timeout=120)
    assert "QEMU emulator version" in out, out


def test_l2_bare_metal_under_kvm(l1: L1Host, qemu_bundle: Path) -> None:
    """A bare-metal guest at EL1 under L1's KVM: its SMCCC calls and the closing PSCI
    SYSTEM_OFF are answered by KVM itself (no forwarder)."""
    assert l1.report.get("qemu") == "yes", l1.report
    start = time.monotonic()
    status, out = l1.run("timeout 240 /opt/qemu/bin/qemu-system-aarch64 -M virt -accel kvm -cpu host -m 128"
                         " -nographic -nodefaults -serial stdio -monitor none -kernel /l2/guests/calls-hvc.elf",
                         timeout=L2_TIMEOUT)
    elapsed = time.monotonic() - start
    print(f"L2 bare-metal run under KVM: {elapsed:.1f}s\n{out}")
    (l1.workdir / "l2-calls-hvc.log").write_text(out)
    assert status == 0, out
    assert re.search(r"^GUEST calls conduit=hvc el=0x0*1 ", out, re.MULTILINE), out
    calls = parse_calls(out)
    assert calls["PSCI_VERSION"][0] >= 0x10000, out  # KVM's in-kernel PSCI (1.x)
    assert calls["AFFINITY_INFO_SELF"][0] == 0, out  # ON
    assert out.rstrip().endswith("SYSTEM_OFF"), out
