"""One answered call, decoded for people and machines: the trace line, its JSON,
the per-call log record and its journal fields all come from :class:`CallView`,
so they never disagree.  Its result class and words are the stats model's
(:func:`hvcproxyd.core.stats.outcome`), so trace and /metrics agree too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..core.stats import outcome
from ..smccc import MASK32, SMC64, routing_id
from ..smccc.names import argument_names, function_name
from ..wire import CALL_SMC, Call, Reply


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
        names = argument_names(fid)
        if names is not None:
            args = tuple((n, call.args[i] & mask) for i, n in enumerate(names))
        else:
            used = max((i + 1 for i, a in enumerate(call.args[:7]) if a), default=0)
            args = tuple((f"x{i + 1}", call.args[i] & mask) for i in range(used))
        result, text = outcome(call, reply)
        return cls(time.time(), call.vcpu, call.func_id, function_name(call.func_id),
                   "smc" if call.flags & CALL_SMC else "hvc", args, handler, result.value, text, reply.regs[:4],
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


__all__ = ["CallView", "line_of", "summary_of"]
