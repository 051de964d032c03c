"""A connected UNIX stream socket to the VMM: bytes and fds in, bytes out.

trio's streams carry no ancillary data, so this works on the socket itself
(recvmsg for the SCM_RIGHTS fds HELLO may carry) and turns every OS error into
one :class:`~hvcproxyd.errors.TransportError` with a reason.

It makes the nonblocking calls itself and waits with
``trio.lowlevel.wait_readable``/``wait_writable`` only when the kernel says
EAGAIN: trio's socket methods add two checkpoints to every call, which cost
more than the syscall (on the 2-core bench host, a recv through trio 10 µs,
the same recvmsg without it 2 µs).  When no other task can run and no
deadline is near, :meth:`wait_readable` first blocks in ``poll`` on this
socket *and trio's own epoll fd* for at most :data:`POLL_BEFORE_PARK`: the
next CALL usually arrives within microseconds, and waking from a plain
``poll`` is ~25 µs cheaper than a round through trio's scheduler; any other
fd trio watches (control socket, signals, threads) becomes ready through its
epoll fd and ends the wait at once.
"""

from __future__ import annotations

import os
import select
import socket as stdsocket
from typing import Protocol

import trio

from ..errors import TransportError
from ..unixsock import fds_from_ancdata, peer_credentials

RECV_SIZE = 1 << 17
#: At most this many fds per message: one per RAM region, with room to spare.
MAX_FDS = 64
#: Longest a reader blocks in poll (ms) before parking in trio: the wait ends at
#: once when any fd trio watches is ready, but a deadline set meanwhile by
#: another thread's callback waits for it, so it stays short.
POLL_BEFORE_PARK = 1
_ANC_SIZE = stdsocket.CMSG_SPACE(MAX_FDS * 4)


class _Loop:
    """What waiting in ``poll`` needs to know of trio's run loop, read from its
    runner: whether a task is runnable, how far the next deadline is, and its
    epoll fd.  None of this is public trio API (``current_statistics()`` says
    the first two but costs 8.6 µs a call on the bench host, as much as the
    whole decode of a CALL), so each piece is looked up defensively; without
    the runner the transport simply parks in trio every time."""

    def __init__(self) -> None:
        runner = getattr(getattr(trio._core._run, "GLOBAL_RUN_CONTEXT", None), "runner", None)
        epoll = getattr(getattr(runner, "io_manager", None), "_epoll", None)
        usable = (runner is not None and epoll is not None
                  and all(hasattr(runner, a) for a in ("runq", "deadlines", "waiting_for_idle"))
                  and type(getattr(runner, "clock", None)) is getattr(trio._core._run, "SystemClock", None))
        #: Only under the real clock: a test's autojump clock must see every task park.
        self.runner = runner if usable else None
        self.epoll_fd: int | None = epoll.fileno() if usable and epoll is not None else None

    def idle(self) -> bool:
        """Nothing else can run, and no deadline falls within the poll."""
        r = self.runner
        if r is None or r.runq or r.waiting_for_idle:
            return False
        return bool(r.deadlines.next_deadline() - r.clock.current_time() > POLL_BEFORE_PARK / 1000)


class Barrier(Protocol):
    """What must be durable before bytes leave (the journal, hvcproxyd.durable):
    a reply may reveal a state change only once its record is on disk."""

    def pending(self) -> bool: ...

    async def settle(self) -> None: ...


class Transport:
    """A connected UNIX stream socket: bytes and fds in, bytes out.  With a
    ``barrier``, nothing is sent while it has records pending: ``send_nowait``
    takes nothing (so the session's writer task takes over) and ``send`` first
    waits for them, which lets one fsync cover every reply queued meanwhile."""

    def __init__(self, sock: trio.socket.SocketType, barrier: Barrier | None = None) -> None:
        self.sock = sock
        self.barrier = barrier
        # The same open socket, as a plain nonblocking socket for direct syscalls.
        self._raw = stdsocket.socket(fileno=os.dup(sock.fileno()))
        self._raw.setblocking(False)
        self._fd = self._raw.fileno()
        self._poll: select.poll | None = None
        self._peek: select.poll | None = None
        self._loop: _Loop | None = None
        self._send_lock = trio.Lock()

    def receive_nowait(self) -> tuple[bytes, tuple[int, ...]] | None:
        """What is there to read now (b"" when the peer closed), or None if nothing."""
        try:
            data, ancdata, _flags, _addr = self._raw.recvmsg(RECV_SIZE, _ANC_SIZE, stdsocket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        except OSError as err:
            raise TransportError(f"receive failed: {err.strerror}") from err
        return data, (tuple(fds_from_ancdata(ancdata)) if ancdata else ())

    def readable_now(self) -> bool:
        """Whether more has arrived (one poll(0), ~1 µs)."""
        if self._peek is None:
            self._peek = select.poll()
            self._peek.register(self._raw, select.POLLIN)
        return bool(self._peek.poll(0))

    async def wait_readable(self) -> None:
        """Return when the socket may have data (or was closed under us)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = _Loop()
            if loop.epoll_fd is not None:
                self._poll = select.poll()
                self._poll.register(self._raw, select.POLLIN)
                self._poll.register(loop.epoll_fd, select.POLLIN)
        if self._poll is not None and loop.idle():
            for fd, _ev in self._poll.poll(POLL_BEFORE_PARK):
                if fd == self._fd:
                    return  # the caller checkpoints now and then, not per frame
        try:
            await trio.lowlevel.wait_readable(self._raw)
        except trio.ClosedResourceError as err:
            raise TransportError("the socket was closed") from err

    async def receive(self) -> tuple[bytes, tuple[int, ...]]:
        while True:
            got = self.receive_nowait()
            if got is not None:
                return got
            await self.wait_readable()

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Bytes the kernel took now (maybe 0)."""
        if self.barrier is not None and self.barrier.pending():
            return 0
        return self._send_now(data)

    def _send_now(self, data: bytes | memoryview) -> int:
        try:
            return self._raw.send(data)
        except BlockingIOError:
            return 0
        except OSError as err:
            raise TransportError(f"send failed: {err.strerror}") from err

    async def send(self, data: bytes) -> None:
        """All of ``data``, waiting for room as needed; concurrent callers take turns."""
        async with self._send_lock:
            if self.barrier is not None:
                await self.barrier.settle()
            view = memoryview(data)
            while True:
                view = view[self._send_now(view):]
                if not view:
                    return
                try:
                    await trio.lowlevel.wait_writable(self._raw)
                except trio.ClosedResourceError as err:
                    raise TransportError("the socket was closed") from err

    def peer_credentials(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the connected process (SO_PEERCRED)."""
        return peer_credentials(self.sock)

    def close(self) -> None:
        if self._raw.fileno() >= 0:
            trio.lowlevel.notify_closing(self._raw)
            self._raw.close()
        self.sock.close()


__all__ = ["MAX_FDS", "RECV_SIZE", "Barrier", "Transport"]
