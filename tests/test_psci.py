"""The PSCI handler against DEN0022's function and return-code tables, and a
hypothesis state machine that checks the power table against a model VMM.

The expected values here are written out from the spec (and KVM's psci.c where
the spec leaves the choice), not taken from psci_defs, so a wrong constant
there shows up as a failure here.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hvcproxyd.config import ConfigError
from hvcproxyd.core.guestmem import GuestMemory
from hvcproxyd.core.handler import VmFacts
from hvcproxyd.core.service import VmService
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers import Effect, EffectKind, Result, VmContext
from hvcproxyd.handlers.psci import PsciHandler, PsciOptions
from hvcproxyd.handlers.psci_defs import VERSIONS, Power
from hvcproxyd.smccc import SVE_HINT, reg_to_signed
from hvcproxyd.vmm.simulator import default_mpidr
from hvcproxyd.wire import (
    CALL_AARCH32,
    CALL_EL_SHIFT,
    EFFECT_AARCH64,
    Call,
    EventKind,
    RamRegion,
    VcpuInfo,
    VmEvent,
)

# Return codes, DEN0022 "Return error codes".
SUCCESS, NOT_SUPPORTED, INVALID_PARAMETERS, DENIED, ALREADY_ON, ON_PENDING = 0, -1, -2, -3, -4, -5
INTERNAL_FAILURE, INVALID_ADDRESS = -6, -9
# AFFINITY_INFO answers.
AFF_ON, AFF_OFF, AFF_ON_PENDING = 0, 1, 2

# Function IDs, DEN0022 function list (64-bit = 32-bit | 0x40000000).
PSCI_VERSION = 0x8400_0000
CPU_SUSPEND, CPU_SUSPEND64 = 0x8400_0001, 0xC400_0001
CPU_OFF = 0x8400_0002
CPU_ON, CPU_ON64 = 0x8400_0003, 0xC400_0003
AFFINITY_INFO, AFFINITY_INFO64 = 0x8400_0004, 0xC400_0004
MIGRATE, MIGRATE64 = 0x8400_0005, 0xC400_0005
MIGRATE_INFO_TYPE = 0x8400_0006
MIGRATE_INFO_UP_CPU, MIGRATE_INFO_UP_CPU64 = 0x8400_0007, 0xC400_0007
SYSTEM_OFF, SYSTEM_RESET, PSCI_FEATURES = 0x8400_0008, 0x8400_0009, 0x8400_000A
SYSTEM_SUSPEND, SYSTEM_SUSPEND64 = 0x8400_000E, 0xC400_000E
SYSTEM_RESET2, SYSTEM_RESET2_64 = 0x8400_0012, 0xC400_0012
SYSTEM_OFF2, SYSTEM_OFF2_64 = 0x8400_0015, 0xC400_0015
SMCCC_VERSION = 0x8000_0000

#: Every function the handler implements and the PSCI version that introduced it.
IMPLEMENTED = {
    PSCI_VERSION: "0.2", CPU_SUSPEND: "0.2", CPU_SUSPEND64: "0.2", CPU_OFF: "0.2", CPU_ON: "0.2",
    CPU_ON64: "0.2", AFFINITY_INFO: "0.2", AFFINITY_INFO64: "0.2", MIGRATE_INFO_TYPE: "0.2",
    SYSTEM_OFF: "0.2", SYSTEM_RESET: "0.2", PSCI_FEATURES: "1.0", SYSTEM_SUSPEND: "1.0",
    SYSTEM_SUSPEND64: "1.0", SYSTEM_RESET2: "1.1", SYSTEM_RESET2_64: "1.1", SYSTEM_OFF2: "1.3",
    SYSTEM_OFF2_64: "1.3",
}
ALL_IDS = [base | n for base in (0x8400_0000, 0xC400_0000) for n in range(0x20)]

RAM, RAM_SIZE = 0x4000_0000, 0x100_0000
#: Executable but not RAM (-M virt's second flash bank): HELLO's ROM region.
FLASH, FLASH_SIZE = 0x0400_0000, 0x0400_0000
ENTRY = RAM + 0x8_0000


#: The VM-service side of each context a test made: what a VMM handshake would fill in.
FACTS: dict[VmContext, VmFacts] = {}


def bare_context(versions: dict[str, str] | None = None) -> VmContext:
    facts = VmFacts("t", versions or {})
    vm = VmContext(facts, logging.getLogger("test.psci"))
    FACTS[vm] = facts
    return vm


def vm_context(n_vcpus: int = 4, pinned: str | None = None) -> VmContext:
    vm = bare_context({"psci": pinned} if pinned else {})
    facts = FACTS[vm]
    facts.set_vcpus(tuple(VcpuInfo(i, default_mpidr(i), i == 0) for i in range(n_vcpus)))
    facts.memory = GuestMemory([RamRegion(RAM, RAM_SIZE)], 40)
    facts.executable = ((RAM, RAM + RAM_SIZE), (FLASH, FLASH + FLASH_SIZE))
    facts.attached = True
    facts.performs = frozenset(EffectKind)  # a VMM that carries out every effect, SYSTEM_SUSPEND too
    return vm


def handler(options: PsciOptions | None = None, *, n_vcpus: int = 4, pinned: str | None = None) -> PsciHandler:
    h = PsciHandler("psci", options, vm_context(n_vcpus, pinned))
    h.attach(reconnect=False)
    return h


_seq = iter(range(1, 1 << 62))


def call(h: PsciHandler, fid: int, *args: int, vcpu: int = 0, aarch32: bool = False, el: int = 1) -> Result:
    flags = (CALL_AARCH32 if aarch32 else 0) | (el << CALL_EL_SHIFT)
    return h.dispatch(Call(next(_seq), vcpu, fid, tuple(args) + (0,) * (17 - len(args)), flags))


def x0(result: Result) -> int:
    return reg_to_signed(result.regs[0])


def mpidr(i: int) -> int:
    return default_mpidr(i)


def power(h: PsciHandler) -> list[Power]:
    return [h.power[i] for i in sorted(h.power)]


def confirm_all(h: PsciHandler, result: Result, status: int = 0) -> None:
    for effect in result.effects:
        h.effect_done(effect, status)


# ---------------------------------------------------------------- version, features, dispatch


@pytest.mark.parametrize(("option", "pinned", "expected"), [
    (None, None, 0x0001_0003), (None, "0.2", 0x0000_0002), (None, "1.0", 0x0001_0000),
    (None, "1.1", 0x0001_0001), (None, "1.2", 0x0001_0002), (None, "1.3", 0x0001_0003),
    ("1.0", None, 0x0001_0000), ("1.3", "1.3", 0x0001_0003),
])
def test_psci_version(option: str | None, pinned: str | None, expected: int) -> None:
    opts = PsciOptions(version=VERSIONS[option]) if option else None
    result = call(handler(opts, pinned=pinned), PSCI_VERSION)
    assert result.regs == (expected, 0, 0, 0)
    assert not result.effects


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.3"])
def test_psci_features_answers_exactly_the_implemented_functions(version: str) -> None:
    h = handler(PsciOptions(allow_system_suspend=True), pinned=version)
    for fid in ALL_IDS:
        since = IMPLEMENTED.get(fid)
        offered = since is not None and VERSIONS[since] <= VERSIONS[version]
        expected = NOT_SUPPORTED
        if offered:
            expected = 1 if fid in (SYSTEM_OFF2, SYSTEM_OFF2_64) else SUCCESS  # OFF2: bitmask, HIBERNATE_OFF
        assert x0(call(h, PSCI_FEATURES, fid)) == expected, hex(fid)


def test_psci_features_corner_cases() -> None:
    h = handler()
    assert x0(call(h, PSCI_FEATURES, SMCCC_VERSION)) == SUCCESS  # as KVM: SMCCC 1.1 discovery
    assert x0(call(h, PSCI_FEATURES, 0x8200_0000)) == NOT_SUPPORTED  # not a PSCI function
    assert x0(call(h, PSCI_FEATURES, (0xDEAD << 32) | CPU_ON)) == SUCCESS  # w1 only
    assert x0(call(h, PSCI_FEATURES, CPU_ON64, aarch32=True)) == NOT_SUPPORTED
    assert x0(call(h, PSCI_FEATURES, CPU_ON, aarch32=True)) == SUCCESS
    assert x0(call(h, PSCI_FEATURES, SYSTEM_SUSPEND)) == NOT_SUPPORTED  # not allowed by default
    assert x0(call(h, PSCI_FEATURES, MIGRATE)) == NOT_SUPPORTED
    # CPU_SUSPEND's feature flags: bit 1 = extended StateID format, bit 0 (OSI) never.
    assert x0(call(h, PSCI_FEATURES, CPU_SUSPEND)) == 0
    ext = handler(PsciOptions(power_state_format="extended"))
    assert x0(call(ext, PSCI_FEATURES, CPU_SUSPEND)) == 2
    assert x0(call(ext, PSCI_FEATURES, CPU_SUSPEND64)) == 2


def test_psci_0_2_has_no_psci_features() -> None:
    h = handler(pinned="0.2")
    assert x0(call(h, PSCI_FEATURES, PSCI_VERSION)) == NOT_SUPPORTED
    assert x0(call(h, SYSTEM_RESET2, 0)) == NOT_SUPPORTED


@pytest.mark.parametrize("fid", [f for f in ALL_IDS if f not in IMPLEMENTED])
def test_unimplemented_functions_are_not_supported(fid: int) -> None:
    h = handler(PsciOptions(allow_system_suspend=True), pinned="1.3")
    before = power(h)
    result = call(h, fid, 1, 2, 3)
    assert x0(result) == NOT_SUPPORTED and not result.effects
    assert power(h) == before


@pytest.mark.parametrize("fid", [f for f in IMPLEMENTED if f & 0x4000_0000])
def test_64_bit_functions_from_aarch32_are_not_supported(fid: int) -> None:
    h = handler(PsciOptions(allow_system_suspend=True), pinned="1.3")
    result = call(h, fid, mpidr(1), ENTRY, 0, aarch32=True)
    assert x0(result) == NOT_SUPPORTED and not result.effects
    assert power(h) == [Power.ON, Power.OFF, Power.OFF, Power.OFF]


def test_functions_of_later_versions_are_not_supported() -> None:
    h = handler(PsciOptions(allow_system_suspend=True), pinned="1.1")
    assert x0(call(h, SYSTEM_OFF2, 1)) == NOT_SUPPORTED
    assert x0(call(handler(PsciOptions(allow_system_suspend=True), pinned="0.2"), SYSTEM_SUSPEND, ENTRY)) \
        == NOT_SUPPORTED


@pytest.mark.parametrize("entry", [FLASH, FLASH + FLASH_SIZE - 4])
def test_cpu_on_entry_in_rom_or_flash_is_accepted(entry: int) -> None:
    """A firmware or kernel in flash: executable, not RAM; KVM and QEMU start a CPU there."""
    result = call(handler(), CPU_ON64, mpidr(1), entry, 0)
    assert x0(result) == SUCCESS and result.effects[0].entry == entry


def test_system_suspend_is_offered_only_by_a_vmm_that_carries_it_out(caplog: pytest.LogCaptureFixture) -> None:
    h = handler(PsciOptions(allow_system_suspend=True), pinned="1.3")
    assert x0(call(h, PSCI_FEATURES, SYSTEM_SUSPEND)) == SUCCESS
    FACTS[h.vm].performs = frozenset(k for k in EffectKind if k is not EffectKind.SYSTEM_SUSPEND)  # QEMU
    h.attach(reconnect=False)
    assert "does not carry out SYSTEM_SUSPEND" in caplog.text
    assert x0(call(h, PSCI_FEATURES, SYSTEM_SUSPEND)) == NOT_SUPPORTED
    result = call(h, SYSTEM_SUSPEND, ENTRY, 0)
    assert x0(result) == NOT_SUPPORTED and not result.effects


def test_a_cpu_on_the_vmm_gave_up_on_leaves_the_target_off() -> None:
    """QEMU's timeout-ms dropped the reply: its EFFECT_DONE(-ETIMEDOUT) (protocol §5)."""
    h = handler()
    result = call(h, CPU_ON, mpidr(1), ENTRY, 0)
    assert x0(result) == SUCCESS and power(h)[1] is Power.ON_PENDING
    confirm_all(h, result, -errno.ETIMEDOUT)
    assert power(h)[1] is Power.OFF
    assert x0(call(h, AFFINITY_INFO, mpidr(1), 0)) == AFF_OFF
    assert x0(call(h, CPU_ON, mpidr(1), ENTRY, 0)) == SUCCESS  # and it can be tried again


