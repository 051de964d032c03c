"""Named services a rule may match, as inclusive function-ID ranges.

Each range lies within one owner's 64K call block, like every rule range.
Sources: DEN0022 (PSCI), DEN0077 (FF-A), DEN0098 (TRNG), DEN0057 (PV time),
Linux include/linux/arm-smccc.h (vendor hyp), OP-TEE optee_smc.h.
"""

from __future__ import annotations

from . import Owner, owner_ranges

#: KVM's legacy PSCI 0.1 IDs (KVM_PSCI_FN_BASE, 4 functions); the PSCI RFCs deny them.
PSCI_0_1_BASE = 0x95C1BA5E

SERVICES: dict[str, tuple[tuple[int, int], ...]] = {
    "psci": ((0x8400_0000, 0x8400_001F), (0xC400_0000, 0xC400_001F)),
    "psci-0.1": ((PSCI_0_1_BASE, PSCI_0_1_BASE + 3),),
    "trng": ((0x8400_0050, 0x8400_005F), (0xC400_0050, 0xC400_005F)),
    "ffa": ((0x8400_0060, 0x8400_00FF), (0xC400_0060, 0xC400_00FF)),
    "pv-time": ((0xC500_0020, 0xC500_0021),),
    "kvm-vendor": tuple(owner_ranges(Owner.VENDOR_HYP)),
    # KVM's PTP clock (ARM_SMCCC_VENDOR_HYP_KVM_PTP_FUNC_ID, ptp_kvm), inside kvm-vendor.
    "kvm-ptp": ((0x8600_0001, 0x8600_0001),),
    # OP-TEE: its calls live in trusted-OS owner 50, its API discovery in owner 63.
    "optee": tuple(owner_ranges(50) + owner_ranges(63)),
}

SERVICE_NAMES: tuple[str, ...] = tuple(SERVICES)


#: The query a guest makes before any other call of a standard service, by service.
SERVICE_PROBES: dict[str, tuple[int, str]] = {
    "psci": (0x8400_0000, "PSCI_VERSION"), "ffa": (0x8400_0063, "FFA_VERSION"),
    "trng": (0x8400_0050, "TRNG_VERSION"), "pv-time": (0xC500_0020, "PV_TIME_FEATURES")}


def service_of(fid: int) -> str | None:
    """The named service whose ranges hold the routing ID ``fid``, if any."""
    for name, ranges in SERVICES.items():
        if any(lo <= fid <= hi for lo, hi in ranges):
            return name
    return None
