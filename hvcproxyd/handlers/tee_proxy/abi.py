"""The OP-TEE SMC and message ABI: function IDs, return codes, capability bits,
``optee_msg_arg`` attributes and commands, and the RPC codes.

Values are OP-TEE's ``optee_smc.h``/``optee_msg.h`` and ``optee_rpc_cmd.h``
(mirrored in Linux ``drivers/tee/optee/``); the TEE client result codes are
GlobalPlatform's (``tee_client_api.h``).  One module, so the mediator, the
backends and the reference TEE cannot disagree about a number.
"""

from __future__ import annotations

from ...smccc import FAST_CALL, OWNER_SHIFT

TRUSTED_OS = 50
TRUSTED_OS_END = 63


def fast(fn: int) -> int:
    """OPTEE_SMC_FAST_CALL_VAL: fast, SMC32, owner 50."""
    return FAST_CALL | (TRUSTED_OS << OWNER_SHIFT) | fn


def std(fn: int) -> int:
    """OPTEE_SMC_STD_CALL_VAL: yielding, SMC32, owner 50."""
    return (TRUSTED_OS << OWNER_SHIFT) | fn


# -- function IDs (optee_smc.h)
CALLS_COUNT = FAST_CALL | (TRUSTED_OS_END << OWNER_SHIFT) | 0xFF00   # 0xBF00FF00
CALLS_UID = FAST_CALL | (TRUSTED_OS_END << OWNER_SHIFT) | 0xFF01     # 0xBF00FF01
CALLS_REVISION = FAST_CALL | (TRUSTED_OS_END << OWNER_SHIFT) | 0xFF03
GET_OS_UUID = fast(0)
GET_OS_REVISION = fast(1)
RETURN_FROM_RPC = std(3)
CALL_WITH_ARG = std(4)
GET_SHM_CONFIG = fast(7)
L2CC_MUTEX = fast(8)
EXCHANGE_CAPABILITIES = fast(9)
DISABLE_SHM_CACHE = fast(10)
ENABLE_SHM_CACHE = fast(11)
BOOT_SECONDARY = fast(12)
VM_CREATED = fast(13)
VM_DESTROYED = fast(14)
GET_THREAD_COUNT = fast(15)
ENABLE_ASYNC_NOTIF = fast(16)
GET_ASYNC_NOTIF_VALUE = fast(17)
CALL_WITH_RPC_ARG = std(18)
CALL_WITH_REGD_ARG = std(19)

# -- identity
API_UID = (0x384FB3E0, 0xE7F811E3, 0xAF630002, 0xA5D5C51B)
OS_UUID = (0x486178E0, 0xE7F811E3, 0xBC5E0002, 0xA5D5C51B)
API_REVISION = (2, 0)

# -- a0 return values
RETURN_OK = 0x0
RETURN_ETHREAD_LIMIT = 0x1
RETURN_EBUSY = 0x2
RETURN_ERESUME = 0x3
RETURN_EBADADDR = 0x4
RETURN_EBADCMD = 0x5
RETURN_ENOMEM = 0x6
RETURN_ENOTAVAIL = 0x7
RETURN_UNKNOWN_FUNCTION = 0xFFFF_FFFF
RPC_PREFIX = 0xFFFF_0000
RPC_FUNC_ALLOC = 0
RPC_FUNC_FREE = 2
RPC_FUNC_FOREIGN_INTR = 4
RPC_FUNC_CMD = 5


def rpc(func: int) -> int:
    return RPC_PREFIX | func


# -- capabilities (EXCHANGE_CAPABILITIES a1)
NSEC_CAP_UNIPROCESSOR = 1 << 0
SEC_CAP_HAVE_RESERVED_SHM = 1 << 0
SEC_CAP_UNREGISTERED_SHM = 1 << 1
SEC_CAP_DYNAMIC_SHM = 1 << 2
SEC_CAP_VIRTUALIZATION = 1 << 3
SEC_CAP_MEMREF_NULL = 1 << 4
SEC_CAP_ASYNC_NOTIF = 1 << 5
SEC_CAP_RPC_ARG = 1 << 6
#: What a guest may be offered.  Never reserved (static) SHM: it is one region
#: for the whole host.  Not ASYNC_NOTIF or RPC_ARG: the mediator implements
#: neither (Linux then uses plain CALL_WITH_ARG and the RPC_FUNC_ALLOC flow).
#: VIRTUALIZATION is the backend's business, not the guest's.
GUEST_SEC_CAPS = SEC_CAP_UNREGISTERED_SHM | SEC_CAP_DYNAMIC_SHM | SEC_CAP_MEMREF_NULL