def test_sve_hint_bit_is_ignored() -> None:
    h = handler()
    assert x0(call(h, PSCI_VERSION | SVE_HINT)) == 0x10003
    assert x0(call(h, CPU_ON64 | SVE_HINT, mpidr(1), ENTRY, 7)) == SUCCESS


def test_migrate_info_type_is_two() -> None:
    assert call(handler(), MIGRATE_INFO_TYPE).regs == (2, 0, 0, 0)


def test_failure_is_internal_failure() -> None:
    h = handler()
    assert x0(h.failure(Call(1, 0, CPU_ON, (0,) * 17))) == INTERNAL_FAILURE


async def test_handle_is_dispatch() -> None:
    h = handler()
    result = await h.handle(Call(1, 0, CPU_ON, (mpidr(2), ENTRY, 5) + (0,) * 14))
    assert x0(result) == SUCCESS and h.power[2] is Power.ON_PENDING


# ---------------------------------------------------------------- CPU_ON


@pytest.mark.parametrize(("fid", "aarch32", "el", "highest", "target_el"), [
    (CPU_ON64, False, 1, 1, 1), (CPU_ON, False, 2, 2, 2), (CPU_ON, True, 1, 1, 1),
    # With EL2, a caller at EL1 (an nVHE or pKVM Linux's kernel) still starts its target at EL2.
    (CPU_ON64, False, 1, 2, 2), (CPU_ON, True, 1, 2, 2),
])
def test_cpu_on_success(fid: int, aarch32: bool, el: int, highest: int, target_el: int) -> None:
    h = handler()
    FACTS[h.vm].highest_el = highest
    result = call(h, fid, mpidr(2), ENTRY, 0x1234, aarch32=aarch32, el=el)
    assert result.regs == (0, 0, 0, 0)
    # The target starts at the highest non-secure EL, in the caller's execution state (as QEMU's PSCI, TF-A).
    assert result.effects == (Effect(EffectKind.CPU_ON, 2, ENTRY, 0x1234, target_el,
                                     0 if aarch32 else EFFECT_AARCH64),)
    assert power(h) == [Power.ON, Power.OFF, Power.ON_PENDING, Power.OFF]


