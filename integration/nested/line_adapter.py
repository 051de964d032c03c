"""Join a serial line that carries hvc-forwarder frames to hvcproxyd's socket.

In the nested-KVM tier the patched QEMU runs inside an emulated arm64 host
(L1) and its hvc-forwarder writes to L1's second UART.  The outer QEMU (L0)
connects that UART to the UNIX socket this adapter listens on.  A serial
line has no connections, so the protocol's "Serial lines" section (QEMU's
docs/interop/hvc-forwarder.rst, §1) does in band what a socket connection
gives the daemon, and this adapter is the far end it describes:

- every HELLO from the line opens a fresh connection to the daemon (closing
  the previous one), so each inner QEMU, and each of its re-handshakes, is a
  session of its own, exactly as a socket VMM's connections are;
- when the daemon closes a connection without an ERROR (it was stopped or
  restarted), the adapter sends ERROR(SHUTDOWN) down the line, which the
  forwarder treats as the close it cannot see, and re-handshakes;
- only whole frames cross, in both directions: bytes from the line that do
  not form a valid header are skipped until one does (an inner QEMU killed
  mid-frame), and a daemon that dies mid-frame leaves nothing half-sent.

It is a transport and understands nothing else of the protocol: frames are
checked only as far as the header (hvcproxyd.wire.HEADER) and the HELLO
magic.  Run: ``python integration/nested/line_adapter.py --line L --daemon D`` (or
``--pty LINK``: a pty of its own, whose other end QEMU opens as
``-chardev serial,path=LINK``; the TCG tier tests the same path that way,
without the nested host).
"""

from __future__ import annotations

import argparse
import logging
import os
import struct
import sys
import tty as ttymod
from pathlib import Path

import trio

from hvcproxyd import wire

log = logging.getLogger("line-adapter")

_HEADER = wire.HEADER
_U32 = struct.Struct("<I")
_TYPES = frozenset(int(t) for t in wire.MsgType)
#: How long a HELLO waits for the daemon to come (back) up before the adapter gives up
#: with ERROR(SHUTDOWN); the forwarder sends HELLO again a second later.
CONNECT_PATIENCE = 30.0
_SHUTDOWN_ERROR = wire.encode(wire.Error(wire.ErrorCode.SHUTDOWN, "the handler closed the connection"))


def _header_ok(buf: bytearray | bytes) -> bool:
    length, msg_type, flags, _seq = _HEADER.unpack_from(buf)
    return _HEADER.size <= length <= wire.MAX_FRAME and msg_type in _TYPES and flags == 0


def _first_word(frame: bytes, msg_type: wire.MsgType) -> int | None:
    """The payload's first u32 of a ``msg_type`` frame (HELLO's magic, EVENT's kind)."""
    _length, got, _flags, _seq = _HEADER.unpack_from(frame)
    if got != msg_type or len(frame) < _HEADER.size + _U32.size:
        return None
    return int(_U32.unpack_from(frame, _HEADER.size)[0])


def _is_hello(frame: bytes) -> bool:
    return _HEADER.unpack_from(frame)[3] == 0 and _first_word(frame, wire.MsgType.HELLO) == wire.MAGIC


def _is_vm_shutdown(frame: bytes) -> bool:
    return _first_word(frame, wire.MsgType.EVENT) == wire.EventKind.VM_SHUTDOWN


