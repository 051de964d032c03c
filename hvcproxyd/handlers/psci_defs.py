"""PSCI constants (Arm DEN0022 F.b), in one place for the handler and its tests.

Values are checked against DEN0022 and Linux's include/uapi/linux/psci.h.
Spec references name the function whose section defines the value.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple

from ..smccc import SMC64

FN32_BASE: Final = 0x8400_0000
FN64_BASE: Final = FN32_BASE | SMC64


class Fn(enum.IntEnum):
    """Function IDs (DEN0022 function list).  ``*_64`` is the SMC64/HVC64 variant."""

    PSCI_VERSION = FN32_BASE | 0x00
    CPU_SUSPEND = FN32_BASE | 0x01
    CPU_SUSPEND_64 = FN64_BASE | 0x01
    CPU_OFF = FN32_BASE | 0x02
    CPU_ON = FN32_BASE | 0x03
    CPU_ON_64 = FN64_BASE | 0x03
    AFFINITY_INFO = FN32_BASE | 0x04
    AFFINITY_INFO_64 = FN64_BASE | 0x04
    MIGRATE = FN32_BASE | 0x05
    MIGRATE_64 = FN64_BASE | 0x05
    MIGRATE_INFO_TYPE = FN32_BASE | 0x06
    MIGRATE_INFO_UP_CPU = FN32_BASE | 0x07
    MIGRATE_INFO_UP_CPU_64 = FN64_BASE | 0x07
    SYSTEM_OFF = FN32_BASE | 0x08
    SYSTEM_RESET = FN32_BASE | 0x09
    PSCI_FEATURES = FN32_BASE | 0x0A
    CPU_FREEZE = FN32_BASE | 0x0B
    CPU_DEFAULT_SUSPEND = FN32_BASE | 0x0C
    CPU_DEFAULT_SUSPEND_64 = FN64_BASE | 0x0C
    NODE_HW_STATE = FN32_BASE | 0x0D
    NODE_HW_STATE_64 = FN64_BASE | 0x0D
    SYSTEM_SUSPEND = FN32_BASE | 0x0E
    SYSTEM_SUSPEND_64 = FN64_BASE | 0x0E
    PSCI_SET_SUSPEND_MODE = FN32_BASE | 0x0F
    PSCI_STAT_RESIDENCY = FN32_BASE | 0x10
    PSCI_STAT_RESIDENCY_64 = FN64_BASE | 0x10
    PSCI_STAT_COUNT = FN32_BASE | 0x11
    PSCI_STAT_COUNT_64 = FN64_BASE | 0x11
    SYSTEM_RESET2 = FN32_BASE | 0x12
    SYSTEM_RESET2_64 = FN64_BASE | 0x12
    MEM_PROTECT = FN32_BASE | 0x13
    MEM_PROTECT_CHECK_RANGE = FN32_BASE | 0x14
    MEM_PROTECT_CHECK_RANGE_64 = FN64_BASE | 0x14
    SYSTEM_OFF2 = FN32_BASE | 0x15
    SYSTEM_OFF2_64 = FN64_BASE | 0x15


class Ret(enum.IntEnum):
    """Return codes (DEN0022 "Return error codes"), sign-extended into x0."""

    SUCCESS = 0
    NOT_SUPPORTED = -1
    INVALID_PARAMETERS = -2
    DENIED = -3
    ALREADY_ON = -4
    ON_PENDING = -5
    INTERNAL_FAILURE = -6
    NOT_PRESENT = -7
    DISABLED = -8
    INVALID_ADDRESS = -9


class Power(enum.IntEnum):
    """A vCPU's power state; the values are AFFINITY_INFO's answers (DEN0022 §5.7)."""

    ON = 0
    OFF = 1
    ON_PENDING = 2


class Version(NamedTuple):
    major: int
    minor: int

    @property
    def encoded(self) -> int:
        """PSCI_VERSION's answer: major in bits 31:16, minor in 15:0."""
        return self.major << 16 | self.minor

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


