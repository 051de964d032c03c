"""``echo``: a conformance partition that lets a guest driver exercise every
path of the ABI against a known peer.

A direct request comes back with its payload.  When the first payload word
(w3, or x4 for REQ2) is one of the command words below, echo also does what
it says and puts the FF-A status (0 or the error code, as a u32) in the fifth
payload word (w7 / x8) of the response:

=================  ===========  ============================================
``0x45430001``     RETRIEVE     retrieve the memory handle in w4 (low), w5 (high)
``0x45430002``     RELINQUISH   relinquish that handle
``0x45430003``     NOTIFY       raise notifications w4 (low), w5 (high) the guest bound to echo
=================  ===========  ============================================

An indirect message (MSG_SEND2) is answered with an indirect message of the
same payload into the guest's RX buffer, with the RX-full notification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from ...smccc import MASK32
from .defs import (
    DATA_RO,
    DATA_RW,
    PROP_DIRECT_RECV,
    PROP_DIRECT_REQ2_RECV,
    PROP_INDIRECT,
    PROP_NOTIFICATIONS,
    Err,
    FfaError,
)
from .partition import Partition

CMD_RETRIEVE = 0x4543_0001
CMD_RELINQUISH = 0x4543_0002
CMD_NOTIFY = 0x4543_0003


class EchoPartition(Partition):
    PROPERTIES: ClassVar[int] = PROP_DIRECT_RECV | PROP_DIRECT_REQ2_RECV | PROP_INDIRECT | PROP_NOTIFICATIONS
    ACCESS: ClassVar[frozenset[int]] = frozenset({DATA_RO, DATA_RW})

    def __init__(self, ctx: Any, options: Any) -> None:
        super().__init__(ctx, options)
        self.retrieved: set[int] = set()
        #: Notifications the guest set for echo, OR-ed together (for tests and status).
        self.notified_bits = 0

    async def direct_request(self, sender: int, args: Sequence[int], *, wide: bool) -> Sequence[int] | Err:
        out = list(args)
        command = args[0] & MASK32
        if command in (CMD_RETRIEVE, CMD_RELINQUISH, CMD_NOTIFY):
            out[4] = self._command(command, (args[2] & MASK32) << 32 | (args[1] & MASK32)) & MASK32
        return out

    def _command(self, command: int, value: int) -> int:
        try:
            if command == CMD_RETRIEVE:
                self.ctx.retrieve(value)
                self.retrieved.add(value)
            elif command == CMD_RELINQUISH:
                self.ctx.relinquish(value)
                self.retrieved.discard(value)
            else:
                return int(self.ctx.notify(value))
        except FfaError as err:
            return int(err.code)
        return 0

    async def indirect_message(self, sender: int, payload: bytes) -> Err | int:
        return self.ctx.send_indirect(payload)

    async def notified(self, sender: int, bitmap: int) -> Err | int:
        self.notified_bits |= bitmap
        return 0

    def reset(self) -> None:
        self.retrieved.clear()
        self.notified_bits = 0

    def snapshot(self) -> dict[str, Any]:
        return {"retrieved": sorted(self.retrieved), "notified": self.notified_bits}

    @classmethod
    def check_state(cls, data: dict[str, Any]) -> None:
        retrieved, notified = data.get("retrieved", []), data.get("notified", 0)
        if not (isinstance(retrieved, list) and all(isinstance(h, int) and 0 <= h < 1 << 64 for h in retrieved)
                and isinstance(notified, int) and 0 <= notified < 1 << 64):
            raise ValueError(f"not an echo partition state: {data!r}")

    def restore(self, data: dict[str, Any]) -> None:
        self.retrieved = set(data.get("retrieved", []))
        self.notified_bits = data.get("notified", 0)
