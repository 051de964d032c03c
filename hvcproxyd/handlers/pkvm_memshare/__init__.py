"""The pKVM memshare handler (:mod:`.handler`) and its ledger (:mod:`.ledger`)."""

from .handler import (
    FEATURES_ID,
    HYP_MEMINFO_ID,
    KVM_FUNC_HAS_RANGE,
    KVM_UID,
    MEM_SHARE_ID,
    MEM_UNSHARE_ID,
    MMIO_GUARD_ID,
    MemshareHandler,
    MemshareOptions,
    default_socket,
)
from .ledger import Change, Ledger

__all__ = ["FEATURES_ID", "HYP_MEMINFO_ID", "KVM_FUNC_HAS_RANGE", "KVM_UID", "MEM_SHARE_ID", "MEM_UNSHARE_ID",
           "MMIO_GUARD_ID", "Change", "Ledger", "MemshareHandler", "MemshareOptions", "default_socket"]
