"""``socket``: a partition that lives in another process, reached over the
partition socket protocol (:mod:`.peerwire`), one connection per request with
a bounded timeout.  Another VM's daemon is reached the same way (its
``listen`` socket), which is how VM-to-VM direct messages travel.

The remote side cannot reach this guest's memory, so a socket partition
accepts no memory transaction (its ``access`` is empty): a share naming it is
DENIED by the descriptor checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import trio

from ...config.diagnostics import Section
from .defs import PROP_DIRECT_RECV, PROP_INDIRECT, PROP_NOTIFICATIONS, Err
from .partition import Partition, PartitionContext
from .peerwire import PeerProtocolError, exchange, status_of

#: Below the default 1 s handler timeout, so the guest hears this error, not the daemon's.
DEFAULT_TIMEOUT_MS = 500


@dataclass(frozen=True, slots=True)
class SocketOptions:
    path: str
    timeout_ms: int = DEFAULT_TIMEOUT_MS


class SocketPartition(Partition):
    PROPERTIES: ClassVar[int] = PROP_DIRECT_RECV | PROP_INDIRECT | PROP_NOTIFICATIONS
    ACCESS: ClassVar[frozenset[int]] = frozenset()

    def __init__(self, ctx: PartitionContext, options: SocketOptions) -> None:
        super().__init__(ctx, options)
        self.opts = options
        self.failures = 0

    @classmethod
    def parse_options(cls, section: Section) -> SocketOptions:
        section.allow_keys(("path", "timeout_ms"))
        return SocketOptions(section.string("path", default=""),
                             section.integer("timeout_ms", default=DEFAULT_TIMEOUT_MS, lo=1, hi=60_000))

    async def _ask(self, request: dict[str, object]) -> dict[str, object] | Err:
        try:
            return await exchange(self.opts.path, request, self.opts.timeout_ms / 1000)
        except (OSError, PeerProtocolError, trio.TooSlowError) as err:
            self.failures += 1
            self.ctx.log.warning("partition %#x at %s: %s", self.ctx.id, self.opts.path,
                                 type(err).__name__ if isinstance(err, trio.TooSlowError) else err)
            return Err.ABORTED

    def _request(self, op: str, sender: int, **fields: object) -> dict[str, object]:
        return {"op": op, "sender": sender, "receiver": self.ctx.id, **fields}

    async def direct_request(self, sender: int, args: Sequence[int], *, wide: bool) -> Sequence[int] | Err:
        resp = await self._ask(self._request("direct", sender, wide=wide, args=list(args)))
        if isinstance(resp, Err):
            return resp
        try:
            status = status_of(resp)
        except PeerProtocolError:
            return Err.ABORTED
        if status:
            return Err(status)
        regs = resp.get("regs")
        if not isinstance(regs, list) or len(regs) > len(args) or \
                not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 1 << 64 for r in regs):
            self.failures += 1
            self.ctx.log.warning("partition %#x answered malformed registers", self.ctx.id)
            return Err.ABORTED
        return regs

    async def _status(self, request: dict[str, object]) -> Err | int:
        resp = await self._ask(request)
        if isinstance(resp, Err):
            return resp
        try:
            return status_of(resp)
        except PeerProtocolError:
            return Err.ABORTED

    async def indirect_message(self, sender: int, payload: bytes) -> Err | int:
        return await self._status(self._request("indirect", sender, payload=payload.hex()))

    async def notified(self, sender: int, bitmap: int) -> Err | int:
        return await self._status(self._request("notify", sender, bitmap=bitmap))
