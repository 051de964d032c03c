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


STANDBY_RE = re.compile(r"^STANDBY name=(?P<name>\w+) x0=0x(?P<x0>[0-9a-f]+) waited=0x(?P<waited>[0-9a-f]+)"
                        r" wanted=0x(?P<wanted>[0-9a-f]+) freq=0x(?P<freq>[0-9a-f]+)\s*$", re.MULTILINE)


def _standby_calls(out: str) -> dict[str, tuple[int, int, int]]:
    """standby.elf's STANDBY lines: name -> (x0, waited, wanted), in CNTVCT ticks."""
    assert re.search(r"^GUEST standby conduit=hvc el=0x0*1 ", out, re.MULTILINE), out
    assert "TIMEOUT" not in out and "EXCEPTION" not in out, out
    assert "STANDBY DONE" in out and out.rstrip().endswith("SYSTEM_OFF"), out
    found = {m["name"]: (int(m["x0"], 16), int(m["waited"], 16), int(m["wanted"], 16))
             for m in STANDBY_RE.finditer(out)}
    assert set(found) == {"timer", "powerdown", "pending"}, out
    return found


def _assert_standby_waited(out: str) -> None:
    calls = _standby_calls(out)
    for name in ("timer", "powerdown"):  # power-down is served as standby (standby-only; QEMU's own PSCI)
        x0, waited, wanted = calls[name]
        assert x0 == 0, out  # SUCCESS
        # A lower bound only: a loaded machine may wait longer, never less.
        assert wanted > 0 and waited >= wanted, f"{name}: CPU_SUSPEND returned before the timer fired:\n{out}"
    # With an interrupt already pending (an SGI, I masked) the standby ends at once: it returned.
    assert calls["pending"][0] == 0, out


def _assert_daemon_log_clean(daemon: Daemon) -> None:
    log = daemon.log
    assert "Traceback" not in log, log[-4000:]
    assert not re.search(r"\b(ERROR|CRITICAL)\b", log), log[-4000:]


def test_cpu_suspend_standby_waits_for_the_timer(start_daemon: StartDaemon, start_qemu: StartQemu, guests: Path,
                                                 line: bool) -> None:
    """CPU_SUSPEND via hvcproxyd: SUCCESS and a CPU_STANDBY effect; QEMU keeps the caller in WFI until the
    virtual timer's interrupt is pending (DAIF.I masked), as QEMU's own PSCI does."""
    daemon = start_daemon()
    q = start_qemu("-kernel", str(guests / "standby.elf"), forwarder=daemon.socket, machine="virt,gic-version=3",
                   line=line)
    out = _run_to_exit(q)
    _assert_standby_waited(out)
    _assert_daemon_saw(daemon, 0xC4000001, 0x84000008)
    _assert_daemon_log_clean(daemon)


def test_cpu_suspend_standby_waits_on_stock_qemu(start_qemu: StartQemu, guests: Path) -> None:
    """The baseline: QEMU's own PSCI does a WFI for CPU_SUSPEND too."""
    out = _run_to_exit(start_qemu("-kernel", str(guests / "standby.elf"), machine="virt,gic-version=3"))
    _assert_standby_waited(out)


CYCLES_RE = re.compile(r"^CYCLES done=0x(?P<done>[0-9a-f]+) failed=0x(?P<failed>[0-9a-f]+)"
                       r" cycles=0x(?P<cycles>[0-9a-f]+)\s*$", re.MULTILINE)


def _assert_power_cycles(out: str) -> None:
    assert re.search(r"^GUEST cycles conduit=hvc el=0x0*1 ", out, re.MULTILINE), out
    m = CYCLES_RE.search(out)
    assert m, out
    assert "CYCLE_FAIL" not in out and int(m["failed"], 16) == 0, out
    assert int(m["done"], 16) >= 100 and int(m["done"], 16) == int(m["cycles"], 16), out
    for n in (1, 2, 3):
        assert re.search(rf"^SECONDARY mpidr=0x0*8000000{n} context=0x0*f1a1000{n} el=0x0*1\s*$", out,
                         re.MULTILINE), out
        assert re.search(rf"^FINAL_OFF target=0x0*{n} x0=0x0*1\s*$", out, re.MULTILINE), out  # OFF
    assert "FINAL_FAIL" not in out and "EXCEPTION" not in out, out
    assert "CYCLES DONE" in out and out.rstrip().endswith("SYSTEM_OFF"), out


def test_secondary_power_cycles(start_daemon: StartDaemon, start_qemu: StartQemu, guests: Path,
                                line: bool) -> None:
    """120 CPU_ON/CPU_OFF cycles (-smp 4), 60 of CPU 1 back to back, then of the secondaries in turn, each
    waited for with AFFINITY_INFO before the next CPU_ON."""
    daemon = start_daemon()
    q = start_qemu("-kernel", str(guests / "cycles.elf"), forwarder=daemon.socket, smp=4, line=line)
    out = _run_to_exit(q)
    _assert_power_cycles(out)
    _assert_daemon_saw(daemon, 0xC4000003, 0xC4000004, 0x84000002, 0x84000008)
    _assert_daemon_log_clean(daemon)


def test_secondary_power_cycles_on_stock_qemu(start_qemu: StartQemu, guests: Path) -> None:
    """The baseline: the same guest through QEMU's own PSCI."""
    _assert_power_cycles(_run_to_exit(start_qemu("-kernel", str(guests / "cycles.elf"), smp=4)))