def test_cpu_on_pending_then_confirmed() -> None:
    h = handler()
    first = call(h, CPU_ON64, mpidr(1), ENTRY, 1)
    assert x0(call(h, CPU_ON64, mpidr(1), ENTRY, 2)) == ON_PENDING
    confirm_all(h, first)
    assert h.power[1] is Power.ON
    second = call(h, CPU_ON64, mpidr(1), ENTRY, 3)
    assert x0(second) == ALREADY_ON and not second.effects


def test_daemon_and_vmm_converge_when_the_vmm_finds_the_target_already_on() -> None:
    """QEMU answers a CPU_ON of a running vCPU with -EALREADY: the target is on,
    whatever the daemon thought, so later calls must see it on, not off."""
    h = handler()
    on = call(h, CPU_ON64, mpidr(1), ENTRY, 1)
    confirm_all(h, on, -errno.EALREADY)
    assert h.power[1] is Power.ON
    assert x0(call(h, CPU_ON64, mpidr(1), ENTRY, 2)) == ALREADY_ON
    assert x0(call(h, AFFINITY_INFO, mpidr(1), 0)) == 0  # ON
    other = call(h, CPU_ON64, mpidr(2), ENTRY, 3)
    confirm_all(h, other, -errno.EINVAL)  # a real failure: it stays off
    assert h.power[2] is Power.OFF


@pytest.mark.parametrize("fid", [CPU_ON, CPU_ON64])
def test_a_misaligned_aarch64_entry_is_an_invalid_address(fid: int) -> None:
    h = handler()
    for entry in (ENTRY + 1, ENTRY + 2, ENTRY + 3):
        result = call(h, fid, mpidr(1), entry, 0)
        assert x0(result) == INVALID_ADDRESS and not result.effects
    assert h.power[1] is Power.OFF
    assert x0(call(h, CPU_ON, mpidr(1), ENTRY + 1, 0, aarch32=True)) == SUCCESS  # T32 entry: bit 0 is the state


def test_a_cpu_off_the_vmm_finds_already_off_is_off() -> None:
    h = handler()
    confirm_all(h, call(h, CPU_ON64, mpidr(1), ENTRY, 1))
    confirm_all(h, call(h, CPU_OFF, vcpu=1), -errno.ESRCH)
    assert h.power[1] is Power.OFF


def test_cpu_on_of_the_caller_is_already_on() -> None:
    assert x0(call(handler(), CPU_ON64, mpidr(0), ENTRY, 0)) == ALREADY_ON


def test_a_stale_confirmation_does_not_settle_a_newer_power_on() -> None:
    h = handler()
    first = call(h, CPU_ON64, mpidr(1), ENTRY, 1)
    call(h, PSCI_VERSION, vcpu=1)  # vCPU 1 runs before the VMM's EFFECT_DONE arrives
    call(h, CPU_OFF, vcpu=1)
    second = call(h, CPU_ON64, mpidr(1), ENTRY, 2)
    assert x0(second) == SUCCESS
    confirm_all(h, first)  # the late confirmation of the first power-on
    assert h.power[1] is Power.ON_PENDING
    confirm_all(h, second, status=-12)
    assert power(h)[1] is Power.OFF


def test_cpu_on_failed_effect_leaves_target_off() -> None:
    h = handler()
    result = call(h, CPU_ON64, mpidr(3), ENTRY, 1)
    confirm_all(h, result, status=-22)
    assert h.power[3] is Power.OFF
    assert x0(call(h, CPU_ON64, mpidr(3), ENTRY, 1)) == SUCCESS


@pytest.mark.parametrize("target", [
    1 << 24,                     # bits 31:24 are not affinity
    1 << 40,                     # above Aff3
    (1 << 63) | mpidr(1),        # MPIDR_EL1.RES1-like bit from a careless guest
    0x7,                         # a well-formed MPIDR no vCPU has (4 vCPUs: 0..3)
    0x1_0000_0001,               # Aff3 = 1
])
def test_cpu_on_invalid_target(target: int) -> None:
    h = handler()
    result = call(h, CPU_ON64, target, ENTRY, 0)
    assert x0(result) == INVALID_PARAMETERS and not result.effects
    assert power(h) == [Power.ON, Power.OFF, Power.OFF, Power.OFF]


@pytest.mark.parametrize("entry", [0, FLASH - 4, FLASH + FLASH_SIZE, RAM - 4, RAM + RAM_SIZE - 2, RAM + RAM_SIZE,
                                   1 << 45, (1 << 64) - 4])
def test_cpu_on_entry_outside_executable_memory(entry: int) -> None:
    h = handler()
    result = call(h, CPU_ON64, mpidr(1), entry, 0)
    assert x0(result) == INVALID_ADDRESS and not result.effects
    assert h.power[1] is Power.OFF


def test_cpu_on_32_ignores_upper_halves() -> None:
    h = handler()
    result = call(h, CPU_ON, (0xFFFF_FFFF << 32) | mpidr(1), (0xAB << 32) | ENTRY, (0xCD << 32) | 9)
    assert x0(result) == SUCCESS
    assert result.effects[0].vcpu == 1 and result.effects[0].entry == ENTRY and result.effects[0].context == 9
    # The same registers to the 64-bit function name a vCPU that does not exist.
    assert x0(call(h, CPU_ON64, (1 << 32) | mpidr(2), ENTRY, 0)) == INVALID_PARAMETERS


def test_cpu_on_aarch32_thumb_entry() -> None:
    h = handler()
    result = call(h, CPU_ON, mpidr(1), ENTRY | 1, 0, aarch32=True)
    assert x0(result) == SUCCESS and result.effects[0].entry == ENTRY | 1  # the VMM applies the T bit
    assert x0(call(h, CPU_ON, mpidr(2), (RAM + RAM_SIZE - 4) | 1, 0, aarch32=True)) == SUCCESS
    assert x0(call(h, CPU_ON, mpidr(3), RAM + RAM_SIZE + 1, 0, aarch32=True)) == INVALID_ADDRESS


def test_cpu_on_context_is_passed_whole() -> None:
    result = call(handler(), CPU_ON64, mpidr(1), ENTRY, (1 << 64) - 1)
    assert result.effects[0].context == (1 << 64) - 1


