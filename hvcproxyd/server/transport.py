"""A connected UNIX stream socket to the VMM: bytes and fds in, serialised writes out.

trio's streams carry no ancillary data, so this wraps the socket itself
(recvmsg for the SCM_RIGHTS fds HELLO may carry) and turns every OS error into
one :class:`~hvcproxyd.errors.TransportError` with a reason.
"""

from __future__ import annotations

import socket as stdsocket

import trio

from ..errors import TransportError
from ..unixsock import fds_from_ancdata, peer_credentials

RECV_SIZE = 1 << 17
#: At most this many fds per message: one per RAM region, with room to spare.
MAX_FDS = 64


class Transport:
    """A connected UNIX stream socket: bytes and fds in, serialised writes out."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._send_lock = trio.Lock()

    async def receive(self) -> tuple[bytes, tuple[int, ...]]:
        try:
            data, ancdata, _flags, _addr = await self.sock.recvmsg(
                RECV_SIZE, stdsocket.CMSG_SPACE(MAX_FDS * 4), stdsocket.MSG_CMSG_CLOEXEC)
        except OSError as err:
            raise TransportError(f"receive failed: {err.strerror}") from err
        return data, tuple(fds_from_ancdata(ancdata))

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            view = memoryview(data)
            try:
                while view:
                    n = await self.sock.send(view)
                    view = view[n:]
            except OSError as err:
                raise TransportError(f"send failed: {err.strerror}") from err

    def peer_credentials(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the connected process (SO_PEERCRED)."""
        return peer_credentials(self.sock)

    def close(self) -> None:
        self.sock.close()


__all__ = ["MAX_FDS", "RECV_SIZE", "Transport"]
