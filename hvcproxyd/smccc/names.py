"""The one registry of SMCCC function names: for logs, trace, metrics and
``check`` output, and for turning a name typed by an operator back into an ID.
Never used for routing.
"""

from __future__ import annotations

from functools import cache

from . import SMC64, routing_id

_PSCI = ["VERSION", "CPU_SUSPEND", "CPU_OFF", "CPU_ON", "AFFINITY_INFO", "MIGRATE", "MIGRATE_INFO_TYPE",
         "MIGRATE_INFO_UP_CPU", "SYSTEM_OFF", "SYSTEM_RESET", "FEATURES", "CPU_FREEZE",
         "CPU_DEFAULT_SUSPEND", "NODE_HW_STATE", "SYSTEM_SUSPEND", "SET_SUSPEND_MODE", "STAT_RESIDENCY",
         "STAT_COUNT", "SYSTEM_RESET2", "MEM_PROTECT", "MEM_PROTECT_CHECK_RANGE", "SYSTEM_OFF2"]
_FFA = {0x60: "ERROR", 0x61: "SUCCESS", 0x62: "INTERRUPT", 0x63: "VERSION", 0x64: "FEATURES",
        0x65: "RX_RELEASE", 0x66: "RXTX_MAP", 0x67: "RXTX_UNMAP", 0x68: "PARTITION_INFO_GET",
        0x69: "ID_GET", 0x6A: "MSG_POLL", 0x6B: "MSG_WAIT", 0x6C: "YIELD", 0x6D: "RUN", 0x6E: "MSG_SEND",
        0x6F: "MSG_SEND_DIRECT_REQ", 0x70: "MSG_SEND_DIRECT_RESP", 0x71: "MEM_DONATE", 0x72: "MEM_LEND",
        0x73: "MEM_SHARE", 0x74: "MEM_RETRIEVE_REQ", 0x75: "MEM_RETRIEVE_RESP", 0x76: "MEM_RELINQUISH",
        0x77: "MEM_RECLAIM", 0x7A: "MEM_FRAG_RX", 0x7B: "MEM_FRAG_TX",
        0x7D: "NOTIFICATION_BITMAP_CREATE", 0x7E: "NOTIFICATION_BITMAP_DESTROY", 0x7F: "NOTIFICATION_BIND",
        0x80: "NOTIFICATION_UNBIND", 0x81: "NOTIFICATION_SET", 0x82: "NOTIFICATION_GET",
        0x83: "NOTIFICATION_INFO_GET", 0x84: "RX_ACQUIRE",
        0x85: "SPM_ID_GET", 0x86: "MSG_SEND2", 0x8B: "PARTITION_INFO_GET_REGS",
        0x8D: "MSG_SEND_DIRECT_REQ2", 0x8E: "MSG_SEND_DIRECT_RESP2"}
_EXACT = {
    0x8000_0000: "SMCCC_VERSION", 0x8000_0001: "SMCCC_ARCH_FEATURES", 0x8000_0002: "SMCCC_ARCH_SOC_ID",
    0x8000_8000: "SMCCC_ARCH_WORKAROUND_1", 0x8000_7FFF: "SMCCC_ARCH_WORKAROUND_2",
    0x8000_3FFF: "SMCCC_ARCH_WORKAROUND_3",
    0x8400_0050: "TRNG_VERSION", 0x8400_0051: "TRNG_FEATURES", 0x8400_0052: "TRNG_GET_UUID",
    0x8400_0053: "TRNG_RND32", 0xC400_0053: "TRNG_RND64",
    0xC500_0020: "PV_TIME_FEATURES", 0xC500_0021: "PV_TIME_ST",
    0x8600_0000: "KVM_FUNC_FEATURES", 0x8600_0001: "KVM_PTP", 0xC600_0002: "KVM_HYP_MEMINFO",
    0xC600_0003: "KVM_MEM_SHARE", 0xC600_0004: "KVM_MEM_UNSHARE", 0xC600_0007: "KVM_MMIO_GUARD",
    0xB200_0000: "OPTEE_GET_OS_UUID", 0xB200_0001: "OPTEE_GET_OS_REVISION",
    0xB200_0007: "OPTEE_GET_SHM_CONFIG", 0xB200_0009: "OPTEE_EXCHANGE_CAPABILITIES",
    0xB200_000D: "OPTEE_VM_CREATED", 0xB200_000E: "OPTEE_VM_DESTROYED",
    0xB200_000F: "OPTEE_GET_THREAD_COUNT", 0x3200_0004: "OPTEE_CALL_WITH_ARG",
    0x3200_0003: "OPTEE_RETURN_FROM_RPC",
}
_DISCOVERY = {0xFF00: "CALL_COUNT", 0xFF01: "CALL_UID", 0xFF03: "REVISION"}
_OWNER = {0: "ARCH", 1: "CPU", 2: "SIP", 3: "OEM", 4: "STD", 5: "STD_HYP", 6: "VENDOR_HYP"}

