"""One stats model for a VM: what ``status``, ``trace`` and /metrics all render.

The VM service records every answered call here (a dict increment and a bucket
increment); percentiles, names and the Prometheus text are computed only when
someone asks.  Results are classified by the answering service's own
convention (:mod:`hvcproxyd.smccc.results`), and a call whose effect means it
does not return (CPU_OFF, SYSTEM_OFF, ...) is a success whatever x0 holds: the
guest never reads it.  Counts by function are capped, because a guest chooses
the function IDs it calls.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from ..smccc import routing_id
from ..smccc.results import ResultClass, classify
from ..wire import Call, Effect, EffectKind, Reply

#: Upper bounds in seconds: handlers answer in microseconds, a stuck one takes its timeout.
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Distinct function IDs counted separately; later ones are counted as OTHER.
MAX_FUNCTIONS = 512
#: Distinct unclassified keys CallStats.record keeps before it classifies them.
MAX_RAW_KEYS = 4096
OTHER = -1
NO_RETURN = frozenset({EffectKind.CPU_OFF, EffectKind.SYSTEM_OFF, EffectKind.SYSTEM_RESET,
                       EffectKind.SYSTEM_SUSPEND, EffectKind.CPU_SUSPEND})


def does_not_return(effects: tuple[Effect, ...]) -> bool:
    return any(e.kind in NO_RETURN for e in effects)


def outcome(call: Call, reply: Reply) -> tuple[ResultClass, str]:
    """(class, words) of one answered call, as every view shows it."""
    if does_not_return(reply.effects):
        # x0 only matters if the VMM cannot carry the effect out; the caller never sees it otherwise.
        return ResultClass.SUCCESS, "does not return"
    return classify(call.func_id, reply.regs)


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


class CallStats:
    """Calls by (function, handler, result class), latency by handler, failures, replays."""

    __slots__ = ("_calls", "_functions", "_raw", "failures", "latency", "replays")

    def __init__(self) -> None:
        self._calls: Counter[tuple[int, str, ResultClass]] = Counter()
        #: Calls not yet classified, by what their class depends on (see record()).
        self._raw: dict[tuple[int, str, int, int, bool], int] = {}
        self.latency: dict[str, Histogram] = {}
        #: (handler, "exception" | "timeout"): the guest got the service's error code.
        self.failures: Counter[tuple[str, str]] = Counter()
        self.replays = 0
        self._functions: set[int] = set()

    def record(self, call: Call, reply: Reply, handler: str, seconds: float) -> None:
        """Count one answered call.  On the hot path this is a dict increment: the
        routing ID and the result class (which depend only on the function ID,
        x0, x2 and whether an effect does not return) are worked out once per
        distinct key when someone reads :attr:`calls`, not once per call."""
        regs, effects = reply.regs, reply.effects
        key = (call.func_id, handler, regs[0], regs[2] if len(regs) > 2 else 0,
               bool(effects) and does_not_return(effects))
        raw = self._raw
        raw[key] = raw.get(key, 0) + 1
        if len(raw) > MAX_RAW_KEYS:  # a guest that varies x0 or the ID gets folded early
            self._fold()
        hist = self.latency.get(handler)
        if hist is None:
            hist = self.latency[handler] = Histogram()
        hist.observe(seconds)

    def _fold(self) -> None:
        raw, self._raw = self._raw, {}
        for (func_id, handler, x0, x2, no_return), n in raw.items():
            fid = routing_id(func_id)
            if fid not in self._functions:
                if len(self._functions) >= MAX_FUNCTIONS:
                    fid = OTHER
                else:
                    self._functions.add(fid)
            result = ResultClass.SUCCESS if no_return else classify(func_id, (x0, 0, x2))[0]
            self._calls[fid, handler, result] += n

    @property
    def calls(self) -> Counter[tuple[int, str, ResultClass]]:
        if self._raw:
            self._fold()
        return self._calls

    def failure(self, handler: str, kind: str) -> None:
        self.failures[handler, kind] += 1

    # -- views
    def total(self) -> int:
        return sum(self.calls.values())

    def by_handler(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_fid, handler, _result), n in self.calls.items():
            out[handler] += n
        return out

    def by_result(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_fid, _handler, result), n in self.calls.items():
            out[result.value] += n
        return out


__all__ = ["LATENCY_BUCKETS", "MAX_FUNCTIONS", "NO_RETURN", "OTHER", "CallStats", "Histogram", "outcome"]
