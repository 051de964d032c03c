"""A snapshot-then-live stream of JSON lines on a UNIX socket, for local
subscribers that must never slow down the producer.

The producer (a handler on the guest's call path) calls :meth:`EventStream.publish`,
which only appends to per-subscriber queues and never awaits.  Each subscriber
has its own writer task and a bounded queue.  When a subscriber falls so far
behind that its queue is full, its queue is dropped and it is owed a resync:
once its socket drains, it gets ``{"type":"lost","count":N}`` and a fresh
snapshot, then live lines again.  So the guest is never blocked, a
subscriber's memory is bounded, and a reader always knows whether its view is
complete.

A snapshot is taken in the same synchronous step that registers or resyncs a
subscriber, so no line is missed or repeated around it (trio runs one task at a
time, and the producer mutates its state without awaiting).  Taking it must be
cheap (a frozen view, not the encoded state): the view is an iterable of byte
chunks, encoded as they are sent, so a snapshot of millions of ranges never
holds up the event loop for more than one chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from ..unixsock import UnixListener, local_peer_problem

log = logging.getLogger("hvcproxyd.eventstream")

#: The subscriber's own bytes are ignored; this only bounds what one read takes.
_DISCARD_READ = 4096
#: A subscriber that has not read what it was sent within this is closed: a
#: client that connects and never reads cannot hold a slot (and its socket) for ever.
SEND_TIMEOUT = 30.0


#: What the producer's ``snapshot`` returns: the whole JSON line, or chunks of it
#: that can be iterated more than once (one view may go to several subscribers).
Snapshot = bytes | Iterable[bytes]


class Subscriber:
    """One connected reader: its pending lines (and snapshots) and what it is owed."""

    __slots__ = ("lost", "queue", "resync", "wake")

    def __init__(self) -> None:
        self.queue: list[Snapshot] = []
        self.lost = 0
        self.resync = False
        self.wake = trio.Event()


@dataclass(slots=True)
class StreamStats:
    connected: int = 0  # subscribers ever accepted
    refused: int = 0  # turned away at max_subscribers
    resyncs: int = 0  # overflows that cost a subscriber events
    lost: int = 0  # events dropped over all subscribers
    writes: int = 0  # socket writes, each carrying one or more lines
    stalled: int = 0  # subscribers closed for not reading within send_timeout


def lost_line(count: int) -> bytes:
    return f'{{"type":"lost","count":{count}}}\n'.encode()


class EventStream:
    """Fan-out of JSON lines to the subscribers of one UNIX socket.

    ``snapshot`` returns the current state as a :data:`Snapshot`; it is sent
    first to every new subscriber and after every overflow."""

    def __init__(self, path: Path, snapshot: Callable[[], Snapshot], *, queue_limit: int = 1024,
                 max_subscribers: int = 16, coalesce_s: float = 0.0, name: str = "events",
                 send_timeout: float = SEND_TIMEOUT) -> None:
        if queue_limit < 1 or max_subscribers < 1:
            raise ValueError("queue_limit and max_subscribers must be at least 1")
        self.path = path
        self.snapshot = snapshot
        self.queue_limit = queue_limit
        self.max_subscribers = max_subscribers
        #: How long a woken writer waits for more lines before it sends: one write
        #: per burst instead of one per line, for a little latency.
        self.coalesce_s = coalesce_s
        self.name = name
        self.send_timeout = send_timeout
        self.subscribers: list[Subscriber] = []
        self.stats = StreamStats()

    # -- the producer side: synchronous, never blocks
    def publish(self, line: Snapshot) -> None:
        """Queue a line, or a snapshot (the producer's state was replaced), for everyone."""
        limit = self.queue_limit
        for sub in self.subscribers:
            if sub.resync:
                sub.lost += 1  # covered by the snapshot it is already owed
                self.stats.lost += 1
            elif len(sub.queue) >= limit:
                dropped = len(sub.queue) + 1
                sub.queue.clear()
                sub.lost += dropped
                sub.resync = True
                self.stats.lost += dropped
                self.stats.resyncs += 1
                sub.wake.set()
            else:
                sub.queue.append(line)
                sub.wake.set()

    # -- the socket side
    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled (mode 0660); the socket file is removed on the way out.
        Raises HvcproxydError if the path cannot be bound."""
        async with UnixListener(self.path, 0o660, key=f"{self.name} socket") as listener, \
                trio.open_nursery() as nursery:
            task_status.started(self.path)
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._session, stream)

    async def _session(self, stream: trio.SocketStream) -> None:
        async with stream:
            why = local_peer_problem(stream.socket, None)
            if why:
                self.stats.refused += 1
                log.warning("%s: refused a subscriber: %s", self.name, why)
                return
            if len(self.subscribers) >= self.max_subscribers:
                self.stats.refused += 1
                with trio.move_on_after(1), suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(f'{{"type":"error","reason":"this {self.name} stream already has '
                                          f'{self.max_subscribers} subscribers"}}\n'.encode())
                return
            sub = Subscriber()
            first = self.snapshot()  # same step as the registration: nothing slips between them
            self.subscribers.append(sub)
            self.stats.connected += 1
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._until_closed, stream, nursery.cancel_scope)
                    await self._pump(sub, stream, first)
                    nursery.cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.subscribers.remove(sub)

    async def _pump(self, sub: Subscriber, stream: trio.SocketStream, first: Snapshot) -> None:
        items: list[Snapshot] = [first]
        while await self._send(stream, items):
            while not (sub.resync or sub.queue):
                sub.wake = trio.Event()
                await sub.wake.wait()
            if self.coalesce_s:
                await trio.sleep(self.coalesce_s)
            if sub.resync:
                items = [lost_line(sub.lost), self.snapshot()]
                sub.lost = 0
                sub.resync = False
            else:
                items, sub.queue = sub.queue, []

    async def _send(self, stream: trio.SocketStream, items: list[Snapshot]) -> bool:
        """Send lines and snapshots in order, consecutive lines in one write and a
        snapshot a chunk at a time; False if the subscriber stopped reading."""
        pending: list[bytes] = []
        for item in items:
            if isinstance(item, bytes):
                pending.append(item)
                continue
            for chunk in item:
                pending.append(chunk)
                if not await self._write(stream, b"".join(pending)):
                    return False
                pending.clear()
        return not pending or await self._write(stream, b"".join(pending))

    async def _write(self, stream: trio.SocketStream, data: bytes) -> bool:
        self.stats.writes += 1
        with trio.move_on_after(self.send_timeout) as stalled:
            await stream.send_all(data)
        if stalled.cancelled_caught:
            self.stats.stalled += 1
            log.warning("%s stream: a subscriber read nothing for %.0fs; closed", self.name, self.send_timeout)
            return False
        return True

    @staticmethod
    async def _until_closed(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        """A subscriber that hangs up is noticed even while nothing is being sent."""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(_DISCARD_READ):
                pass
        scope.cancel()


__all__ = ["EventStream", "Snapshot", "StreamStats", "Subscriber", "lost_line"]