V0_2: Final = Version(0, 2)
V1_0: Final = Version(1, 0)
V1_1: Final = Version(1, 1)
V1_2: Final = Version(1, 2)
V1_3: Final = Version(1, 3)
#: What the handler can be pinned to: every version KVM's KVM_REG_ARM_PSCI_VERSION
#: accepts but 0.1, which used KVM-private IDs (denied, not served).  1.2 adds no
#: function over 1.1 (KVM's psci.c answers it with 1.1's table).
VERSIONS: Final = {str(v): v for v in (V0_2, V1_0, V1_1, V1_2, V1_3)}
#: What a guest of current KVM sees unless the VMM pins another (KVM_ARM_PSCI_LATEST).
DEFAULT_VERSION: Final = V1_3

#: The version each function appeared in; anything absent is NOT_SUPPORTED.
#: MIGRATE/MIGRATE_INFO_UP_CPU are absent on purpose: MIGRATE_INFO_TYPE says
#: there is no trusted OS to migrate (DEN0022 MIGRATE, MIGRATE_INFO_UP_CPU), as KVM does.
SINCE: Final[dict[int, Version]] = {
    Fn.PSCI_VERSION: V0_2,
    Fn.CPU_SUSPEND: V0_2, Fn.CPU_SUSPEND_64: V0_2,
    Fn.CPU_OFF: V0_2,
    Fn.CPU_ON: V0_2, Fn.CPU_ON_64: V0_2,
    Fn.AFFINITY_INFO: V0_2, Fn.AFFINITY_INFO_64: V0_2,
    Fn.MIGRATE_INFO_TYPE: V0_2,
    Fn.SYSTEM_OFF: V0_2,
    Fn.SYSTEM_RESET: V0_2,
    Fn.PSCI_FEATURES: V1_0,
    Fn.SYSTEM_SUSPEND: V1_0, Fn.SYSTEM_SUSPEND_64: V1_0,
    Fn.SYSTEM_RESET2: V1_1, Fn.SYSTEM_RESET2_64: V1_1,
    Fn.SYSTEM_OFF2: V1_3, Fn.SYSTEM_OFF2_64: V1_3,
}

#: MIGRATE_INFO_TYPE: no trusted OS that needs migrating.
TOS_NOT_PRESENT_MP: Final = 2

#: AFFINITY_INFO's lowest_affinity_level may be 0..3 (DEN0022 §5.7); Aff3 lives in MPIDR 39:32.
MAX_AFFINITY_LEVEL: Final = 3
AFF_SHIFTS: Final = (0, 8, 16, 32)

# CPU_SUSPEND power_state (DEN0022 §5.4.2).  Original format: StateID 15:0, StateType 16,
# PowerLevel 25:24, the rest reserved.  Extended format (1.0+): StateID 27:0,
# StateType 30, the rest reserved.
ORIG_STATE_TYPE: Final = 1 << 16
ORIG_VALID_MASK: Final = 0x0301_FFFF
EXT_STATE_TYPE: Final = 1 << 30
EXT_VALID_MASK: Final = 0x4FFF_FFFF

# PSCI_FEATURES(CPU_SUSPEND) flags (DEN0022 PSCI_FEATURES): bit 1 = extended StateID format,
# bit 0 = OS-initiated mode supported (never: PSCI_SET_SUSPEND_MODE is not offered).
FEATURE_EXTENDED_STATE_ID: Final = 1 << 1

# SYSTEM_RESET2 reset_type (DEN0022 SYSTEM_RESET2): bit 31 = vendor-specific; architectural type 0
# is the only one defined (warm reset).
RESET2_WARM: Final = 0
RESET2_VENDOR: Final = 1 << 31

# SYSTEM_OFF2 type (DEN0022 1.3 SYSTEM_OFF2): HIBERNATE_OFF = BIT(0).  F.b requires 0 to be
# taken as HIBERNATE_OFF too, and the cookie must be zero (KVM does the same).
OFF2_HIBERNATE: Final = 1
#: PSCI_FEATURES(SYSTEM_OFF2): a bitmask of the off types supported.
OFF2_TYPES_SUPPORTED: Final = 1 << 0

#: SMCCC_VERSION: guests discover it through PSCI_FEATURES (DEN0028), so PSCI
#: answers for it although KVM or the VMM serves the call itself, as KVM does.
SMCCC_VERSION_FN: Final = 0x8000_0000

# Effect argument values (docs/protocol.md §3.5).
EFFECT_RESET_COLD: Final = 0
EFFECT_RESET_WARM: Final = 1
EFFECT_OFF_PLAIN: Final = 0
EFFECT_OFF_HIBERNATE: Final = 1