# ---------------------------------------------------------------- CPU_OFF


def test_cpu_off() -> None:
    h = handler()
    confirm_all(h, call(h, CPU_ON64, mpidr(1), ENTRY, 0))
    result = call(h, CPU_OFF, vcpu=1)
    assert result.effects == (Effect(EffectKind.CPU_OFF, 1),)
    assert x0(result) == DENIED  # only read if the VMM resumes it; success does not return
    assert power(h) == [Power.ON, Power.OFF, Power.OFF, Power.OFF]
    assert x0(call(h, AFFINITY_INFO, mpidr(1), 0)) == AFF_OFF
    assert x0(call(h, CPU_ON64, mpidr(1), ENTRY, 0)) == SUCCESS


def test_cpu_off_of_the_last_vcpu_is_allowed(caplog: pytest.LogCaptureFixture) -> None:
    h = handler(n_vcpus=1)
    with caplog.at_level(logging.WARNING):
        result = call(h, CPU_OFF)
    assert result.effects == (Effect(EffectKind.CPU_OFF, 0),)
    assert power(h) == [Power.OFF]
    assert "no vCPU is left on" in caplog.text


def test_cpu_off_refused_by_the_vmm_keeps_the_vcpu_on() -> None:
    h = handler()
    confirm_all(h, call(h, CPU_OFF), status=-16)
    assert h.power[0] is Power.ON


# ---------------------------------------------------------------- AFFINITY_INFO


def test_affinity_info_level_0_states() -> None:
    h = handler()
    pending = call(h, CPU_ON64, mpidr(2), ENTRY, 0)
    assert [x0(call(h, AFFINITY_INFO64, mpidr(i), 0)) for i in range(4)] == [AFF_ON, AFF_OFF, AFF_ON_PENDING,
                                                                            AFF_OFF]
    confirm_all(h, pending)
    assert x0(call(h, AFFINITY_INFO, mpidr(2), 0)) == AFF_ON


@pytest.mark.parametrize(("target", "level"), [
    (mpidr(1), 4), (mpidr(1), 1 << 63), (1 << 24, 0), (1 << 40, 0), (0x7, 0), (0x100, 1), (0x1_0000_0000, 3),
])
def test_affinity_info_invalid(target: int, level: int) -> None:
    assert x0(call(handler(), AFFINITY_INFO64, target, level)) == INVALID_PARAMETERS


def test_affinity_info_aggregates_higher_levels() -> None:
    h = handler(n_vcpus=10)  # QEMU virt layout: cluster 0 = vCPUs 0..7, cluster 1 = 8..9
    cluster1 = 0x100
    assert x0(call(h, AFFINITY_INFO, cluster1, 1)) == AFF_OFF
    assert x0(call(h, AFFINITY_INFO, cluster1 | 0x5, 1)) == AFF_OFF  # Aff0 is ignored at level 1
    on8 = call(h, CPU_ON64, mpidr(8), ENTRY, 0)
    assert x0(call(h, AFFINITY_INFO, cluster1, 1)) == AFF_ON_PENDING
    call(h, CPU_ON64, mpidr(9), ENTRY, 0)
    confirm_all(h, on8)
    assert x0(call(h, AFFINITY_INFO, cluster1, 1)) == AFF_ON  # ON wins over ON_PENDING
    assert x0(call(h, AFFINITY_INFO, 0, 1)) == AFF_ON  # cluster 0 holds the boot vCPU
    for level in (2, 3):
        assert x0(call(h, AFFINITY_INFO64, 0, level)) == AFF_ON
    assert x0(call(h, AFFINITY_INFO64, 0xFF_00FF_FF00, 3)) == INVALID_PARAMETERS  # Aff3 = 0xFF: nobody


def test_affinity_info_32_ignores_upper_halves() -> None:
    h = handler()
    assert x0(call(h, AFFINITY_INFO, (1 << 32) | mpidr(0), 1 << 32)) == AFF_ON
    assert x0(call(h, AFFINITY_INFO64, (1 << 32) | mpidr(0), 0)) == INVALID_PARAMETERS
    assert x0(call(h, AFFINITY_INFO64, mpidr(0), 1 << 32)) == INVALID_PARAMETERS


# ---------------------------------------------------------------- CPU_SUSPEND

ORIG_POWERDOWN = 1 << 16
EXT_POWERDOWN = 1 << 30


@pytest.mark.parametrize("fid", [CPU_SUSPEND, CPU_SUSPEND64])
@pytest.mark.parametrize("mode", ["standby-only", "full"])
def test_cpu_suspend_standby_waits_in_the_vmm(fid: int, mode: str) -> None:
    h = handler(PsciOptions(cpu_suspend=mode))  # type: ignore[arg-type]
    for state in (0, 0x1234, 0x0300_0000 | 0x42):  # StateIDs and power levels 0..3, StateType standby
        result = call(h, fid, state, 0, 0, vcpu=0)  # entry and context are ignored for standby
        assert x0(result) == SUCCESS
        assert result.effects == (Effect(EffectKind.CPU_STANDBY, 0),)  # the VMM waits for an interrupt


def test_cpu_suspend_powerdown_standby_only_is_wfi() -> None:
    result = call(handler(), CPU_SUSPEND64, ORIG_POWERDOWN | 0x0100_0000, 0, 0)
    assert x0(result) == SUCCESS  # as KVM: no entry check, registers kept
    assert result.effects == (Effect(EffectKind.CPU_STANDBY, 0),)


def test_cpu_suspend_powerdown_full() -> None:
    h = handler(PsciOptions(cpu_suspend="full"))
    confirm_all(h, call(h, CPU_ON64, mpidr(1), ENTRY, 0))
    result = call(h, CPU_SUSPEND64, ORIG_POWERDOWN | 7, ENTRY + 0x40, 0xC0FFEE, vcpu=1)
    assert x0(result) == SUCCESS
    assert result.effects == (Effect(EffectKind.CPU_SUSPEND, 1, ENTRY + 0x40, 0xC0FFEE),)
    assert h.power[1] is Power.ON  # a suspended core is ON for AFFINITY_INFO
    bad = call(h, CPU_SUSPEND64, ORIG_POWERDOWN, RAM + RAM_SIZE, 0, vcpu=1)
    assert x0(bad) == INVALID_ADDRESS and not bad.effects
    narrowed = call(h, CPU_SUSPEND, (0xFF << 32) | ORIG_POWERDOWN, (1 << 40) | ENTRY, (1 << 40) | 5, vcpu=1)
    assert narrowed.effects == (Effect(EffectKind.CPU_SUSPEND, 1, ENTRY, 5),)
    # power_state is a uint32 in the SMC64 variant too; entry and context are not narrowed.
    wide = call(h, CPU_SUSPEND64, (0xFF << 32) | ORIG_POWERDOWN, ENTRY, (1 << 40) | 5, vcpu=1)
    assert wide.effects == (Effect(EffectKind.CPU_SUSPEND, 1, ENTRY, (1 << 40) | 5),)
    assert x0(call(h, CPU_SUSPEND64, ORIG_POWERDOWN, (1 << 40) | ENTRY, 0, vcpu=1)) == INVALID_ADDRESS


