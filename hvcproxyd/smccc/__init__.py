"""The SMCCC function-ID model (Arm DEN0028), shared by every layer.

Kept free of I/O so the codec, the rule compiler and the handlers can all
agree on one definition of "owner", "fast", "64-bit" and the return codes.
The one registry of names lives in :mod:`.names`, services and their ranges
in :mod:`.services`, result conventions in :mod:`.results`.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

MASK32 = 0xFFFF_FFFF
MASK64 = 0xFFFF_FFFF_FFFF_FFFF

FAST_CALL = 1 << 31
SMC64 = 1 << 30
OWNER_SHIFT = 24
OWNER_MASK = 0x3F
#: Bits 23:17 must be zero in a valid function ID (DEN0028 §2.5).
MBZ_MASK = 0x00FE_0000
#: SMCCC 1.3 SVE-state hint: not part of the function's identity (DEN0028 §2.5.1).
SVE_HINT = 1 << 16
FUNC_NUM_MASK = 0xFFFF

# Discovery queries every owner range answers (DEN0028 §6), as function numbers.
CALL_COUNT_FN = 0xFF00
CALL_UID_FN = 0xFF01
REVISION_FN = 0xFF03
DISCOVERY_FNS = (CALL_COUNT_FN, CALL_UID_FN, REVISION_FN)


class Owner(enum.IntEnum):
    ARCH = 0
    CPU = 1
    SIP = 2
    OEM = 3
    STANDARD = 4
    STANDARD_HYP = 5
    VENDOR_HYP = 6
    TRUSTED_APP = 48
    TRUSTED_OS = 50  # 50..63; OP-TEE uses 50, 62 and 63


TRUSTED_APP_OWNERS = range(48, 50)
TRUSTED_OS_OWNERS = range(50, 64)


class Conduit(enum.IntEnum):
    HVC = 0
    SMC = 1


class SmcccResult(enum.IntEnum):
    SUCCESS = 0
    NOT_SUPPORTED = -1
    NOT_REQUIRED = -2
    INVALID_PARAMETER = -3


def reg_to_signed(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def func_id(owner: int, number: int, *, fast: bool = True, smc64: bool = False) -> int:
    return (FAST_CALL if fast else 0) | (SMC64 if smc64 else 0) | (owner << OWNER_SHIFT) | number


def routing_id(fid: int) -> int:
    """The function ID a rule table is keyed on: for an SMCCC ID (bits 23:17 clear)
    the SVE hint is dropped, since it is not part of the function's identity;
    IDs outside SMCCC's layout (KVM's legacy PSCI 0.1 IDs have bit 16 set) are
    taken as they are."""
    fid &= MASK32
    return fid if fid & MBZ_MASK else fid & ~SVE_HINT


@dataclass(frozen=True, slots=True)
class FunctionId:
    """A decoded function ID; for logs, checks and docs, not the hot path."""

    raw: int

    @property
    def fast(self) -> bool:
        return bool(self.raw & FAST_CALL)

    @property
    def smc64(self) -> bool:
        return bool(self.raw & SMC64)

    @property
    def owner(self) -> int:
        return (self.raw >> OWNER_SHIFT) & OWNER_MASK

    @property
    def number(self) -> int:
        return self.raw & FUNC_NUM_MASK

    @property
    def well_formed(self) -> bool:
        # Yielding calls exist only for trusted apps and trusted OSes (DEN0028 §2.5).
        if self.raw & MBZ_MASK:
            return False
        return self.fast or self.owner >= Owner.TRUSTED_APP


def owner_ranges(owner: int) -> list[tuple[int, int]]:
    """Every inclusive function-ID range an owner holds: fast 32/64 and, for trusted
    apps/OSes, yielding 32/64.  The SVE hint bit is outside these ranges on purpose:
    routing strips it first."""
    base = owner << OWNER_SHIFT
    spans = [FAST_CALL | base, FAST_CALL | SMC64 | base]
    if owner >= Owner.TRUSTED_APP:
        spans += [base, SMC64 | base]
    return [(lo, lo | FUNC_NUM_MASK) for lo in sorted(spans)]


def fast_owner_ranges(owner: int) -> list[tuple[int, int]]:
    base = FAST_CALL | (owner << OWNER_SHIFT)
    return [(base, base | FUNC_NUM_MASK), (base | SMC64, base | SMC64 | FUNC_NUM_MASK)]


#: KVM refuses any filter entry here (EEXIST): the Arm architecture service.
ARCH_RESERVED_RANGES = tuple(fast_owner_ranges(Owner.ARCH))


def has_abi_identity(owner: int) -> bool:
    """Owners whose UID tells a guest which ABI it is talking to; a range of theirs
    must be owned whole so a guest never sees a stale identity (REFERENCE §1)."""
    return owner == Owner.VENDOR_HYP or owner in TRUSTED_OS_OWNERS


def uuid_to_regs(uuid_text: str) -> tuple[int, int, int, int]:
    """A UUID as the four w0..w3 words of an SMCCC UID query.

    SMCCC returns the UUID's 16 bytes as four little-endian 32-bit words (DEN0028
    §6.3 and Linux's UUID_INIT/SMCCC_UID helpers), which is why KVM's
    28b46fb6-2ec5-11e9-a9ca-4b564d003a74 reads back as 0xb66fb428, ...
    """
    raw = uuid.UUID(uuid_text).bytes
    return tuple(int.from_bytes(raw[i : i + 4], "little") for i in range(0, 16, 4))  # type: ignore[return-value]