# Argument names of calls whose meaning is fixed by their spec, keyed by the
# 32-bit routing ID (a 64-bit variant takes the same arguments).
_PSCI_ARGS = {0x01: ("power_state", "entry", "context"), 0x03: ("target", "entry", "context"),
              0x04: ("target", "level"), 0x05: ("target",), 0x0A: ("function",),
              0x0C: ("entry", "context"), 0x0D: ("target", "level"), 0x0E: ("entry", "context"),
              0x0F: ("mode",), 0x10: ("target", "power_state"), 0x11: ("target", "power_state"),
              0x12: ("type", "cookie"), 0x13: ("enable",), 0x14: ("base", "length"), 0x15: ("type", "cookie")}
_ARGS: dict[int, tuple[str, ...]] = {0x8400_0000 | n: names for n, names in _PSCI_ARGS.items()}
_ARGS.update({
    0x8000_0001: ("function",), 0x8400_0053: ("bits",),
    0x8400_0063: ("version",), 0x8400_0064: ("function", "properties"),
    0x8400_0066: ("tx", "rx", "pages"), 0x8400_0068: ("uuid0", "uuid1", "uuid2", "uuid3", "flags"),
    0x8400_006F: ("endpoints", "flags", "w3", "w4", "w5", "w6", "w7"),
    0x8400_0071: ("length", "fragment", "buffer", "pages"), 0x8400_0072: ("length", "fragment", "buffer", "pages"),
    0x8400_0073: ("length", "fragment", "buffer", "pages"), 0x8400_0077: ("handle_lo", "handle_hi", "flags"),
    0x8600_0003: ("ipa", "count"), 0x8600_0004: ("ipa", "count"), 0x8600_0007: ("ipa",),
    0x8500_0021: ("features",), 0x3200_0004: ("arg_hi", "arg_lo", "cache", "w4", "w5", "w6", "client"),
})


def function_name(fid: int) -> str | None:
    """``PSCI_CPU_ON64``, ``SIP_CALL_UID``, ...; None for an ID no spec names."""
    fid = routing_id(fid)
    if fid in _EXACT:
        return _EXACT[fid]
    if fid & 0x3F00_0000 == 0x0400_0000 and fid & 0x8000_0000:  # standard secure service (bit 30: SMC64)
        n = fid & 0xFFFF
        suffix = "64" if fid & 0x4000_0000 else ""
        if n < len(_PSCI):
            return f"PSCI_{_PSCI[n]}{suffix}"
        if n in _FFA:
            return f"FFA_{_FFA[n]}{suffix}"
    if fid & 0x8000_0000 and fid & 0xFFFF in _DISCOVERY:
        owner = (fid >> 24) & 0x3F
        prefix = _OWNER.get(owner, "TOS" if owner >= 50 else "TAPP" if owner >= 48 else f"OWNER{owner}")
        return f"{prefix}{owner if owner >= 48 else ''}_{_DISCOVERY[fid & 0xFFFF]}"
    return None


def describe(fid: int) -> str:
    """The name, or the ID in hex when no spec names it."""
    return function_name(fid) or f"{fid:#010x}"


def argument_names(fid: int) -> tuple[str, ...] | None:
    """The names of x1.. for a call whose spec fixes them, else None."""
    return _ARGS.get(routing_id(fid) & ~SMC64)


@cache
def _by_name() -> dict[str, int]:
    ids = [0x8000_0000 | n for n in (0, 1, 2, 0x3FFF, 0x7FFF, 0x8000)]
    ids += [base | n for base in (0x8400_0000, 0xC400_0000) for n in range(0x100)]
    ids += [0x8000_0000 | owner << 24 | fn for owner in range(64) for fn in _DISCOVERY]
    ids += list(_EXACT)
    table: dict[str, int] = {}
    for fid in ids:
        name = function_name(fid)
        if name is not None:
            table.setdefault(name, fid)
    return table


def function_id(text: str) -> int | None:
    """A function ID from a number (``0x84000003``) or a name (``PSCI_CPU_ON``, any case)."""
    try:
        return int(text, 0) & 0xFFFF_FFFF
    except ValueError:
        return _by_name().get(text.upper())


__all__ = ["argument_names", "describe", "function_id", "function_name"]
