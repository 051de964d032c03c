"""One answered call, decoded for people and machines: the trace line, its JSON,
the per-call log record and its journal fields all come from :class:`CallView`,
so they never disagree.  Also the result classes metrics count by.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from .names import function_name
from .smccc import MASK32, SMC64, routing_id
from .wire import CALL_SMC, Call, EffectKind, Reply

FFA_ERROR = 0x8400_0060
FFA_SUCCESS = (0x8400_0061, 0xC400_0061)
RESULTS = ("success", "not_supported", "error", "value")
_NO_RETURN = frozenset({EffectKind.CPU_OFF, EffectKind.SYSTEM_OFF, EffectKind.SYSTEM_RESET,
                        EffectKind.SYSTEM_SUSPEND, EffectKind.CPU_SUSPEND})

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
_PSCI_ERRORS = {-1: "NOT_SUPPORTED", -2: "INVALID_PARAMETERS", -3: "DENIED", -4: "ALREADY_ON", -5: "ON_PENDING",
                -6: "INTERNAL_FAILURE", -7: "NOT_PRESENT", -8: "DISABLED", -9: "INVALID_ADDRESS"}
_SMCCC_ERRORS = {-1: "NOT_SUPPORTED", -2: "NOT_REQUIRED", -3: "INVALID_PARAMETER"}


def signed_result(call: Call, x0: int) -> int:
    """x0 as the caller reads it: w0 sign-extended for an SMC32/HVC32 call."""
    if call.func_id & SMC64:
        return x0 - (1 << 64) if x0 >> 63 else x0
    w0 = x0 & MASK32
    return w0 - (1 << 32) if w0 >> 31 else w0


def classify(call: Call, x0: int) -> str:
    """The result class metrics count by; bounded, whatever the guest does."""
    if x0 == FFA_ERROR:
        return "error"
    if x0 in FFA_SUCCESS:
        return "success"
    value = signed_result(call, x0)
    if value == 0:
        return "success"
    if value == -1:
        return "not_supported"
    return "error" if value < 0 else "value"


def result_text(call: Call, x0: int) -> str:
    if x0 == FFA_ERROR:
        return "FFA_ERROR"
    value = signed_result(call, x0)
    if value == 0:
        return "SUCCESS"
    if value < 0:
        errors = _PSCI_ERRORS if routing_id(call.func_id) & ~SMC64 & 0xFFFF_FF00 == 0x8400_0000 else _SMCCC_ERRORS
        return errors.get(value, str(value))
    return f"{x0:#x}"


@cache
def _name_table() -> dict[str, int]:
    ids = [0x8000_0000 | n for n in (0, 1, 2, 0x3FFF, 0x7FFF, 0x8000)]
    ids += [base | n for base in (0x8400_0000, 0xC400_0000) for n in range(0x100)]
    ids += [0x8000_0000 | owner << 24 | fn for owner in range(64) for fn in (0xFF00, 0xFF01, 0xFF03)]
    ids += [0x8400_0050 + n for n in range(4)] + [0xC400_0053, 0xC500_0020, 0xC500_0021]
    ids += [0x8600_0000, 0x8600_0001] + [0xC600_0000 | n for n in range(2, 8)]
    ids += [0xB200_0000 | n for n in range(16)] + [0x3200_0003, 0x3200_0004]
    table: dict[str, int] = {}
    for fid in ids:
        name = function_name(fid)
        if name is not None:
            table.setdefault(name, fid)
    return table


def function_id(text: str) -> int | None:
    """A function ID from a number (``0x84000003``) or a name (``PSCI_CPU_ON``, any case)."""
    try:
        return int(text, 0) & MASK32
    except ValueError:
        return _name_table().get(text.upper())


@dataclass(frozen=True, slots=True)
class CallView:
    time: float
    vcpu: int
    func_id: int
    name: str | None
    conduit: str
    args: tuple[tuple[str, int], ...]
    handler: str
    result: str
    result_text: str
    regs: tuple[int, ...]
    effects: tuple[str, ...]
    latency_us: float

    @classmethod
    def of(cls, call: Call, reply: Reply, handler: str, seconds: float) -> CallView:
        fid = routing_id(call.func_id)
        mask = 0xFFFF_FFFF_FFFF_FFFF if fid & SMC64 else MASK32
        names = _ARGS.get(fid & ~SMC64)
        if names is not None:
            args = tuple((n, call.args[i] & mask) for i, n in enumerate(names))
        else:
            used = max((i + 1 for i, a in enumerate(call.args[:7]) if a), default=0)
            args = tuple((f"x{i + 1}", call.args[i] & mask) for i in range(used))
        x0 = reply.regs[0] if reply.regs else 0
        result, text = classify(call, x0), result_text(call, x0)
        if any(e.kind in _NO_RETURN for e in reply.effects):
            # x0 only matters if the VMM cannot carry the effect out; the caller never sees it otherwise.
            result, text = "success", "does not return"
        return cls(time.time(), call.vcpu, call.func_id, function_name(call.func_id),
                   "smc" if call.flags & CALL_SMC else "hvc", args, handler, result, text, reply.regs[:4],
                   tuple(f"{e.kind.name}(vcpu{e.vcpu})" for e in reply.effects), round(seconds * 1e6, 1))

    def summary(self) -> str:
        return summary_of(self.to_json())

    def line(self) -> str:
        return line_of(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "vcpu": self.vcpu, "func_id": f"{self.func_id:#010x}", "name": self.name,
                "conduit": self.conduit, "args": {n: f"{v:#x}" for n, v in self.args}, "handler": self.handler,
                "result": self.result, "result_text": self.result_text, "regs": [f"{r:#x}" for r in self.regs],
                "effects": list(self.effects), "latency_us": self.latency_us}

    def journal_fields(self) -> dict[str, object]:
        """Become HVC_* journal fields (``journalctl HVC_FUNC=PSCI_CPU_ON``)."""
        return {"vcpu": self.vcpu, "func": self.name or f"{self.func_id:#010x}", "func_id": f"{self.func_id:#010x}",
                "conduit": self.conduit.upper(), "handler": self.handler, "result": self.result_text,
                "latency_us": f"{self.latency_us:.1f}"}


def summary_of(view: dict[str, Any]) -> str:
    """One call in words, from :meth:`CallView.to_json` (what a trace client receives)."""
    args = ", ".join(f"{k}={v}" for k, v in view["args"].items())
    effects = "".join(f" +{e}" for e in view["effects"])
    return (f"vcpu{view['vcpu']} {view['conduit'].upper()} {view['func_id']} {view['name'] or '?'}({args}) "
            f"-> {view['handler']}: {view['result_text']}{effects} {view['latency_us']:.0f}us")


def line_of(view: dict[str, Any]) -> str:
    """The trace line: the summary with its wall-clock time to the microsecond."""
    t = view["time"]
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1e6):06d} " + summary_of(view)


__all__ = ["RESULTS", "CallView", "classify", "function_id", "line_of", "result_text", "signed_result", "summary_of"]
