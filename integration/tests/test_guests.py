"""Bare-metal guests (integration/guests/) under the patched QEMU, with and
without hvcproxyd behind the hvc-forwarder.

Guest IDs (guest.h) and what integration/configs/guests.yaml does with them:
TEST_STATIC_FN 0xC2000001 -> static handler, TEST_UNKNOWN_FN 0xC20000FF ->
forwarded, nobody implements it, TEST_DENIED_FN 0xC3000001 -> denied; PSCI is
the daemon's psci handler.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from qemu_harness import Daemon, Qemu, parse_calls

NOT_SUPPORTED = 0xFFFF_FFFF_FFFF_FFFF
ALREADY_ON = 0xFFFF_FFFF_FFFF_FFFC
GUEST_TIMEOUT = 60

StartQemu = Callable[..., Qemu]
StartDaemon = Callable[..., Daemon]


def _run_to_exit(q: Qemu) -> str:
    rc = q.wait(GUEST_TIMEOUT)
    out = q.output()
    assert rc == 0, f"QEMU exited with {rc}:\n{out}"
    return out


def _assert_forwarded_transcript(out: str, el: int, conduit: str) -> None:
    assert re.search(rf"^GUEST calls conduit={conduit} el=0x0*{el:x} ", out, re.MULTILINE), out
    calls = parse_calls(out)
    # PSCI comes from the daemon's psci handler (PSCI 1.1, versions.psci).
    assert calls["PSCI_VERSION"][0] == 0x10001, out
    assert calls["PSCI_FEATURES_CPU_ON"][0] == 0, out
    assert calls["AFFINITY_INFO_SELF"][0] == 0, out  # ON
    # The Arm architecture calls are answered by QEMU as KVM would, not forwarded.
    assert calls["SMCCC_VERSION"][0] == 0x10002, out
    assert calls["ARCH_FEATURES_PSCI_FEATURES"][0] == 0, out  # PSCI_FEATURES is forwarded: SUCCESS
    # The static handler's fixed registers reach the guest.
    assert calls["STATIC"] == (0, 0x48564350, 0x1234, 0x5678), out
    # The SVE hint (bit 16) does not change where a call goes.
    assert calls["STATIC_SVE_HINT"] == calls["STATIC"], out
    # Forwarded but unimplemented: the daemon answers NOT_SUPPORTED.
    assert calls["UNKNOWN"][0] == NOT_SUPPORTED, out
    # Denied: NOT_SUPPORTED from QEMU itself, other registers untouched.
    assert calls["DENIED"] == (NOT_SUPPORTED, 0x1111, 0, 0), out
    # KVM's legacy PSCI 0.1 IDs are denied too (bits 23:17 set: routed with bit 16 as is).
    assert calls["PSCI01_DENIED"][0] == NOT_SUPPORTED, out
    assert out.rstrip().endswith("SYSTEM_OFF"), out


def _assert_daemon_saw(daemon: Daemon, *func_ids: int) -> None:
    log = daemon.log.lower()
    for fid in func_ids:
        assert f"{fid:#010x}" in log, f"daemon log has no call {fid:#010x}:\n{daemon.log[-4000:]}"


def test_hvc_from_el1_forwarded(start_daemon: StartDaemon, start_qemu: StartQemu, guests: Path, line: bool) -> None:
    daemon = start_daemon()
    q = start_qemu("-kernel", str(guests / "calls-hvc.elf"), forwarder=daemon.socket, line=line)
    out = _run_to_exit(q)
    _assert_forwarded_transcript(out, el=1, conduit="hvc")
    daemon.wait_log(r"VMM attached")
    _assert_daemon_saw(daemon, 0x84000000, 0xC2000001, 0xC2010001, 0xC20000FF, 0xC4000004, 0x84000008)
    # Denied calls and the Arm architecture calls never reach the daemon.
    log = daemon.log.lower()
    assert "0xc3000001" not in log
    assert "0x95c1ba5e" not in log
    assert "0x80000000" not in log


def test_smc_from_el2_forwarded(start_daemon: StartDaemon, start_qemu: StartQemu, guests: Path) -> None:
    daemon = start_daemon()
    q = start_qemu("-kernel", str(guests / "calls-smc.elf"), forwarder=daemon.socket,
                   machine="virt,virtualization=on")
    out = _run_to_exit(q)
    _assert_forwarded_transcript(out, el=2, conduit="smc")
    _assert_daemon_saw(daemon, 0x84000000, 0xC2000001, 0x84000008)


def test_smp_cpu_on_off_via_daemon(start_daemon: StartDaemon, start_qemu: StartQemu, guests: Path,
                                   line: bool) -> None:
    daemon = start_daemon()
    q = start_qemu("-kernel", str(guests / "smp.elf"), forwarder=daemon.socket, smp=4, line=line)
    out = _run_to_exit(q)
    for n in (1, 2, 3):
        assert re.search(rf"^SECONDARY mpidr=0x0*8000000{n} context=0x0*c0de000{n} el=0x0*1\s*$", out,
                         re.MULTILINE), out
        assert re.search(rf"^CPU_ON target=0x0*{n} x0=0x0+\s*$", out, re.MULTILINE), out
        assert re.search(rf"^AFFINITY_INFO target=0x0*{n} x0=0x0+\s*$", out, re.MULTILINE), out  # ON
        assert re.search(rf"^CPU_OFF target=0x0*{n} x0=0x0*1\s*$", out, re.MULTILINE), out  # OFF
    assert re.search(rf"^CPU_ON_AGAIN target=0x0*1 x0=0x{ALREADY_ON:016x}\s*$", out, re.MULTILINE), out
    # A misaligned AArch64 entry: INVALID_ADDRESS (-9), where a SUCCESS would leave the guest waiting.
    assert re.search(r"^CPU_ON_MISALIGNED target=0x0*1 x0=0xfffffffffffffff7\s*$", out, re.MULTILINE), out
    assert "CPU_OFF_RETURNED" not in out
    assert "SMP DONE" in out and out.rstrip().endswith("SYSTEM_OFF"), out
    _assert_daemon_saw(daemon, 0xC4000003, 0xC4000004, 0x84000002, 0x84000008)


def test_without_forwarder_qemu_is_stock(start_qemu: StartQemu, guests: Path) -> None:
    """The patched QEMU without an hvc-forwarder behaves as upstream does."""
    out = _run_to_exit(start_qemu("-kernel", str(guests / "calls-hvc.elf")))
    calls = parse_calls(out)
    assert calls["PSCI_VERSION"][0] == 0x10001  # QEMU's own PSCI 1.1
    assert calls["SMCCC_VERSION"][0] == NOT_SUPPORTED  # guests then assume SMCCC 1.0
    assert calls["STATIC"][0] == NOT_SUPPORTED
    assert calls["STATIC_SVE_HINT"][0] == NOT_SUPPORTED
    assert calls["UNKNOWN"][0] == NOT_SUPPORTED
    assert calls["DENIED"][0] == NOT_SUPPORTED
    assert calls["PSCI01_DENIED"][0] == 0xFFFF_FFFF_FFFF_FFFE  # QEMU's PSCI 0.1: INVALID_PARAMETERS
    # SMP works through QEMU's own PSCI as well.
    out = _run_to_exit(start_qemu("-kernel", str(guests / "smp.elf"), smp=4))
    assert "SMP DONE" in out


def test_smc_is_undefined_off_the_conduit(start_daemon: StartDaemon, start_qemu: StartQemu,
                                          guests: Path) -> None:
    """-M virt's conduit is HVC: an SMC from EL1 stays UNDEFINED, forwarder or not."""
    daemon = start_daemon(qmp=False)  # two QEMUs in this test: no QMP cross-check
    for fwd in (None, daemon.socket):
        q = start_qemu("-kernel", str(guests / "calls-smc.elf"), forwarder=fwd)
        q.wait_output(r"^HALT", timeout=GUEST_TIMEOUT)
        q.stop()
        # EC 0 (unknown reason): the instruction is undefined at EL1.
        assert re.search(r"EXCEPTION vector=0x0*4 esr=0x0*2000000 ", q.output()), q.output()
    assert "0x84000000" not in daemon.log.lower()


def test_qemu_waits_for_the_daemon_at_startup(start_daemon: StartDaemon, start_qemu: StartQemu, guests: Path,
                                              workdir: Path) -> None:
    """QEMU started first blocks at machine init (no vCPU runs) until hvcproxyd listens."""
    sock = workdir / "late.sock"
    q = start_qemu("-kernel", str(guests / "calls-hvc.elf"), forwarder=sock)
    q.wait_output(r"waiting for the handler", timeout=30, stderr=True)
    time.sleep(1.0)
    assert q.proc.poll() is None, q.messages()
    assert q.output() == "", "the guest ran before the handshake"
    daemon = start_daemon(socket=sock)
    out = _run_to_exit(q)
    _assert_forwarded_transcript(out, el=1, conduit="hvc")
    daemon.wait_log(r"VMM attached")