@pytest.mark.parametrize(("fmt", "state"), [
    ("original", 1 << 17), ("original", 1 << 23), ("original", 1 << 26), ("original", 1 << 31),
    ("original", EXT_POWERDOWN),
    ("extended", 1 << 28), ("extended", 1 << 29), ("extended", 1 << 31),
])
@pytest.mark.parametrize("mode", ["standby-only", "full"])
def test_cpu_suspend_reserved_bits(fmt: str, state: int, mode: str) -> None:
    h = handler(PsciOptions(cpu_suspend=mode, power_state_format=fmt))  # type: ignore[arg-type]
    result = call(h, CPU_SUSPEND64, state, ENTRY, 0)
    assert x0(result) == INVALID_PARAMETERS and not result.effects


def test_cpu_suspend_extended_format() -> None:
    h = handler(PsciOptions(cpu_suspend="full", power_state_format="extended"))
    standby = call(h, CPU_SUSPEND, ORIG_POWERDOWN | 0x0FFF_FFFF & ~ORIG_POWERDOWN, ENTRY, 0)
    assert x0(standby) == SUCCESS  # bit 16 is StateID here
    assert standby.effects == (Effect(EffectKind.CPU_STANDBY, 0),)
    assert x0(call(h, CPU_SUSPEND, 0x0FFF_FFFF, ENTRY, 0)) == SUCCESS
    down = call(h, CPU_SUSPEND, EXT_POWERDOWN | 0x0ABC_DEF0, ENTRY, 3)
    assert down.effects == (Effect(EffectKind.CPU_SUSPEND, 0, ENTRY, 3),)


# ---------------------------------------------------------------- system-wide calls


def test_system_off_and_reset() -> None:
    h = handler()
    off = call(h, SYSTEM_OFF, vcpu=0)
    assert x0(off) == INTERNAL_FAILURE  # as KVM, for a VMM that resumes the caller anyway
    assert off.effects == (Effect(EffectKind.SYSTEM_OFF, 0, arg=0),)
    reset = call(h, SYSTEM_RESET)
    assert x0(reset) == INTERNAL_FAILURE and reset.effects == (Effect(EffectKind.SYSTEM_RESET, 0, arg=0),)


@pytest.mark.parametrize(("fid", "args", "arg", "cookie"), [
    (SYSTEM_RESET2, (0, 0x1234), 1, 0x1234),                       # warm reset = effect arg 1
    (SYSTEM_RESET2_64, (0, 1 << 60), 1, 1 << 60),
    (SYSTEM_RESET2, (0x8000_0001, (7 << 32) | 0x55), 0x8000_0001, 0x55),  # cookie narrowed
    (SYSTEM_RESET2_64, ((1 << 32) | 0x8000_00FF, 9), 0x8000_00FF, 9),     # reset_type is a uint32
])
def test_system_reset2(fid: int, args: tuple[int, int], arg: int, cookie: int) -> None:
    result = call(handler(), fid, *args)
    assert x0(result) == INTERNAL_FAILURE
    assert result.effects == (Effect(EffectKind.SYSTEM_RESET, 0, context=cookie, arg=arg),)


@pytest.mark.parametrize("reset_type", [1, 2, 0x7FFF_FFFF])
def test_system_reset2_reserved_types(reset_type: int) -> None:
    result = call(handler(), SYSTEM_RESET2, reset_type, 0)
    assert x0(result) == INVALID_PARAMETERS and not result.effects


def test_system_reset2_vendor_types_can_be_refused() -> None:
    h = handler(PsciOptions(allow_reset2_vendor_types=False))
    assert x0(call(h, SYSTEM_RESET2, 0x8000_0000, 0)) == INVALID_PARAMETERS
    assert call(h, SYSTEM_RESET2, 0, 0).effects[0].arg == 1  # warm reset still works


@pytest.mark.parametrize("fid", [SYSTEM_OFF2, SYSTEM_OFF2_64])
def test_system_off2(fid: int) -> None:
    h = handler(pinned="1.3")
    for off_type in (0, 1):  # 1.3 F.b: 0 means HIBERNATE_OFF as well
        result = call(h, fid, off_type, 0)
        assert x0(result) == INTERNAL_FAILURE
        assert result.effects == (Effect(EffectKind.SYSTEM_OFF, 0, arg=1),)
    for off_type, cookie in ((2, 0), (0x8000_0000, 0), (1, 1)):
        bad = call(h, fid, off_type, cookie)
        assert x0(bad) == INVALID_PARAMETERS and not bad.effects


def test_system_off2_32_ignores_upper_halves() -> None:
    h = handler(pinned="1.3")
    assert x0(call(h, SYSTEM_OFF2, (1 << 32) | 1, 1 << 32)) == INTERNAL_FAILURE
    assert x0(call(h, SYSTEM_OFF2_64, 1, 1 << 32)) == INVALID_PARAMETERS


@pytest.mark.parametrize("fid", [SYSTEM_SUSPEND, SYSTEM_SUSPEND64])
def test_system_suspend(fid: int) -> None:
    h = handler(PsciOptions(allow_system_suspend=True))
    assert x0(handler().dispatch(Call(1, 0, fid, (ENTRY,) + (0,) * 16))) == NOT_SUPPORTED  # off by default
    on = call(h, CPU_ON64, mpidr(3), ENTRY, 0)
    assert x0(call(h, fid, ENTRY, 0)) == DENIED  # vCPU 3 is ON_PENDING, not OFF
    confirm_all(h, on)
    assert x0(call(h, fid, ENTRY, 0)) == DENIED
    call(h, CPU_OFF, vcpu=3)
    assert x0(call(h, fid, RAM - 4, 0)) == INVALID_ADDRESS
    result = call(h, fid, ENTRY, 0x77)
    assert x0(result) == SUCCESS
    assert result.effects == (Effect(EffectKind.SYSTEM_SUSPEND, 0, ENTRY, 0x77),)


def test_system_suspend_from_a_secondary_with_the_boot_vcpu_off() -> None:
    h = handler(PsciOptions(allow_system_suspend=True))
    confirm_all(h, call(h, CPU_ON64, mpidr(2), ENTRY, 0))
    assert x0(call(h, SYSTEM_SUSPEND, ENTRY, 0, vcpu=2)) == DENIED
    call(h, CPU_OFF, vcpu=0)
    assert call(h, SYSTEM_SUSPEND, ENTRY, 0, vcpu=2).effects[0].kind is EffectKind.SYSTEM_SUSPEND


# ---------------------------------------------------------------- state lifecycle


def test_attach_takes_the_vmm_view() -> None:
    vm = vm_context()
    FACTS[vm].set_vcpus(tuple(VcpuInfo(i, mpidr(i), i in (0, 3)) for i in range(4)))
    h = PsciHandler("psci", None, vm)
    h.attach(reconnect=False)
    assert power(h) == [Power.ON, Power.OFF, Power.OFF, Power.ON]
    h.event(VmEvent(EventKind.VM_RESET))
    assert power(h) == [Power.ON, Power.OFF, Power.OFF, Power.ON]  # the boot set is the handshake's


