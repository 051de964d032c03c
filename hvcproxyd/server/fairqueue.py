"""The order in which a session answers the calls it has read: fair across vCPUs.

A call waits under a key: how many calls its vCPU has had served this session,
plus its calls already waiting.  The lowest key goes first, ties by arrival.
So a vCPU's own calls keep their order, two flooding vCPUs take turns, and a
quiet vCPU, served less often, goes ahead of flooding ones.

What a vCPU can bank by being quiet is bounded: a vCPU with nothing waiting
starts at most ``credit`` behind the largest key served, so one that idled for
an hour and then floods is ahead of the others for ``credit`` calls, not until
it has caught up with everything they were served meanwhile.  (Start-time fair
queueing with its virtual clock, less the slack; the slack is what keeps a
quiet vCPU's one call ahead of the flooders' queued ones.)
"""

from __future__ import annotations

import heapq

from ..wire import Call

#: How many calls of priority a vCPU may bank by being idle.
FAIR_CREDIT = 64


class FairQueue:
    __slots__ = ("_ahead", "_arrivals", "_credit", "_heap", "_lag", "_served", "_top", "_vtime")

    def __init__(self, n_vcpus: int, credit: int = FAIR_CREDIT) -> None:
        self._credit = credit
        self._heap: list[tuple[int, int, Call]] = []
        #: Per vCPU: its calls waiting, its calls served, the credit it could not bank.
        self._ahead = [0] * n_vcpus
        self._served = [0] * n_vcpus
        self._lag = [0] * n_vcpus
        self._arrivals = 0
        self._top = 0  # the largest key waiting
        self._vtime = 0  # the largest key served

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, call: Call) -> None:
        v = call.vcpu
        ahead = self._ahead[v]
        self._ahead[v] = ahead + 1
        base = self._served[v] + self._lag[v]
        floor = self._vtime - self._credit
        if not ahead and base < floor:
            self._lag[v] += floor - base
            base = floor
        key = base + ahead
        self._arrivals += 1
        heapq.heappush(self._heap, (key, self._arrivals, call))
        if key > self._top:
            self._top = key

    def pop(self) -> tuple[Call, bool]:
        """The next call, and whether its vCPU is quiet: served less than half as
        often as the busiest one still waiting (its reply is worth sending at once)."""
        key, _arrival, call = heapq.heappop(self._heap)
        if key > self._vtime:
            self._vtime = key
        v = call.vcpu
        self._ahead[v] -= 1
        served = self._served[v]
        quiet = bool(self._heap) and served * 2 < self._top
        self._served[v] = served + 1
        if not self._heap:
            self._top = 0
        return call, quiet