# -- optee_msg.h
ATTR_TYPE_NONE = 0x0
ATTR_TYPE_VALUE_INPUT = 0x1
ATTR_TYPE_VALUE_OUTPUT = 0x2
ATTR_TYPE_VALUE_INOUT = 0x3
ATTR_TYPE_RMEM_INPUT = 0x5
ATTR_TYPE_RMEM_OUTPUT = 0x6
ATTR_TYPE_RMEM_INOUT = 0x7
ATTR_TYPE_TMEM_INPUT = 0x9
ATTR_TYPE_TMEM_OUTPUT = 0xA
ATTR_TYPE_TMEM_INOUT = 0xB
ATTR_TYPE_MASK = 0xFF
ATTR_META = 1 << 8
ATTR_NONCONTIG = 1 << 9
ATTR_CACHE_SHIFT = 16
ATTR_CACHE_MASK = 0x7
#: Bits an attribute may carry; anything else is a malformed message.
ATTR_KNOWN = ATTR_TYPE_MASK | ATTR_META | ATTR_NONCONTIG | (ATTR_CACHE_MASK << ATTR_CACHE_SHIFT)
VALUE_TYPES = frozenset({ATTR_TYPE_VALUE_INPUT, ATTR_TYPE_VALUE_OUTPUT, ATTR_TYPE_VALUE_INOUT})
RMEM_TYPES = frozenset({ATTR_TYPE_RMEM_INPUT, ATTR_TYPE_RMEM_OUTPUT, ATTR_TYPE_RMEM_INOUT})
TMEM_TYPES = frozenset({ATTR_TYPE_TMEM_INPUT, ATTR_TYPE_TMEM_OUTPUT, ATTR_TYPE_TMEM_INOUT})
#: Types whose contents travel from the caller to the TEE / back.
INPUT_TYPES = frozenset({ATTR_TYPE_VALUE_INPUT, ATTR_TYPE_VALUE_INOUT, ATTR_TYPE_RMEM_INPUT,
                         ATTR_TYPE_RMEM_INOUT, ATTR_TYPE_TMEM_INPUT, ATTR_TYPE_TMEM_INOUT})
OUTPUT_TYPES = frozenset({ATTR_TYPE_VALUE_OUTPUT, ATTR_TYPE_VALUE_INOUT, ATTR_TYPE_RMEM_OUTPUT,
                          ATTR_TYPE_RMEM_INOUT, ATTR_TYPE_TMEM_OUTPUT, ATTR_TYPE_TMEM_INOUT})

CMD_OPEN_SESSION = 0
CMD_INVOKE_COMMAND = 1
CMD_CLOSE_SESSION = 2
CMD_CANCEL = 3
CMD_REGISTER_SHM = 4
CMD_UNREGISTER_SHM = 5
CMD_DO_BOTTOM_HALF = 6
CMD_STOP_ASYNC_NOTIF = 7

#: sizeof(struct optee_msg_arg) and sizeof(struct optee_msg_param).
ARG_HEADER_SIZE = 32
PARAM_SIZE = 32
PAGE_SIZE = 4096  # OPTEE_MSG_NONCONTIG_PAGE_SIZE
#: The arguments must fit in the page they start in (Linux's arg cache never
#: lets one cross a page), so at most this many parameters.
MAX_PARAMS_PER_PAGE = (PAGE_SIZE - ARG_HEADER_SIZE) // PARAM_SIZE  # 127
#: Entries per page of a non-contiguous page list: the last u64 links the next page.
PAGELIST_ENTRIES = PAGE_SIZE // 8 - 1  # 511


def arg_size(num_params: int) -> int:
    """OPTEE_MSG_GET_ARG_SIZE."""
    return ARG_HEADER_SIZE + PARAM_SIZE * num_params


# -- RPC commands (optee_rpc_cmd.h) the mediator understands
RPC_CMD_GET_TIME = 3
RPC_CMD_SUSPEND = 5
RPC_CMD_SHM_ALLOC = 6
RPC_CMD_SHM_FREE = 7
RPC_SHM_TYPE_APPL = 0
RPC_SHM_TYPE_KERNEL = 1

# -- GlobalPlatform TEE client results and origins
TEEC_SUCCESS = 0x0000_0000
TEEC_ERROR_GENERIC = 0xFFFF_0000
TEEC_ERROR_ACCESS_DENIED = 0xFFFF_0001
TEEC_ERROR_BAD_FORMAT = 0xFFFF_0005
TEEC_ERROR_BAD_PARAMETERS = 0xFFFF_0006
TEEC_ERROR_ITEM_NOT_FOUND = 0xFFFF_0008
TEEC_ERROR_NOT_SUPPORTED = 0xFFFF_000A
TEEC_ERROR_OUT_OF_MEMORY = 0xFFFF_000C
TEEC_ERROR_BUSY = 0xFFFF_000D
TEEC_ERROR_COMMUNICATION = 0xFFFF_000E
TEEC_ERROR_SHORT_BUFFER = 0xFFFF_0010
TEEC_ORIGIN_API = 1
TEEC_ORIGIN_COMMS = 2
TEEC_ORIGIN_TEE = 3
TEEC_ORIGIN_TRUSTED_APP = 4