class FrameSplitter:
    """Whole frames out of a byte stream, skipping what cannot start one."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.skipped = 0

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        while len(self._buf) >= _HEADER.size:
            if not _header_ok(self._buf):
                del self._buf[0]
                self.skipped += 1
                continue
            length = _HEADER.unpack_from(self._buf)[0]
            if len(self._buf) < length:
                break
            frames.append(bytes(self._buf[:length]))
            del self._buf[:length]
        return frames


class Adapter:
    def __init__(self, line: Path | None, daemon: Path) -> None:
        self.line_path = line
        self.daemon_path = daemon
        self._line: trio.abc.Stream | None = None
        self._daemon: trio.SocketStream | None = None
        self._daemon_scope: trio.CancelScope | None = None
        self._line_lock = trio.Lock()
        self.sessions = 0

    async def _to_line(self, frame: bytes) -> None:
        async with self._line_lock:
            if self._line is not None:
                try:
                    await self._line.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.warning("the line went away while a frame was sent to it")

    async def _close_daemon(self) -> None:
        if self._daemon_scope is not None:
            self._daemon_scope.cancel()
            self._daemon_scope = None
        if self._daemon is not None:
            await self._daemon.aclose()
            self._daemon = None

    async def _connect(self) -> trio.SocketStream | None:
        with trio.move_on_after(CONNECT_PATIENCE):
            while True:
                try:
                    return await trio.open_unix_socket(str(self.daemon_path))
                except OSError:
                    await trio.sleep(0.1)
        log.error("no daemon at %s for %.0f s; HELLO dropped", self.daemon_path, CONNECT_PATIENCE)
        return None

    async def _pump_daemon(self, stream: trio.SocketStream, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        """Daemon → line, whole frames; ERROR(SHUTDOWN) for a close without ERROR."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            splitter = FrameSplitter()
            last_type = 0
            try:
                while data := await stream.receive_some(1 << 16):
                    for frame in splitter.feed(data):
                        last_type = _HEADER.unpack_from(frame)[1]
                        await self._to_line(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            if self._daemon is stream:
                self._daemon = None
                self._daemon_scope = None
            if last_type != wire.MsgType.ERROR:
                log.info("the daemon closed the session; telling the line (ERROR SHUTDOWN)")
                await self._to_line(_SHUTDOWN_ERROR)
            else:
                log.info("the daemon ended the session with ERROR")

    async def _from_line(self, frame: bytes, nursery: trio.Nursery) -> None:
        if _is_hello(frame):
            await self._close_daemon()
            stream = await self._connect()
            if stream is None:
                await self._to_line(_SHUTDOWN_ERROR)  # the forwarder tries again a second later
                return
            self._daemon = stream
            self.sessions += 1
            log.info("session %d: HELLO from the line, connected to %s", self.sessions, self.daemon_path)
            self._daemon_scope = await nursery.start(self._pump_daemon, stream)
        if self._daemon is None:
            log.debug("frame type %d with no session; dropped", _HEADER.unpack_from(frame)[1])
            return
        try:
            await self._daemon.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("the daemon went away; frame type %d dropped", _HEADER.unpack_from(frame)[1])
            return
        if _is_vm_shutdown(frame):
            log.info("VM_SHUTDOWN from the line: the VMM exits, closing its session")
            await self._close_daemon()

    async def _serve_line(self, stream: trio.abc.Stream) -> None:
        async with self._line_lock:
            if self._line is not None:
                log.warning("a second line connection; it replaces the first")
            self._line = stream
        splitter = FrameSplitter()
        async with trio.open_nursery() as nursery:
            try:
                while data := await stream.receive_some(1 << 16):
                    for frame in splitter.feed(data):
                        await self._from_line(frame, nursery)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            log.info("the line closed (%d bytes skipped while resynchronising)", splitter.skipped)
            await self._close_daemon()
            nursery.cancel_scope.cancel()
        if self._line is stream:
            self._line = None

    async def run_pty(self, link: Path) -> None:
        """Make a pty and serve its master as the line; `link` points at the slave for QEMU.

        The adapter keeps the slave open too, so a QEMU that exits does not hang the
        line up: like a UART, it has no connection to lose, and nothing it wrote
        last is flushed away unread.
        """
        master, slave = os.openpty()
        ttymod.setraw(slave)
        os.set_blocking(master, False)
        link.unlink(missing_ok=True)
        link.symlink_to(os.ttyname(slave))
        try:
            await self._serve_line(trio.lowlevel.FdStream(master))
        finally:
            link.unlink(missing_ok=True)
            os.close(slave)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.line_path is not None
        self.line_path.unlink(missing_ok=True)
        listeners = [await _unix_listener(self.line_path)]
        task_status.started()
        await trio.serve_listeners(self._serve_line, listeners)


async def _unix_listener(path: Path) -> trio.SocketListener:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(4)
    return trio.SocketListener(sock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Join a serial line carrying hvc-forwarder frames (the nested-KVM tier's L0 UART socket) "
                    "to hvcproxyd's VMM socket: a connection per HELLO, ERROR(SHUTDOWN) for a daemon's close.")
    line = parser.add_mutually_exclusive_group(required=True)
    line.add_argument("--line", type=Path, help="UNIX socket to listen on; L0's UART connects to it")
    line.add_argument("--pty", type=Path, metavar="LINK",
                      help="make a pty and serve it as the line instead; LINK points at the end QEMU opens "
                           "(-chardev serial,path=LINK)")
    parser.add_argument("--daemon", type=Path, required=True, help="hvcproxyd's VMM socket")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every dropped frame too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s line-adapter: %(message)s", stream=sys.stderr)
    try:
        adapter = Adapter(args.line, args.daemon)
        if args.pty:
            trio.run(adapter.run_pty, args.pty)
        else:
            trio.run(adapter.run)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
