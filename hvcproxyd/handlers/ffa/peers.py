"""``ffa-peers``: the FF-A handler's sidecar that accepts other VMs' requests on
the handler's ``listen`` socket (the partition socket protocol, :mod:`.peerwire`).

VM-to-VM traffic flows only where both configs allow the pair: the sending VM
names the receiver as a ``socket`` partition, the receiving VM lists the
sender's endpoint ID in ``peers``; a request from anyone else is DENIED here.
The socket is created mode 0600, so only the daemons' own user reaches it.

A direct request waits, at most ``peer_timeout_ms``, for the guest to take it
with MSG_WAIT and answer with DIRECT_RESP; an indirect message goes into the
guest's RX buffer (or its queue) at once.  All socket I/O and waiting is
here, off the guest's call path.
"""

from __future__ import annotations

import os
import socket as stdsocket
from contextlib import suppress
from typing import Any

import trio

from ...core.sidecar import Sidecar
from .defs import Err
from .endpoint import Endpoint
from .handler import FfaHandler
from .peerwire import Request, serve_connection

#: Peers' connections served at once; more wait in the listen backlog.
MAX_CONNECTIONS = 16
#: How long one peer connection may take to send its request and read the answer,
#: on top of the wait for the guest.
IO_TIMEOUT_S = 2.0


class PeersSidecar(Sidecar):
    def __init__(self, handler: Any, vm: Any) -> None:
        super().__init__(handler, vm)
        self.served = self.refused = self.timeouts = 0

    @property
    def endpoint(self) -> Endpoint:
        handler = self.handler
        assert isinstance(handler, FfaHandler)
        return handler.endpoint

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = self.endpoint.opts.listen
        if path is None:
            task_status.started()
            return
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        with suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        try:
            await sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(MAX_CONNECTIONS)
        except OSError as err:
            sock.close()
            self.log.error("FF-A peers cannot listen on %s: %s; peer VMs' requests will fail", path, err)
            task_status.started()
            return
        listener = trio.SocketListener(sock)
        limit = trio.CapacityLimiter(MAX_CONNECTIONS)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    await limit.acquire_on_behalf_of(stream)
                    nursery.start_soon(self._serve, stream, limit)
        finally:
            with suppress(OSError):
                path.unlink()
            await listener.aclose()

    async def _serve(self, stream: trio.SocketStream, limit: trio.CapacityLimiter) -> None:
        try:
            timeout = IO_TIMEOUT_S + self.endpoint.opts.peer_timeout_ms / 1000
            await serve_connection(stream, self.answer, timeout)
        finally:
            limit.release_on_behalf_of(stream)

    async def answer(self, req: Request) -> dict[str, Any]:
        """One checked request from a peer daemon, answered with an FF-A status."""
        ep = self.endpoint
        sender, op = req["sender"], req["op"]
        if req["receiver"] != ep.opts.id or sender not in ep.opts.peers:
            self.refused += 1
            return {"status": int(Err.DENIED)}
        self.served += 1
        if op == "indirect":
            rc = ep.deliver_message(sender, bytes.fromhex(req["payload"]))
            if not rc:
                await ep.flush_messages()
            return {"status": int(rc)}
        if op == "notify":
            return {"status": int(ep.notify_guest(sender, req["bitmap"]))}
        if len(req["args"]) != 5:
            return {"status": int(Err.NOT_SUPPORTED)}  # REQ2 between VMs is not offered
        woken = trio.Event()
        pending = ep.offer_request(sender, tuple(req["args"]), req["wide"], woken.set)
        if isinstance(pending, Err):
            return {"status": int(pending)}
        with trio.move_on_after(ep.opts.peer_timeout_ms / 1000):
            await woken.wait()
        if pending.response is None:
            ep.withdraw(pending)
            self.timeouts += 1
            return {"status": int(Err.ABORTED)}
        if isinstance(pending.response, Err):
            return {"status": int(pending.response)}
        return {"status": 0, "regs": list(pending.response)}

    def report(self) -> dict[str, Any]:
        return {"peer_requests": self.served, "peer_refused": self.refused, "peer_timeouts": self.timeouts}
