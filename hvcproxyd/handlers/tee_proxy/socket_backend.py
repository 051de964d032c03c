"""The ``socket`` backend: a TEE service on a UNIX socket (a TEE VM's proxy, a
remote secure element, the reference TEE), in the framing of :mod:`.framing`.

Requests carry an ``id``; the TEE answers each with one frame of the same
``id``, in any order, so several vCPUs' calls share one connection.  The
handler has no task of its own, so there is no reader task either: whichever
waiter holds the read lock reads frames for everyone and files them by id.
Every operation is bounded by its budget; a dead or hung TEE becomes a
:class:`BackendError` or a :class:`Pending`, never a hang.  Requests and
replies are spelled out in docs/handlers/tee-proxy.md.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

import trio

from .backend import Backend, BackendError, BackendInfo, Msg, Pending, Step, step_from_json
from .framing import Decoder, FrameError, encode

#: Replies kept for requests nobody waits for any more (a VM that reset mid-call).
MAX_STRAY_REPLIES = 1024
CONNECT_TIMEOUT = 2.0


class SocketBackend(Backend):
    def __init__(self, path: str, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self._stream: trio.SocketStream | None = None
        self._decoder = Decoder()
        self._replies: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._waiting: set[int] = set()
        self._ids = itertools.count(1)
        self._send_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self._open_lock = trio.Lock()
        #: Requests numbered below this were sent on a connection that is gone.
        self._first_live = 1
        self.info: BackendInfo | None = None

    # -- connection
    async def open(self) -> BackendInfo:
        async with self._open_lock:
            if self._stream is not None and self.info is not None:
                return self.info
            with trio.move_on_after(self.connect_timeout):
                try:
                    self._stream = await trio.open_unix_socket(self.path)
                except OSError as err:
                    raise BackendError(f"cannot connect to the TEE at {self.path}: {err}") from err
            if self._stream is None:
                raise BackendError(f"connecting to the TEE at {self.path} timed out")
            self._decoder = Decoder()
            reply = await self._request({"op": "hello"}, self.connect_timeout)
            if reply is None:
                await self._drop("no answer to hello")
                raise BackendError(f"the TEE at {self.path} did not answer hello")
            try:
                threads, caps = reply["threads"], reply["caps"]
                rev = reply.get("revision", [0, 0])
                if not (isinstance(threads, int) and 1 <= threads <= 1024 and isinstance(caps, int)
                        and isinstance(rev, list) and len(rev) == 2 and all(isinstance(r, int) for r in rev)):
                    raise TypeError
            except (KeyError, TypeError):
                await self._drop("bad hello")
                raise BackendError(f"the TEE at {self.path} answered hello with {reply!r}") from None
            self.info = BackendInfo(threads, caps & 0xFFFF_FFFF, (rev[0] & 0xFFFF_FFFF, rev[1] & 0xFFFF_FFFF))
            return self.info

    async def close(self) -> None:
        await self._drop("closed")

    async def _drop(self, why: str) -> None:
        stream, self._stream = self._stream, None
        self.info = None
        self._first_live = next(self._ids)
        if stream is not None:
            with trio.move_on_after(0.5):
                await stream.aclose()

    # -- requests
    async def _request(self, obj: dict[str, Any], budget: float) -> dict[str, Any] | None:
        """Send ``obj`` with a fresh id and wait up to ``budget`` for its reply
        (None if it did not come; the id is then ``obj['id']``)."""
        stream = self._stream
        if stream is None:
            raise BackendError("not connected")
        rid = obj["id"] = next(self._ids)
        frame = encode(obj)
        with trio.move_on_after(budget) as scope:
            async with self._send_lock:
                try:
                    await stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                    await self._drop("send failed")
                    raise BackendError(f"the TEE at {self.path} went away: {err}") from err
        if scope.cancelled_caught:
            await self._drop("send timed out")  # a half-written frame: the stream is unusable
            raise BackendError(f"the TEE at {self.path} stopped reading")
        return await self._await(rid, budget)

    async def _await(self, rid: int, budget: float) -> dict[str, Any] | None:
        self._waiting.add(rid)
        try:
            with trio.move_on_after(budget):
                while rid not in self._replies:
                    async with self._read_lock:
                        if rid in self._replies:
                            break
                        await self._read_some()
        finally:
            self._waiting.discard(rid)
        return self._replies.pop(rid, None)

    async def _read_some(self) -> None:
        stream = self._stream
        if stream is None:
            raise BackendError(f"the TEE at {self.path} went away")
        try:
            data = await stream.receive_some(1 << 16)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            await self._drop("receive failed")
            raise BackendError(f"the TEE at {self.path} went away: {err}") from err
        if not data:
            await self._drop("eof")
            raise BackendError(f"the TEE at {self.path} closed the connection")
        try:
            frames = self._decoder.feed(data)
        except FrameError as err:
            await self._drop("framing")
            raise BackendError(f"the TEE at {self.path} broke the framing: {err}") from err
        for frame in frames:
            rid = frame.get("id")
            if isinstance(rid, int) and not isinstance(rid, bool):
                self._replies[rid] = frame
        while len(self._replies) > MAX_STRAY_REPLIES:
            oldest = next(iter(self._replies))
            if oldest in self._waiting:
                break
            self._replies.popitem(last=False)

    async def _op(self, obj: dict[str, Any], budget: float) -> Step:
        await self.open()
        reply = await self._request(obj, budget)
        if reply is None:
            return Pending(obj["id"])
        return step_from_json(reply, obj["id"])

    # -- the interface
    async def vm_created(self, client: int, budget: float) -> int:
        return await self._code({"op": "vm-created", "client": client}, budget)

    async def vm_destroyed(self, client: int, budget: float) -> int:
        return await self._code({"op": "vm-destroyed", "client": client}, budget)

    async def _code(self, obj: dict[str, Any], budget: float) -> int:
        await self.open()
        reply = await self._request(obj, budget)
        if reply is None:
            raise BackendError(f"the TEE at {self.path} did not answer {obj['op']}")
        code = reply.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            raise BackendError(f"the TEE answered {obj['op']} with {reply!r}")
        return code & 0xFFFF_FFFF

    async def call(self, client: int, msg: Msg, budget: float) -> Step:
        return await self._op({"op": "call", "client": client, "msg": msg.to_json()}, budget)

    async def rpc_return(self, client: int, thread: int, msg: Msg | None, budget: float) -> Step:
        return await self._op({"op": "rpc-return", "client": client, "thread": thread,
                               "msg": None if msg is None else msg.to_json()}, budget)

    async def wait(self, client: int, ticket: int, budget: float) -> Step:
        if ticket not in self._replies and (self._stream is None or ticket < self._first_live):
            raise BackendError(f"the TEE at {self.path} went away while answering")
        reply = await self._await(ticket, budget)
        if reply is None:
            return Pending(ticket)
        return step_from_json(reply, ticket)


__all__ = ["SocketBackend"]