def test_reconnect_keeps_pending_power_ons_and_takes_the_vmm_view_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    h = handler()
    call(h, CPU_ON64, mpidr(1), ENTRY, 0)
    call(h, CPU_ON64, mpidr(2), ENTRY, 0)
    # The VMM started vCPU 2 before the connection dropped, not vCPU 1 (its reply is
    # replayed), and reports vCPU 3 on although no event said so.
    FACTS[h.vm].set_vcpus(tuple(VcpuInfo(i, mpidr(i), i in (0, 2, 3)) for i in range(4)))
    with caplog.at_level(logging.WARNING):
        h.attach(reconnect=True)
    assert power(h) == [Power.ON, Power.ON_PENDING, Power.ON, Power.ON]
    assert "vCPU 3 is ON at reconnect" in caplog.text
    FACTS[h.vm].set_vcpus(tuple(VcpuInfo(i, mpidr(i), i == 0) for i in range(6)))
    h.attach(reconnect=True)  # a different machine: start over from its view
    assert power(h) == [Power.ON] + [Power.OFF] * 5


def test_a_cpu_off_whose_reply_is_replayed_stays_off_at_reconnect() -> None:
    h = handler()
    confirm_all(h, call(h, CPU_ON64, mpidr(1), ENTRY, 0))
    off = call(h, CPU_OFF, vcpu=1)  # answered, and the connection dropped before the VMM read it
    FACTS[h.vm].set_vcpus(tuple(VcpuInfo(i, mpidr(i), i in (0, 1)) for i in range(4)))
    h.attach(reconnect=True)  # the VMM still runs vCPU 1: the replayed reply will stop it
    assert power(h)[1] is Power.OFF
    restored = PsciHandler("psci", h.options, h.vm)
    restored.restore(h.snapshot())  # a daemon restart in between changes nothing
    restored.attach(reconnect=True)
    assert power(restored)[1] is Power.OFF
    confirm_all(h, off)
    h.attach(reconnect=True)  # confirmed, yet the VMM says on: its word again
    assert power(h)[1] is Power.ON


def test_vm_reset_and_vcpu_power_events() -> None:
    h = handler()
    confirm_all(h, call(h, CPU_ON64, mpidr(1), ENTRY, 0))
    call(h, CPU_ON64, mpidr(2), ENTRY, 0)
    h.event(VmEvent(EventKind.VM_RESET))
    assert power(h) == [Power.ON, Power.OFF, Power.OFF, Power.OFF]
    h.event(VmEvent(EventKind.VCPU_POWER, 3, 1))
    h.event(VmEvent(EventKind.VCPU_POWER, 0, 0))
    h.event(VmEvent(EventKind.VCPU_POWER, 9, 1))  # no such vCPU: ignored
    h.event(VmEvent(EventKind.VCPU_POWER, 1, 7))  # no such state: ignored
    h.event(VmEvent(EventKind.VCPU_RESET, 3))
    h.event(VmEvent(EventKind.VM_SHUTDOWN))
    assert power(h) == [Power.OFF, Power.OFF, Power.OFF, Power.ON]


def test_a_calling_vcpu_is_on(caplog: pytest.LogCaptureFixture) -> None:
    h = handler()
    call(h, CPU_ON64, mpidr(1), ENTRY, 0)
    call(h, PSCI_VERSION, vcpu=1)  # its CALL overtook the EFFECT_DONE
    assert h.power[1] is Power.ON
    with caplog.at_level(logging.WARNING):
        call(h, PSCI_VERSION, vcpu=2)
    assert h.power[2] is Power.ON and "vCPU 2 called while off" in caplog.text


def test_snapshot_round_trips_through_json() -> None:
    h = handler()
    call(h, CPU_ON64, mpidr(1), ENTRY, 0)
    confirm_all(h, call(h, CPU_ON64, mpidr(3), ENTRY, 0))
    data = json.loads(json.dumps(h.snapshot()))
    other = PsciHandler("psci", None, vm_context())
    other.restore(data)
    assert other.power == h.power and other.boot == h.boot
    other.event(VmEvent(EventKind.VM_RESET))
    assert power(other) == [Power.ON, Power.OFF, Power.OFF, Power.OFF]


@pytest.mark.parametrize("data", [
    {}, {"format": 2, "power": {}, "boot": []}, {"format": 1, "power": {"0": "SLEEPY"}, "boot": []},
    {"format": 1, "power": {"x": "ON"}, "boot": []}, {"format": 1, "power": {"0": "ON"}, "boot": [1]},
    {"format": 1, "power": [], "boot": []},
])
def test_restore_rejects_what_is_not_a_snapshot(data: dict[str, object]) -> None:
    h = handler()
    before = h.snapshot()
    with pytest.raises(ValueError):
        h.restore(data)
    assert h.snapshot() == before


def test_call_without_memory_or_vcpu_table_is_a_handler_failure() -> None:
    vm = bare_context()
    h = PsciHandler("psci", None, vm)
    with pytest.raises(LookupError):
        call(h, PSCI_VERSION)
    FACTS[vm].set_vcpus((VcpuInfo(0, 0, True), VcpuInfo(1, 1, False)))
    h.attach(reconnect=False)
    with pytest.raises(RuntimeError):
        call(h, CPU_ON64, 1, ENTRY, 0)


# ---------------------------------------------------------------- config

PSCI_VM = """
vm: t
{versions}
handlers:
  psci:
    type: psci
    options:
{options}
rules:
  - match: psci
    action: psci
"""


def psci_config(make_config: Callable[[str], VmConfig], options: str = "      {}", versions: str = "") -> VmConfig:
    return make_config(PSCI_VM.format(options=options, versions=versions))


def test_options_parse(make_config: Callable[[str], VmConfig]) -> None:
    config = psci_config(make_config, "      version: 1.3\n      allow_system_suspend: true\n"
                                      "      allow_reset2_vendor_types: false\n      cpu_suspend: full\n"
                                      "      power_state_format: extended")
    assert config.handlers["psci"].options == PsciOptions(VERSIONS["1.3"], True, False, "full", "extended")
    assert psci_config(make_config).handlers["psci"].options == PsciOptions()


