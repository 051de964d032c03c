"""What the bare-metal guests (integration/guests/) print, checked alike by the
TCG tier (test_guests.py) and the nested-KVM tier (test_nested_kvm.py)."""

from __future__ import annotations

import re

from qemu_harness import Daemon, parse_calls

NOT_SUPPORTED = 0xFFFF_FFFF_FFFF_FFFF
NOT_REQUIRED = 0xFFFF_FFFF_FFFF_FFFE
ALREADY_ON = 0xFFFF_FFFF_FFFF_FFFC


def assert_forwarded_transcript(out: str, el: int, conduit: str, accel: str = "tcg") -> None:
    """calls.S through the daemon with integration/configs/guests.yaml.  The Arm
    architecture calls are answered as KVM does, by QEMU under TCG and by the kernel
    under KVM: the same but for SMCCC_VERSION (1.2 under TCG; KVM says 1.1, issue 14)
    and the workarounds, where KVM answers for the host's CPU and QEMU for one the
    speculation issues do not affect."""
    assert re.search(rf"^GUEST calls conduit={conduit} el=0x0*{el:x} ", out, re.MULTILINE), out
    calls = parse_calls(out)
    # PSCI comes from the daemon's psci handler (PSCI 1.1, versions.psci).
    assert calls["PSCI_VERSION"][0] == 0x10001, out
    assert calls["PSCI_FEATURES_CPU_ON"][0] == 0, out
    assert calls["AFFINITY_INFO_SELF"][0] == 0, out  # ON
    # The Arm architecture calls are never forwarded: QEMU answers them under TCG, KVM under KVM.
    assert calls["ARCH_FEATURES_PSCI_FEATURES"][0] == NOT_SUPPORTED, out  # not an Arm Architecture Call
    if accel == "kvm":
        assert calls["SMCCC_VERSION"][0] == 0x10001, out
    else:
        assert calls["SMCCC_VERSION"][0] == 0x10002, out
        assert calls["ARCH_FEATURES_WORKAROUND_1"][0] == 1, out  # SMCCC_ARCH_WORKAROUND_RET_UNAFFECTED
        assert calls["ARCH_FEATURES_WORKAROUND_2"][0] == NOT_REQUIRED, out
    # The static handler's fixed registers reach the guest.
    assert calls["STATIC"] == (0, 0x48564350, 0x1234, 0x5678), out
    # The SVE hint (bit 16) does not change where a call goes.
    assert calls["STATIC_SVE_HINT"] == calls["STATIC"], out
    # Forwarded but unimplemented: the daemon answers NOT_SUPPORTED.
    assert calls["UNKNOWN"][0] == NOT_SUPPORTED, out
    # Denied: NOT_SUPPORTED with x1..x3 cleared, from KVM's filter or QEMU alike.
    assert calls["DENIED"] == (NOT_SUPPORTED, 0, 0, 0), out
    # An immediate of 1: an HVC is still an SMCCC call, an SMC is not (NOT_SUPPORTED), as KVM has it.
    assert calls["PSCI_VERSION_IMM1"][0] == (NOT_SUPPORTED if conduit == "smc" else 0x10001), out
    # KVM's legacy PSCI 0.1 IDs are denied too (bits 23:17 set: routed with bit 16 as is).
    assert calls["PSCI01_DENIED"][0] == NOT_SUPPORTED, out
    assert out.rstrip().endswith("SYSTEM_OFF"), out


def assert_daemon_saw(daemon: Daemon, *func_ids: int) -> None:
    log = daemon.log.lower()
    for fid in func_ids:
        assert f"{fid:#010x}" in log, f"daemon log has no call {fid:#010x}:\n{daemon.log[-4000:]}"


def assert_smp_transcript(out: str) -> None:
    """smp.S on -smp 4: each secondary on, ON, off, OFF; the edge cases of CPU_ON."""
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


STANDBY_RE = re.compile(r"^STANDBY name=(?P<name>\w+) x0=0x(?P<x0>[0-9a-f]+) waited=0x(?P<waited>[0-9a-f]+)"
                        r" wanted=0x(?P<wanted>[0-9a-f]+) freq=0x(?P<freq>[0-9a-f]+)\s*$", re.MULTILINE)


def standby_calls(out: str) -> dict[str, tuple[int, int, int]]:
    """standby.elf's STANDBY lines: name -> (x0, waited, wanted), in CNTVCT ticks."""
    assert re.search(r"^GUEST standby conduit=hvc el=0x0*1 ", out, re.MULTILINE), out
    assert "TIMEOUT" not in out and "EXCEPTION" not in out, out
    assert "STANDBY DONE" in out and out.rstrip().endswith("SYSTEM_OFF"), out
    found = {m["name"]: (int(m["x0"], 16), int(m["waited"], 16), int(m["wanted"], 16))
             for m in STANDBY_RE.finditer(out)}
    assert set(found) == {"timer", "powerdown", "pending"}, out
    return found


def assert_standby_waited(out: str) -> None:
    calls = standby_calls(out)
    for name in ("timer", "powerdown"):  # power-down is served as standby (standby-only; QEMU's own PSCI)
        x0, waited, wanted = calls[name]
        assert x0 == 0, out  # SUCCESS
        # A lower bound only: a loaded machine may wait longer, never less.
        assert wanted > 0 and waited >= wanted, f"{name}: CPU_SUSPEND returned before the timer fired:\n{out}"
    # With an interrupt already pending (an SGI, I masked) the standby ends at once: it returned.
    assert calls["pending"][0] == 0, out


def assert_daemon_log_clean(daemon: Daemon) -> None:
    log = daemon.log
    assert "Traceback" not in log, log[-4000:]
    assert not re.search(r"\b(ERROR|CRITICAL)\b", log), log[-4000:]


CYCLES_RE = re.compile(r"^CYCLES done=0x(?P<done>[0-9a-f]+) failed=0x(?P<failed>[0-9a-f]+)"
                       r" cycles=0x(?P<cycles>[0-9a-f]+)\s*$", re.MULTILINE)


def assert_power_cycles(out: str) -> None:
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


def secondary_endianness(out: str) -> dict[int, int]:
    """endian.S: each secondary's SCTLR_EL1.EE as it started (CPU 1 from a big-endian caller)."""
    assert "ENDIAN DONE" in out, out
    calls = {int(m[1], 16): int(m[2], 16) for m in re.finditer(
        r"^CPU_ON(?:_BIG_ENDIAN)? target=0x([0-9a-f]+) x0=0x([0-9a-f]+)\s*$", out, re.MULTILINE)}
    assert calls == {1: 0, 2: 0}, out  # both CPU_ONs succeeded
    return {int(m[1], 16): int(m[2], 16) for m in re.finditer(
        r"^SECONDARY_EE target=0x([0-9a-f]+) x0=0x([0-9a-f]+)\s*$", out, re.MULTILINE)}


def vendor_calls(out: str) -> tuple[int, int]:
    """vendor.S: (FEATURES x0, PTP x0)."""
    found = {m[1]: int(m[2], 16) for m in re.finditer(
        r"^(KVM_FEATURES|KVM_PTP) target=0x0+ x0=0x([0-9a-f]+)\s*$", out, re.MULTILINE)}
    assert set(found) == {"KVM_FEATURES", "KVM_PTP"}, out
    return found["KVM_FEATURES"], found["KVM_PTP"]

