"""State transfer over one VMM session (protocol v2): the VM's state document
out on STATE_SAVE, in from the VMM's STATE_DATA, and the migration blocker.

This is how the daemon's state moves with the VM: QEMU's forwarder saves it in
its own vmstate section when a migration (or ``savevm``) completes and hands it
to the destination's daemon before the destination's vCPUs run.  Nothing here
is on the call path; a transfer waits until no call is in flight, so the
document is the state every answered call left and nothing else.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable

import trio

from .. import wire
from ..core import state
from ..core.service import VmService

log = logging.getLogger("hvcproxyd.transfer")

#: Chunks queued between waits for the writer, so a large document never sits in
#: the session's queue whole a second time.
CHUNKS_PER_FLUSH = 16


class StateTransfer:
    """The session's side of STATE_SAVE / STATE_DATA / STATE_STATUS / MIGRATION_BLOCKER.

    ``queue`` puts a frame on the session's output, ``flush`` waits until it is
    written, ``idle`` waits until no call is in flight."""

    def __init__(self, vm: VmService, queue: Callable[[wire.Event], None], flush: Callable[[], Awaitable[None]],
                 idle: Callable[[], Awaitable[None]]) -> None:
        self.vm = vm
        self._queue = queue
        self._flush = flush
        self._idle = idle
        self._load_seq: int | None = None
        self._load = bytearray()
        self._oversize = False
        #: What the VMM was last told; a session starts with no blocker, so a VM with
        #: nothing to block never sees the frame.
        self._blocker = ""

    # -- the blocker
    def announce_blocker(self) -> None:
        """Tell the VMM why the state cannot move now, when that changed (after the
        handshake, after a reload)."""
        reason = "; ".join(self.vm.migration_blockers())
        if reason != self._blocker:
            self._blocker = reason
            self._queue(wire.MigrationBlocker(reason))

    # -- save: the VMM asks, the daemon answers in chunks
    async def save(self, seq: int) -> None:
        name = self.vm.config.name
        await self._idle()
        blockers = self.vm.migration_blockers()
        if blockers:
            log.warning("%s: state save refused: %s", name, "; ".join(blockers))
            self._queue(wire.StateStatus(seq, -errno.EBUSY, _fit("; ".join(blockers))))
            return
        # Captured on the loop, consistent with every call answered; built and
        # encoded in a thread (a ledger of millions of ranges takes seconds).
        data = await trio.to_thread.run_sync(state.encode_frozen, self.vm.frozen_state_document())
        if len(data) > wire.MAX_STATE:
            reason = f"the state document is {len(data)} bytes, over the protocol's {wire.MAX_STATE}"
            log.error("%s: state save refused: %s", name, reason)
            self._queue(wire.StateStatus(seq, -errno.EFBIG, reason))
            return
        chunk = wire.MAX_MEM_CHUNK
        last = max(0, (len(data) - 1) // chunk)
        for i in range(last + 1):
            self._queue(wire.StateData(seq, data[i * chunk:(i + 1) * chunk], last=i == last))
            if i % CHUNKS_PER_FLUSH == CHUNKS_PER_FLUSH - 1:
                await self._flush()
        log.info("%s: state saved for the VMM (%d bytes, handlers %s)", name, len(data),
                 ", ".join(self.vm.instances) or "none")

    # -- load: the VMM sends chunks, then the daemon says whether it took them
    def load_chunk(self, event: wire.StateData) -> bytes | None:
        """Collect one chunk; the whole document (or b"" if it outgrew MAX_STATE)
        once the last one is in, else None."""
        if self._load_seq != event.seq:
            self._load_seq, self._oversize = event.seq, False
            self._load.clear()
        if not self._oversize:
            if len(self._load) + len(event.data) > wire.MAX_STATE:
                self._oversize = True
                self._load.clear()
            else:
                self._load += event.data
        if not event.last:
            return None
        data, self._load = bytes(self._load), bytearray()
        self._load_seq = None
        return b"" if self._oversize else data

    async def load(self, seq: int, data: bytes) -> None:
        name = self.vm.config.name
        await self._idle()
        try:
            if not data:
                raise state.StateError(f"the state document is over the protocol's {wire.MAX_STATE} bytes")
            doc = await trio.to_thread.run_sync(state.decode, data)
            self.vm.load_state(doc)
        except state.StateError as err:
            log.error("%s: state from the VMM refused (the VM's state here is unchanged): %s", name, err)
            self._queue(wire.StateStatus(seq, -errno.EINVAL, _fit(str(err))))
            return
        log.info("%s: state loaded from the VMM (%d bytes, written %s by VM %s)", name, len(data),
                 _when(doc.get("created")), doc["vm"])
        self._queue(wire.StateStatus(seq, 0))
        self.announce_blocker()


def _fit(reason: str) -> str:
    """A reason cut to the protocol's MAX_REASON bytes, on a character boundary."""
    raw = reason.encode()
    if len(raw) <= wire.MAX_REASON:
        return reason
    return raw[:wire.MAX_REASON - 3].decode(errors="ignore") + "..."


def _when(created: object) -> str:
    if not isinstance(created, (int, float)):
        return "at an unknown time"
    return time.strftime("at %Y-%m-%d %H:%M:%S UTC", time.gmtime(created))


__all__ = ["StateTransfer"]