@pytest.mark.parametrize(("options", "where", "message"), [
    ("      cpu_suspend: deep", "7:20", "'deep' is not valid; one of: standby-only, full"),
    ("      version: 1.4", "7:16", "'1.4' is not valid; one of: 0.2, 1.0, 1.1, 1.2, 1.3"),
    ("      allow_system_suspend: 1", "7:29", "must be true or false"),
    ("      power_state_format: packed", "7:27", "one of: original, extended"),
    ("      version: 0.2\n      power_state_format: extended", "8:27", "needs PSCI 1.0 or later"),
    ("      suspend: full", "7:7", "unknown key; valid keys: version, allow_system_suspend"),
])
def test_option_errors_name_file_line_column(make_config: Callable[[str], VmConfig], options: str, where: str,
                                             message: str) -> None:
    with pytest.raises(ConfigError) as err:
        psci_config(make_config, options)
    assert f"vm.yaml:{where}: error: handlers.psci.options." in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(("options", "pin", "offers"), [
    ("      {}", "1.4", "0.2, 1.0, 1.1, 1.2, 1.3"),
    ("      version: 1.1", "1.0", "1.1"),
    ("      power_state_format: extended", "0.2", "1.0, 1.1, 1.2, 1.3"),
])
def test_pinned_version_the_handler_cannot_offer(make_config: Callable[[str], VmConfig], options: str, pin: str,
                                                 offers: str) -> None:
    with pytest.raises(ConfigError) as err:
        psci_config(make_config, options, versions=f"versions: {{psci: \"{pin}\"}}")
    assert f"versions.psci pins {pin}, which handler type 'psci' cannot provide (it offers: {offers})" \
        in str(err.value)


def test_pinned_version_is_what_the_guest_sees(make_config: Callable[[str], VmConfig]) -> None:
    config = psci_config(make_config, versions='versions: {psci: "1.0"}')
    h = PsciHandler("psci", config.handlers["psci"].options, vm_context(pinned=config.versions["psci"]))
    h.attach(reconnect=False)
    assert x0(call(h, PSCI_VERSION)) == 0x1_0000


async def test_service_turns_a_handler_exception_into_internal_failure(
        make_config: Callable[[str], VmConfig]) -> None:
    service = VmService(psci_config(make_config))  # no VMM attached: the handler has no vCPU table
    reply = await service.dispatch(Call(1, 0, PSCI_VERSION, (0,) * 17))
    assert reg_to_signed(reply.regs[0]) == INTERNAL_FAILURE


# ---------------------------------------------------------------- the state machine

N_VCPUS = 5
#: Interesting register values: every vCPU's MPIDR, affinity levels, entry points
#: in and out of RAM, power states of both formats, reset types, junk.
REG_VALUES = st.one_of(
    st.sampled_from([mpidr(i) for i in range(N_VCPUS + 1)]),
    st.integers(0, 5),
    st.sampled_from([ENTRY, ENTRY | 1, RAM + RAM_SIZE, 0, ORIG_POWERDOWN, EXT_POWERDOWN, 0x8000_0001, 1 << 24,
                     1 << 32, (1 << 32) | mpidr(1)]),
    st.integers(0, (1 << 64) - 1),
)
FUNCTIONS = st.one_of(st.sampled_from(sorted(IMPLEMENTED)), st.sampled_from(ALL_IDS))
#: What each function may answer in x0 (DEN0022's per-function return tables,
#: narrowed to what this implementation gives).  None: any non-negative value.
ALLOWED = {
    CPU_SUSPEND: {SUCCESS, INVALID_PARAMETERS, INVALID_ADDRESS},
    CPU_OFF: {DENIED},
    CPU_ON: {SUCCESS, INVALID_PARAMETERS, INVALID_ADDRESS, ALREADY_ON, ON_PENDING},
    AFFINITY_INFO: {AFF_ON, AFF_OFF, AFF_ON_PENDING, INVALID_PARAMETERS},
    MIGRATE_INFO_TYPE: {2},
    SYSTEM_OFF: {INTERNAL_FAILURE},
    SYSTEM_RESET: {INTERNAL_FAILURE},
    PSCI_FEATURES: {SUCCESS, 1, 2, NOT_SUPPORTED},
    SYSTEM_SUSPEND: {SUCCESS, DENIED, INVALID_ADDRESS},
    SYSTEM_RESET2: {INTERNAL_FAILURE, INVALID_PARAMETERS},
    SYSTEM_OFF2: {INTERNAL_FAILURE, INVALID_PARAMETERS},
    PSCI_VERSION: {0x1_0003},
}


@dataclass
class Unconfirmed:
    """A CPU_ON effect the VMM has carried out or will, but not yet confirmed."""

    effect: Effect
    #: The target has run and made a call: its CALL overtook the EFFECT_DONE.
    started: bool = False


@dataclass
class ModelVmm:
    """What the VMM knows: which vCPUs run, and the power-ons it has not confirmed."""

    running: set[int] = field(default_factory=lambda: {0})
    unconfirmed: list[Unconfirmed] = field(default_factory=list)
    stopped: bool = False

    def waiting(self) -> dict[int, Unconfirmed]:
        """Targets whose power-on has not taken hold yet (at most one each)."""
        out: dict[int, Unconfirmed] = {}
        for u in self.unconfirmed:
            if not u.started:
                assert u.effect.vcpu not in out, "two power-ons in flight for one vCPU"
                out[u.effect.vcpu] = u
        return out

    def expected(self, i: int) -> Power:
        if i in self.waiting():
            return Power.ON_PENDING
        return Power.ON if i in self.running else Power.OFF


