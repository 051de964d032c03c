"""What a result register means, by the convention of the service that returned it.

Metrics, ``status`` and ``trace`` all classify results here, so they agree.
SMCCC fixes only a few codes (DEN0028 §7: -1 NOT_SUPPORTED, -2 NOT_REQUIRED,
-3 INVALID_PARAMETER); each service adds its own:

- PSCI (DEN0022 §5.2.2): negative codes -1..-9 in w0/x0; anything else is a value
  (PSCI_VERSION, AFFINITY_INFO's 0/1/2, PSCI_FEATURES flags).
- FF-A (DEN0077 §7): FFA_ERROR in x0 with the code in w2; FFA_SUCCESS or any other
  FF-A function ID in x0 is a success.
- Discovery queries (call count, UID, revision; DEN0028 §6): every word is data, so
  a UID word with the top bit set (KVM's 0xb66fb428) is a value, not an error;
  only UNKNOWN (-1) means "not implemented".
- OP-TEE (optee_smc.h): OPTEE_SMC_RETURN_* in w0 (0 OK, 1..7 errors,
  0xFFFFFFFF UNKNOWN_FUNCTION), and 0xFFFF00xx when the TEE asks the guest
  for an RPC; discovery (owner 63) as above.
- Anything else: SMCCC's small negative codes are errors; a 32-bit word whose
  signed reading lies beyond them is a value, not a very negative error.

Beyond the class, some functions' values have names of their own
(AFFINITY_INFO's ON/OFF/ON_PENDING, a version as "1.1"): :func:`register_words`
gives a function its own wording, and a handler package may add its own the
same way, so ``trace``, ``status`` and metrics speak the service's language.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from functools import lru_cache

from . import DISCOVERY_FNS, FUNC_NUM_MASK, MASK32, SMC64, routing_id
from .services import service_of

FFA_ERROR = 0x8400_0060
FFA_SUCCESS = frozenset({0x8400_0061, 0xC400_0061})
#: Generic services: error codes are small negatives; SMCCC's own are -1..-3, services use a few more.
_MAX_ERROR_MAGNITUDE = 0x100

_PSCI_ERRORS = {-1: "NOT_SUPPORTED", -2: "INVALID_PARAMETERS", -3: "DENIED", -4: "ALREADY_ON", -5: "ON_PENDING",
                -6: "INTERNAL_FAILURE", -7: "NOT_PRESENT", -8: "DISABLED", -9: "INVALID_ADDRESS"}
_SMCCC_ERRORS = {-1: "NOT_SUPPORTED", -2: "NOT_REQUIRED", -3: "INVALID_PARAMETER"}
_FFA_ERRORS = {-1: "NOT_SUPPORTED", -2: "INVALID_PARAMETERS", -3: "NO_MEMORY", -4: "BUSY", -5: "INTERRUPTED",
               -6: "DENIED", -7: "RETRY", -8: "ABORTED", -9: "NO_DATA", -10: "NOT_READY"}


_OPTEE_RETURNS = {0: "OK", 1: "ETHREAD_LIMIT", 2: "EBUSY", 3: "ERESUME", 4: "EBADADDR", 5: "EBADCMD",
                  6: "ENOMEM", 7: "ENOTAVAIL", 0xFFFF_FFFF: "UNKNOWN_FUNCTION"}
_OPTEE_RPCS = {0: "RPC_ALLOC", 2: "RPC_FREE", 4: "RPC_FOREIGN_INTR", 5: "RPC_CMD"}
OPTEE_RPC_PREFIX = 0xFFFF_0000

#: Words for one function's result: given x0 as the caller reads it (signed), the
#: words, or None to fall back to the service's convention.
Words = Callable[[int], str | None]
_WORDS: dict[int, Words] = {}


def register_words(func_ids: Iterable[int], words: Words) -> None:
    """Name the results of ``func_ids`` (routing IDs: no SVE hint) with ``words``."""
    for fid in func_ids:
        _WORDS[fid] = words


def version_words(value: int) -> str | None:
    """A major.minor version word (PSCI_VERSION, SMCCC_VERSION, FFA_VERSION)."""
    return f"{value >> 16}.{value & 0xFFFF}" if 0 < value <= 0x7FFF_FFFF else None


def _affinity_words(value: int) -> str | None:
    return {0: "ON", 1: "OFF", 2: "ON_PENDING"}.get(value)


class ResultClass(enum.StrEnum):
    """The bounded set metrics count by, whatever the guest does."""

    SUCCESS = "success"
    NOT_SUPPORTED = "not_supported"
    ERROR = "error"
    VALUE = "value"


def signed_result(func_id: int, x0: int) -> int:
    """x0 as the caller reads it: w0 sign-extended for an SMC32/HVC32 call."""
    if func_id & SMC64:
        return x0 - (1 << 64) if x0 >> 63 else x0
    w0 = x0 & MASK32
    return w0 - (1 << 32) if w0 >> 31 else w0


@lru_cache(maxsize=4096)  # on every call; bounded, because the guest picks the IDs
def _convention(fid: int) -> str:
    if fid & 0x8000_0000 and fid & FUNC_NUM_MASK in DISCOVERY_FNS:
        return "discovery"
    service = service_of(fid)
    return service if service in ("psci", "ffa", "optee") else "smccc"


def classify(func_id: int, regs: tuple[int, ...]) -> tuple[ResultClass, str]:
    """(class, words) for the result registers of a call to ``func_id``.  The
    class is the service's convention; a function's own words (:func:`register_words`)
    only rename the result."""
    fid = routing_id(func_id)
    x0 = regs[0] if regs else 0
    cls, text = _by_convention(fid, x0, regs)
    words = _WORDS.get(fid)
    if words is not None:
        named = words(signed_result(fid, x0))
        if named is not None:
            return cls, named
    return cls, text


def _by_convention(fid: int, x0: int, regs: tuple[int, ...]) -> tuple[ResultClass, str]:
    convention = _convention(fid)
    if convention == "optee":
        w0 = x0 & MASK32
        if w0 in _OPTEE_RETURNS:
            return (ResultClass.SUCCESS if w0 == 0 else ResultClass.NOT_SUPPORTED if w0 == 0xFFFF_FFFF
                    else ResultClass.ERROR), _OPTEE_RETURNS[w0]
        if w0 & 0xFFFF_0000 == OPTEE_RPC_PREFIX:
            return ResultClass.VALUE, _OPTEE_RPCS.get(w0 & 0xFFFF, f"RPC({w0 & 0xFFFF:#x})")
        return ResultClass.VALUE, f"{x0:#x}"
    if convention == "ffa":
        if x0 & MASK32 == FFA_ERROR:
            code = signed_result(0, regs[2] if len(regs) > 2 else 0)
            return ResultClass.ERROR, f"FFA_ERROR({_FFA_ERRORS.get(code, code)})"
        if x0 & MASK32 in FFA_SUCCESS:
            return ResultClass.SUCCESS, "FFA_SUCCESS"
    value = signed_result(fid, x0)
    if value == 0:
        return ResultClass.SUCCESS, "SUCCESS"
    if value == -1:
        return ResultClass.NOT_SUPPORTED, "NOT_SUPPORTED"
    if convention == "discovery" or value > 0:
        return ResultClass.VALUE, f"{x0:#x}"
    errors = _PSCI_ERRORS if convention == "psci" else _SMCCC_ERRORS
    if convention == "psci" and value in errors:
        return ResultClass.ERROR, errors[value]
    if convention != "psci" and -value <= _MAX_ERROR_MAGNITUDE:
        return ResultClass.ERROR, errors.get(value, str(value))
    return ResultClass.VALUE, f"{x0:#x}"


register_words((0x8400_0004, 0xC400_0004), _affinity_words)  # PSCI AFFINITY_INFO
register_words((0x8400_0000, 0x8000_0000, 0x8400_0063), version_words)  # PSCI_, SMCCC_, FFA_VERSION


__all__ = ["FFA_ERROR", "FFA_SUCCESS", "OPTEE_RPC_PREFIX", "ResultClass", "Words", "classify", "register_words",
           "signed_result", "version_words"]
