"""A handler the test drives step by step, for checking QEMU's side of
docs/protocol.md frame by frame (reconnects, replays, timeouts, guest memory).

It speaks through hvcproxyd.wire, the daemon's own codec, so QEMU's frames are
also checked against the reference decoder.  Blocking sockets, one connection
at a time; every wait has a timeout.
"""

from __future__ import annotations

import array
import os
import socket
from pathlib import Path
from typing import TypeVar, cast

from hvcproxyd import wire
from hvcproxyd.unixsock import fds_from_ancdata

E = TypeVar("E")
FD_SPACE = socket.CMSG_SPACE(64 * array.array("i").itemsize)


class ScriptedHandler:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.sessions: list[Session] = []

    def accept(self, timeout: float = 30.0) -> Session:
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        s = Session(sock)
        self.sessions.append(s)
        return s

    def close(self) -> None:
        for s in self.sessions:
            s.close()
        self.listener.close()


class Session:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = wire.Connection(wire.Role.DAEMON)
        self.fds: list[int] = []

    def next_event(self, timeout: float = 30.0) -> wire.Event | None:
        """The next frame from QEMU, or None when it closed the connection."""
        self.sock.settimeout(timeout)
        while True:
            ev = self.conn.next_event()
            if ev is not wire.NEED_DATA:
                if isinstance(ev, wire.Hello):
                    self.fds.extend(ev.fds)
                return cast("wire.Event", ev)  # NEED_DATA is a sentinel object mypy cannot narrow away
            if self.conn.state is wire.State.CLOSED:
                return None
            data, anc, _flags, _addr = self.sock.recvmsg(65536, FD_SPACE)
            self.conn.receive_data(data, tuple(fds_from_ancdata(anc)))
            if not data:
                return None

    def expect(self, kind: type[E], timeout: float = 30.0, skip: tuple[type, ...] = ()) -> E:
        """The next frame, which must be a `kind` (frames of the `skip` types are dropped)."""
        while True:
            ev = self.next_event(timeout)
            if ev is not None and skip and isinstance(ev, skip):
                continue
            assert isinstance(ev, kind), f"expected {kind.__name__}, got {ev!r}"
            return ev

    def send(self, event: wire.Event) -> None:
        self.sock.sendall(self.conn.send(event))

    def handshake(self, ranges: tuple[wire.FilterRange, ...], timeout: float = 30.0) -> wire.Hello:
        hello = self.expect(wire.Hello, timeout)
        self.send(wire.Welcome(version=1, ranges=ranges, call_timeout_ms=1000))
        status = self.expect(wire.FilterStatus, timeout)
        assert status.status == 0, status
        return hello

    def mem_read(self, seq: int, gpa: int, length: int) -> wire.MemReadResp:
        self.send(wire.MemRead(seq=seq, gpa=gpa, length=length))
        return self.expect(wire.MemReadResp)

    def mem_write(self, seq: int, gpa: int, data: bytes) -> wire.MemWriteResp:
        self.send(wire.MemWrite(seq=seq, gpa=gpa, data=data))
        return self.expect(wire.MemWriteResp)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        self.sock.close()