class PsciStateMachine(RuleBasedStateMachine):
    """Random PSCI calls from random running vCPUs, EFFECT_DONEs in any order
    (some failing), CALLs that overtake their EFFECT_DONE, VMM power events,
    resets, reconnects and snapshot/restore.  The power table must always equal
    what the VMM knows, and no answer may contradict it."""

    @initialize()
    def boot(self) -> None:
        self.h = handler(PsciOptions(allow_system_suspend=True, cpu_suspend="full"), n_vcpus=N_VCPUS,
                         pinned="1.3")
        self.vmm = ModelVmm()

    def _expected_aggregate(self, target: int, level: int) -> int:
        mask = 0xFF_00FF_FFFF & ~((1 << (0, 8, 16, 32)[level]) - 1)
        states = {self.vmm.expected(i) for i in range(N_VCPUS) if mpidr(i) & mask == target & mask}
        if not states:
            return INVALID_PARAMETERS
        return next(int(s) for s in (Power.ON, Power.ON_PENDING, Power.OFF) if s in states)

    @precondition(lambda self: self.vmm.running and not self.vmm.stopped)
    @rule(data=st.data(), fid=FUNCTIONS, regs=st.tuples(REG_VALUES, REG_VALUES, REG_VALUES), aarch32=st.booleans(),
          vmm_fails=st.booleans())
    def guest_call(self, data: st.DataObject, fid: int, regs: tuple[int, int, int], aarch32: bool,
                   vmm_fails: bool) -> None:
        caller = data.draw(st.sampled_from(sorted(self.vmm.running)), label="caller")
        self._check_call(caller, fid, regs, aarch32, vmm_fails)

    @precondition(lambda self: self.vmm.running and not self.vmm.stopped)
    @rule(data=st.data(), wide=st.booleans(), index=st.integers(0, N_VCPUS - 1),
          entry=st.sampled_from([ENTRY, RAM + RAM_SIZE]))
    def guest_cpu_on(self, data: st.DataObject, wide: bool, index: int, entry: int) -> None:
        """Well-formed CPU_ONs, which random registers seldom make."""
        caller = data.draw(st.sampled_from(sorted(self.vmm.running)), label="caller")
        self._check_call(caller, CPU_ON64 if wide else CPU_ON, (mpidr(index), entry, index), False, False)

    @precondition(lambda self: self.vmm.running and not self.vmm.stopped)
    @rule(data=st.data(), index=st.integers(0, N_VCPUS), level=st.integers(0, 4),
          fid=st.sampled_from([AFFINITY_INFO, AFFINITY_INFO64, CPU_OFF, SYSTEM_SUSPEND]))
    def guest_power_query(self, data: st.DataObject, index: int, level: int, fid: int) -> None:
        caller = data.draw(st.sampled_from(sorted(self.vmm.running)), label="caller")
        regs = (ENTRY, 0, 0) if fid == SYSTEM_SUSPEND else (mpidr(index), level, 0)
        self._check_call(caller, fid, regs, False, False)

    def _check_call(self, caller: int, fid: int, regs: tuple[int, int, int], aarch32: bool, vmm_fails: bool) -> None:
        before = {i: self.vmm.expected(i) for i in range(N_VCPUS)}
        result = call(self.h, fid, *regs, vcpu=caller, aarch32=aarch32)
        ret = x0(result)
        base = fid & ~0x4000_0000
        if fid not in IMPLEMENTED or (aarch32 and fid & 0x4000_0000):
            assert ret == NOT_SUPPORTED and not result.effects
            return
        assert ret in ALLOWED[base], (hex(fid), ret)
        mask = 0xFFFF_FFFF if fid == base else (1 << 64) - 1  # SMC32 reads w1, w2
        x1, x2 = regs[0] & mask, regs[1] & mask
        if base == CPU_ON:
            target = next((i for i in range(N_VCPUS) if mpidr(i) == x1), None)
            if ret == SUCCESS:
                assert target is not None and before[target] is Power.OFF, "CPU_ON of a vCPU that is not off"
            elif ret == ALREADY_ON:
                assert target is not None and before[target] is Power.ON, "ALREADY_ON for a vCPU that is not on"
            elif ret == ON_PENDING:
                assert target is not None and before[target] is Power.ON_PENDING
            elif ret == INVALID_PARAMETERS:
                assert target is None
        elif base == AFFINITY_INFO and ret != INVALID_PARAMETERS:
            assert x2 <= 3 and ret == self._expected_aggregate(x1, x2)
        elif base == SYSTEM_SUSPEND:
            others_off = all(s is Power.OFF for i, s in before.items() if i != caller)
            assert (ret == DENIED) != others_off
        for effect in result.effects:
            self._vmm_applies(caller, effect, vmm_fails)

    def _vmm_applies(self, caller: int, effect: Effect, fails: bool) -> None:
        kind = effect.kind
        if kind is EffectKind.CPU_ON:
            assert effect.vcpu not in self.vmm.waiting(), "two power-ons in flight for one vCPU"
            assert effect.vcpu not in self.vmm.running, "a power-on for a vCPU that runs"
            self.vmm.unconfirmed.append(Unconfirmed(effect))
        elif kind is EffectKind.CPU_OFF:
            assert effect.vcpu == caller
            if not fails:
                self.vmm.running.discard(caller)
            self.h.effect_done(effect, -16 if fails else 0)
        elif kind in (EffectKind.CPU_SUSPEND, EffectKind.SYSTEM_SUSPEND, EffectKind.CPU_STANDBY):
            assert effect.vcpu == caller
            self.h.effect_done(effect, 0)  # woken at once (a standby returns, the others resume at entry)
        elif kind is EffectKind.SYSTEM_OFF:
            self.vmm.stopped = True
        elif kind is EffectKind.SYSTEM_RESET:
            self.vmm = ModelVmm()
            self.h.event(VmEvent(EventKind.VM_RESET))

    @precondition(lambda self: self.vmm.unconfirmed and not self.vmm.stopped)
    @rule(data=st.data(), ok=st.booleans())
    def vmm_confirms(self, data: st.DataObject, ok: bool) -> None:
        """EFFECT_DONE for any outstanding power-on, in any order; a failure only for
        one whose target never ran."""
        u = self.vmm.unconfirmed.pop(data.draw(st.integers(0, len(self.vmm.unconfirmed) - 1), label="which"))
        ok = ok or u.started
        if ok and not u.started:
            self.vmm.running.add(u.effect.vcpu)
        self.h.effect_done(u.effect, 0 if ok else -22)

    @precondition(lambda self: self.vmm.waiting() and not self.vmm.stopped)
    @rule(data=st.data())
    def new_vcpu_calls_before_effect_done(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(sorted(self.vmm.waiting())), label="target")
        self.vmm.waiting()[target].started = True
        self.vmm.running.add(target)
        assert x0(call(self.h, PSCI_VERSION, vcpu=target)) == 0x1_0003

    @precondition(lambda self: not self.vmm.stopped and len(self.vmm.waiting()) < N_VCPUS)
    @rule(data=st.data())
    def vmm_powers_a_vcpu(self, data: st.DataObject) -> None:
        """An operator or the VMM itself changes a vCPU's power (VCPU_POWER event)."""
        idle = sorted(set(range(N_VCPUS)) - set(self.vmm.waiting()))
        target = data.draw(st.sampled_from(idle), label="target")
        on = target not in self.vmm.running
        (self.vmm.running.add if on else self.vmm.running.discard)(target)
        self.h.event(VmEvent(EventKind.VCPU_POWER, target, int(on)))

    @precondition(lambda self: not self.vmm.stopped)
    @rule()
    def vmm_reconnects(self) -> None:
        FACTS[self.h.vm].set_vcpus(tuple(VcpuInfo(i, mpidr(i), i in self.vmm.running) for i in range(N_VCPUS)))
        self.h.attach(reconnect=True)
        # The VMM confirms what it confirms over the new connection; nothing is lost.

    @precondition(lambda self: self.vmm.stopped)
    @rule()
    def vmm_starts_a_new_vm(self) -> None:
        self.vmm = ModelVmm()
        FACTS[self.h.vm].set_vcpus(tuple(VcpuInfo(i, mpidr(i), i == 0) for i in range(N_VCPUS)))
        self.h.attach(reconnect=False)

    @precondition(lambda self: not self.vmm.unconfirmed)
    @rule()
    def daemon_restores_a_snapshot(self) -> None:
        """A restart with nothing in flight: confirmations of effects the old daemon
        returned never reach a new one (VmService keeps them per instance)."""
        fresh = PsciHandler("psci", self.h.options, self.h.vm)
        fresh.restore(json.loads(json.dumps(self.h.snapshot())))
        self.h = fresh

    @invariant()
    def power_table_is_what_the_vmm_knows(self) -> None:
        if self.vmm.stopped:
            return
        assert {i: self.h.power[i] for i in range(N_VCPUS)} == {i: self.vmm.expected(i) for i in range(N_VCPUS)}


PsciStateMachine.TestCase.settings = settings(stateful_step_count=40, deadline=None,  # examples: the profile
                                              suppress_health_check=[HealthCheck.too_slow])
test_psci_state_machine = PsciStateMachine.TestCase
