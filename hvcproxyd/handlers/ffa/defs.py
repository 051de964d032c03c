"""FF-A ABI constants (Arm DEN0077 1.2): function IDs, error codes, versions,
property bits and descriptor sizes, in one place so the other modules never
spell a number twice.  Checked against Linux include/linux/arm_ffa.h and
drivers/firmware/arm_ffa/driver.c (6.12)."""

from __future__ import annotations

import enum
from typing import Final

FFA_32: Final = 0x8400_0000
FFA_64: Final = 0xC400_0000


class Fn(enum.IntEnum):
    """Function numbers (the low 16 bits of the ID); DEN0077 1.2 table 13.1."""

    ERROR = 0x60
    SUCCESS = 0x61
    INTERRUPT = 0x62
    VERSION = 0x63
    FEATURES = 0x64
    RX_RELEASE = 0x65
    RXTX_MAP = 0x66
    RXTX_UNMAP = 0x67
    PARTITION_INFO_GET = 0x68
    ID_GET = 0x69
    MSG_POLL = 0x6A
    MSG_WAIT = 0x6B
    YIELD = 0x6C
    RUN = 0x6D
    MSG_SEND = 0x6E
    MSG_SEND_DIRECT_REQ = 0x6F
    MSG_SEND_DIRECT_RESP = 0x70
    MEM_DONATE = 0x71
    MEM_LEND = 0x72
    MEM_SHARE = 0x73
    MEM_RETRIEVE_REQ = 0x74
    MEM_RETRIEVE_RESP = 0x75
    MEM_RELINQUISH = 0x76
    MEM_RECLAIM = 0x77
    MEM_FRAG_RX = 0x7A
    MEM_FRAG_TX = 0x7B
    NOTIFICATION_BITMAP_CREATE = 0x7D
    NOTIFICATION_BITMAP_DESTROY = 0x7E
    NOTIFICATION_BIND = 0x7F
    NOTIFICATION_UNBIND = 0x80
    NOTIFICATION_SET = 0x81
    NOTIFICATION_GET = 0x82
    NOTIFICATION_INFO_GET = 0x83
    RX_ACQUIRE = 0x84
    SPM_ID_GET = 0x85
    MSG_SEND2 = 0x86
    PARTITION_INFO_GET_REGS = 0x8B
    MSG_SEND_DIRECT_REQ2 = 0x8D
    MSG_SEND_DIRECT_RESP2 = 0x8E


def fid32(fn: int) -> int:
    return FFA_32 | fn


def fid64(fn: int) -> int:
    return FFA_64 | fn


ERROR: Final = fid32(Fn.ERROR)
SUCCESS32: Final = fid32(Fn.SUCCESS)
SUCCESS64: Final = fid64(Fn.SUCCESS)


class Err(enum.IntEnum):
    """FF-A status codes, carried in w2 of FFA_ERROR (DEN0077 1.2 table 12.2)."""

    NOT_SUPPORTED = -1
    INVALID_PARAMETERS = -2
    NO_MEMORY = -3
    BUSY = -4
    INTERRUPTED = -5
    DENIED = -6
    RETRY = -7
    ABORTED = -8
    NO_DATA = -9


class FfaError(Exception):
    """A guest-visible FF-A error raised inside the handler's helpers and turned
    into FFA_ERROR at the one exit; never escapes the handler."""

    def __init__(self, code: Err, why: str = "") -> None:
        super().__init__(f"{code.name}: {why}" if why else code.name)
        self.code = code


def version(major: int, minor: int) -> int:
    return (major << 16) | minor


V1_0: Final = version(1, 0)
V1_1: Final = version(1, 1)
V1_2: Final = version(1, 2)
VERSIONS: Final = {"1.0": V1_0, "1.1": V1_1, "1.2": V1_2}

#: Which version introduced a function: older callers get NOT_SUPPORTED for newer ones.
SINCE: Final[dict[int, int]] = {
    Fn.NOTIFICATION_BITMAP_CREATE: V1_1, Fn.NOTIFICATION_BITMAP_DESTROY: V1_1, Fn.NOTIFICATION_BIND: V1_1,
    Fn.NOTIFICATION_UNBIND: V1_1, Fn.NOTIFICATION_SET: V1_1, Fn.NOTIFICATION_GET: V1_1,
    Fn.NOTIFICATION_INFO_GET: V1_1, Fn.RX_ACQUIRE: V1_1, Fn.SPM_ID_GET: V1_1, Fn.MSG_SEND2: V1_1,
    Fn.PARTITION_INFO_GET_REGS: V1_2, Fn.MSG_SEND_DIRECT_REQ2: V1_2, Fn.MSG_SEND_DIRECT_RESP2: V1_2,
}

PAGE: Final = 4096
#: Endpoint ID 0 is the hypervisor's; bit 15 set marks a secure-world (SP) ID.
HYPERVISOR_ID: Final = 0
SECURE_BIT: Final = 0x8000
DEFAULT_SPM_ID: Final = 0x8000

