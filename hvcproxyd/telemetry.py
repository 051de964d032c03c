"""What ``status`` and the metrics endpoint report, counted in one place.

One observer on the hot path does a dict increment and a bucket increment per
call; everything else (percentiles, the Prometheus text, names) is computed
when someone asks.  Counts by function are capped, because a guest chooses the
function IDs it calls.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from .callview import classify
from .handlers import VmContext
from .smccc import routing_id
from .wire import Call, EffectKind, EventKind, Reply, VcpuInfo, VmEvent

#: Upper bounds in seconds: handlers answer in microseconds, a stuck one takes its timeout.
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Distinct function IDs counted separately; later ones are counted as OTHER.
MAX_FUNCTIONS = 512
OTHER = -1


@dataclass(slots=True)
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket, as Prometheus' histogram_quantile."""
        if self.n == 0:
            return None
        rank = q * self.n
        seen = 0
        for i, count in enumerate(self.counts):
            if count and seen + count >= rank:
                lo = LATENCY_BUCKETS[i - 1] if i else 0.0
                hi = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
                return lo + (hi - lo) * (rank - seen) / count
            seen += count
        return LATENCY_BUCKETS[-1]

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Telemetry:
    """Counters fed by the VmService's observers (calls) and event observers."""

    def __init__(self, ctx: VmContext) -> None:
        self.ctx = ctx
        self.calls: Counter[tuple[int, str, str]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self._functions: set[int] = set()
        self._power: dict[int, str] = {}
        self._vcpus_seen: tuple[VcpuInfo, ...] | None = None

    def observe(self, call: Call, reply: Reply, handler: str, seconds: float) -> None:
        fid = routing_id(call.func_id)
        if fid not in self._functions:
            if len(self._functions) >= MAX_FUNCTIONS:
                fid = OTHER
            else:
                self._functions.add(fid)
        self.calls[fid, handler, classify(call, reply.regs[0] if reply.regs else 0)] += 1
        hist = self.latency.get(handler)
        if hist is None:
            hist = self.latency[handler] = Histogram()
        hist.observe(seconds)
        if reply.effects:
            self._sync()
            for e in reply.effects:
                if e.kind is EffectKind.CPU_ON:
                    self._power[e.vcpu] = "on"
                elif e.kind is EffectKind.CPU_OFF:
                    self._power[e.vcpu] = "off"

    def on_event(self, event: VmEvent) -> None:
        self._sync()
        if event.kind is EventKind.VCPU_POWER:
            self._power[event.vcpu] = "on" if event.arg else "off"
        elif event.kind is EventKind.VM_RESET:
            # QEMU's reset leaves the boot vCPU on and the secondaries off.
            self._power = {i: "on" if i == 0 else "off" for i in self._power}

    def power_states(self) -> dict[int, str]:
        """The VMM's view at its handshake, then what effects and power events changed."""
        self._sync()
        return dict(self._power)

    def _sync(self) -> None:
        # Each handshake sets a new vcpus tuple: start again from the VMM's states.
        vcpus = self.ctx.vcpus
        if vcpus is not self._vcpus_seen:
            self._vcpus_seen = vcpus
            self._power = {v.index: "on" if v.powered_on else "off" for v in vcpus}


__all__ = ["LATENCY_BUCKETS", "MAX_FUNCTIONS", "OTHER", "Histogram", "Telemetry"]