# Partition properties (DEN0077 1.2 table 6.2).
PROP_DIRECT_RECV: Final = 1 << 0
PROP_DIRECT_SEND: Final = 1 << 1
PROP_INDIRECT: Final = 1 << 2
PROP_NOTIFICATIONS: Final = 1 << 3
PROP_AARCH64: Final = 1 << 8
PROP_DIRECT_REQ2_RECV: Final = 1 << 9
PROP_DIRECT_REQ2_SEND: Final = 1 << 10
PROPERTY_NAMES: Final = {"direct_req_recv": PROP_DIRECT_RECV, "direct_req_send": PROP_DIRECT_SEND,
                         "indirect": PROP_INDIRECT, "notifications": PROP_NOTIFICATIONS,
                         "direct_req2_recv": PROP_DIRECT_REQ2_RECV, "direct_req2_send": PROP_DIRECT_REQ2_SEND}
#: Properties a v1.0 caller may see (1.0 defined bits 0..2 only); 1.1 added 3..8, 1.2 9..10.
PROPS_BY_VERSION: Final = {V1_0: 0x7, V1_1: 0x1FF, V1_2: 0x7FF}

PARTINFO_SIZE_V1_0: Final = 8
PARTINFO_SIZE: Final = 24
PARTINFO_COUNT_ONLY: Final = 1 << 0
#: PARTITION_INFO_GET_REGS carries at most 5 descriptors of 3 registers in x3..x17.
PARTINFO_REGS_PER_CALL: Final = 5

# FFA_FEATURES feature IDs (w1 without bit 31): the notification interrupts.
FEAT_NPI: Final = 1
FEAT_SRI: Final = 2
FEAT_MANAGED_EXIT: Final = 3
#: The notification pending interrupt's default INTID: SGI 8, as Xen gives its guests
#: (GUEST_FFA_NOTIF_PEND_INTR_ID); Linux uses SGIs 0..7 for IPIs.
DEFAULT_NPI: Final = 8

# Memory transaction descriptor (DEN0077 1.2 §10.11, 1.0 §5.11).
MTD_HEADER_V1_0: Final = 32
MTD_HEADER: Final = 48
EMAD_SIZE_V1_1: Final = 16
EMAD_SIZE_V1_2: Final = 32
COMPOSITE_SIZE: Final = 16
RANGE_SIZE: Final = 16

# Memory region attributes: type in bits 5:4, cacheability 3:2, shareability 1:0.
MEM_TYPE_SHIFT: Final = 4
MEM_TYPE_UNSPECIFIED: Final = 0
MEM_TYPE_DEVICE: Final = 1
MEM_TYPE_NORMAL: Final = 2
MEM_CACHE_NON_CACHEABLE: Final = 1
MEM_CACHE_WRITE_BACK: Final = 3
MEM_SHARE_RESERVED: Final = 1
MEM_ATTR_MASK: Final = 0x3F

# Access permissions: data in bits 1:0, instruction in 3:2.
DATA_UNSPECIFIED: Final = 0
DATA_RO: Final = 1
DATA_RW: Final = 2
INSTR_UNSPECIFIED: Final = 0
INSTR_NX: Final = 1
INSTR_X: Final = 2
ACCESS_NAMES: Final = {"ro": DATA_RO, "rw": DATA_RW}

# Transaction flags of MEM_SHARE/LEND/DONATE.
MEM_FLAG_ZERO: Final = 1 << 0
MEM_FLAG_TIME_SLICE: Final = 1 << 1
MEM_FLAGS_SEND_ALLOWED: Final = MEM_FLAG_ZERO | MEM_FLAG_TIME_SLICE
# MEM_RECLAIM flags (w3).
RECLAIM_ZERO: Final = 1 << 0
RECLAIM_TIME_SLICE: Final = 1 << 1
#: Handles we allocate carry bit 63 (allocated by the hypervisor, DEN0077 1.2 §10.4.2).
HANDLE_HYPERVISOR: Final = 1 << 63

# Direct messages: w2 bit 31 marks a framework message (PSCI power messages, VM
# created/destroyed), which this endpoint neither sends nor accepts.
DIRECT_FRAMEWORK: Final = 1 << 31

# Indirect messages (MSG_SEND2): the header in the TX/RX buffer (1.1: 20 bytes;
# 1.2 adds a reserved word and the UUID, 40 bytes; Hafnium ffa_partition_rxtx_header).
MSG2_HEADER_V1_1: Final = 20
MSG2_HEADER_V1_2: Final = 40
MSG2_DELAY_SRI: Final = 1 << 1

# Notifications.
NOTIF_PER_VCPU: Final = 1 << 0
NOTIF_GET_SP: Final = 1 << 0
NOTIF_GET_VM: Final = 1 << 1
NOTIF_GET_SPM: Final = 1 << 2
NOTIF_GET_HYP: Final = 1 << 3
NOTIF_SET_DELAY_SRI: Final = 1 << 1
#: Framework notification: the RX buffer holds a message (DEN0077 1.2 §10.6).
FWK_RX_FULL: Final = 1 << 0
NOTIF_INFO_MORE: Final = 1 << 0
NOTIF_INFO_COUNT_SHIFT: Final = 7
NOTIF_INFO_SIZES_SHIFT: Final = 12
