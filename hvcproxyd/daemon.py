"""The trio daemon: listen on the VM's socket, handshake, dispatch per vCPU,
answer memory requests, shut down in order.

Shape (after trio servers): :func:`Daemon.serve` starts the listener and
reports it through ``task_status``; one nursery per connection owns its reader
and its vCPU workers, so when the connection ends they end.  One worker task
per vCPU means a slow handler delays only its own vCPU, with no task spawned
per call.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket as stdsocket
import stat
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from . import wire
from .config import ConfigError, VmConfig, load_config
from .errors import TransportError
from .guestmem import GuestMemory, GuestMemoryError
from .handlers import Handler
from .unixsock import fds_from_ancdata, peer_credentials, set_group
from .vm import ReloadRefused, VmService
from .vmm.qmp import QmpWatcher

log = logging.getLogger("hvcproxyd.daemon")

HANDSHAKE_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 2.0
DRAIN_TIMEOUT = 10.0
RECV_SIZE = 1 << 17
MAX_FDS = 64
#: Calls a vCPU may have queued; the protocol allows one in flight, a little slack
#: absorbs a replay racing its original without letting a VMM grow our memory.
VCPU_QUEUE = 4


class Transport:
    """A connected UNIX stream socket: bytes and fds in, serialised writes out."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._send_lock = trio.Lock()

    async def receive(self) -> tuple[bytes, tuple[int, ...]]:
        try:
            data, ancdata, _flags, _addr = await self.sock.recvmsg(
                RECV_SIZE, stdsocket.CMSG_SPACE(MAX_FDS * 4))
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


@dataclass(slots=True)
class _Pending:
    done: trio.Event
    result: wire.MemReadResp | wire.MemWriteResp | None = None


class Session:
    """One VMM connection, from HELLO to close."""

    def __init__(self, daemon: Daemon, transport: Transport) -> None:
        self.daemon = daemon
        self.vm = daemon.vm
        self.transport = transport
        self.conn = wire.Connection(wire.Role.DAEMON)
        self.hello: wire.Hello | None = None
        self._mem_seq = 0
        self._pending: dict[int, _Pending] = {}
        self._queues: list[trio.MemorySendChannel[wire.Call]] = []
        self.in_flight = 0
        self.idle = trio.Event()
        self.idle.set()
        self.connected_at = time.time()
        # Frames for the writer task while the session runs: the vCPU workers and the
        # reader only append, and one task writes whatever is ready in one syscall.
        # Under load that batches replies from several vCPUs, and a worker never
        # yields to the scheduler to write.
        self._out: list[bytes] = []
        self._out_ready = trio.Event()
        self._out_empty = trio.Event()
        self._out_empty.set()
        self._writer_running = False

    async def send(self, event: wire.Event) -> None:
        data = self.conn.send(event)
        if not self._writer_running:
            await self.transport.send(data)
            return
        self._out.append(data)
        self._out_ready.set()
        if self._out_empty.is_set():
            self._out_empty = trio.Event()

    async def _writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._writer_running = True
        task_status.started()
        try:
            while True:
                await self._out_ready.wait()
                self._out_ready = trio.Event()
                data = b"".join(self._out)
                self._out.clear()
                await self.transport.send(data)
                if not self._out:
                    self._out_empty.set()
        finally:
            self._writer_running = False

    async def flush(self) -> None:
        """Wait until every frame queued so far is written (e.g. before an ERROR closes)."""
        await self._out_empty.wait()

    async def next_event(self) -> wire.Event | None:
        """The next frame, or None when the peer closed."""
        while True:
            event = self.conn.next_event()
            if event is not wire.NEED_DATA:
                return event  # type: ignore[return-value]
            data, fds = await self.transport.receive()
            self.conn.receive_data(data, fds)
            if self.conn.state is wire.State.CLOSED:
                return None

    async def refuse(self, code: wire.ErrorCode, reason: str) -> None:
        log.error("%s: closing VMM connection: %s", self.vm.ctx.name, reason)
        with trio.move_on_after(CLEANUP_TIMEOUT), suppress(TransportError, wire.ProtocolError):
            await self.send(wire.Error(code, reason[:1000]))
            if self._writer_running:
                await self.flush()

    # -- handshake
    async def handshake(self) -> bool:
        hello = await self.next_event()
        if hello is None:
            return False
        if not isinstance(hello, wire.Hello):
            raise wire.RemoteProtocolError(f"expected HELLO, got {type(hello).__name__}")
        self.hello = hello
        fds = list(hello.fds) + self.conn.take_fds()
        try:
            return await self._handshake(hello, fds)
        finally:
            for fd in fds:
                with suppress(OSError):
                    os.close(fd)

    async def _handshake(self, hello: wire.Hello, fds: list[int]) -> bool:
        name = self.vm.ctx.name
        version = wire.negotiate_version(hello.min_version, hello.max_version)
        if version is None:
            lo, hi = wire.PROTOCOL_VERSIONS
            await self.refuse(wire.ErrorCode.VERSION,
                              f"VMM speaks protocol {hello.min_version}..{hello.max_version}, daemon {lo}..{hi}")
            return False
        if hello.name != name:
            log.warning("%s: VMM calls its VM %r; serving it as %r from %s", name, hello.name, name,
                        self.vm.config.path)
        ranges = self.vm.filter
        if hello.reconnect and hello.filter_in_force != ranges:
            await self.refuse(wire.ErrorCode.FILTER_MISMATCH,
                              "the filter in force differs from this config: " + _first_difference(
                                  hello.filter_in_force, ranges) + "; KVM cannot change it once the VM has run, "
                                  "so restore the config the VM was started with, or restart the VM")
            return False
        if hello.features & wire.FEATURE_MEMFD:
            try:
                memory = GuestMemory.from_fds(hello.regions, hello.ipa_bits, fds,
                                              remote_read=self.mem_read, remote_write=self.mem_write)
            except (GuestMemoryError, OSError, ValueError) as err:
                await self.refuse(wire.ErrorCode.REFUSED, f"cannot map guest RAM: {err}")
                return False
        else:
            memory = GuestMemory(hello.regions, hello.ipa_bits, remote_read=self.mem_read,
                                 remote_write=self.mem_write)
        timeout_ms = int(max(self.vm.timeouts.values(), default=self.vm.config.timeout_s) * 1000)
        await self.send(wire.Welcome(version, ranges, timeout_ms))
        status = await self.next_event()
        if status is None:
            memory.close()
            return False
        assert isinstance(status, wire.FilterStatus)  # the state table allows nothing else
        if status.status != 0:
            memory.close()
            which = (f"range {status.failed_index} ({ranges[status.failed_index].base:#010x})"
                     if status.failed_index < len(ranges) else "the filter")
            await self.refuse(wire.ErrorCode.FILTER_REJECTED,
                              f"the VMM could not install {which}: {_errno_name(status.status)}")
            return False
        self.vm.attach(hello, memory)
        if hello.reconnect:
            self.daemon.reconnects += 1
        log.info("%s: VMM attached (%s, %d vCPUs, %d RAM regions%s, %s, protocol v%d, %d filter ranges)",
                 name, hello.accel.name, len(hello.vcpus), len(hello.regions),
                 ", memfd-mapped" if memory.mapped else "", "reconnect" if hello.reconnect else "fresh boot",
                 version, len(ranges))
        return True

    # -- guest memory through the VMM
    async def _mem_request(self, event: wire.MemRead | wire.MemWrite) -> wire.MemReadResp | wire.MemWriteResp:
        pending = _Pending(trio.Event())
        self._pending[event.seq] = pending
        try:
            try:
                await self.send(event)
            except (TransportError, wire.ProtocolError) as err:
                raise GuestMemoryError(f"VMM connection lost: {err}") from err
            await pending.done.wait()
        finally:
            self._pending.pop(event.seq, None)
        if pending.result is None:
            raise GuestMemoryError("VMM connection closed during a guest memory access")
        if pending.result.status != 0:
            raise GuestMemoryError(f"VMM refused the access: {_errno_name(pending.result.status)}")
        return pending.result

    def _next_mem_seq(self) -> int:
        self._mem_seq += 1
        return self._mem_seq

    async def mem_read(self, gpa: int, length: int) -> bytes:
        resp = await self._mem_request(wire.MemRead(self._next_mem_seq(), gpa, length))
        assert isinstance(resp, wire.MemReadResp)
        return resp.data

    async def mem_write(self, gpa: int, data: bytes) -> None:
        await self._mem_request(wire.MemWrite(self._next_mem_seq(), gpa, data))

    # -- running
    async def run(self) -> None:
        """Serve calls until the VMM goes.  A protocol or transport error from any of
        the session's tasks leaves as that one error (not trio's exception group),
        so the daemon answers it and stays up for the next VMM."""
        try:
            await self._run()
        except BaseExceptionGroup as group:
            for kind in (wire.RemoteProtocolError, TransportError):
                matched, _rest = group.split(kind)
                if matched is not None:
                    raise _first_leaf(matched) from group
            raise

    async def _run(self) -> None:
        assert self.hello is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(self._writer)
            for _ in self.hello.vcpus:
                send, receive = trio.open_memory_channel[wire.Call](VCPU_QUEUE)
                self._queues.append(send)
                nursery.start_soon(self._vcpu_worker, receive)
            if self.daemon.qmp is not None:
                nursery.start_soon(self._cross_check, self.daemon.qmp, nursery.cancel_scope)
            try:
                await self._read_loop()
            finally:
                nursery.cancel_scope.cancel()
                for p in self._pending.values():
                    p.done.set()

    async def _cross_check(self, qmp: QmpWatcher, session_scope: trio.CancelScope) -> None:
        """After the handshake (QEMU answers QMP only once machine init is over):
        a VMM whose vCPU table QEMU contradicts is not served."""
        assert self.hello is not None
        problem = await qmp.cross_check(self.hello)
        if problem:
            await self.refuse(wire.ErrorCode.REFUSED, problem)
            session_scope.cancel()

    async def _read_loop(self) -> None:
        vm = self.vm
        while True:
            event = await self.next_event()
            if event is None:
                log.info("%s: VMM disconnected", vm.ctx.name)
                return
            if type(event) is wire.Call:
                if event.vcpu >= len(self._queues):
                    raise wire.RemoteProtocolError(f"CALL from vCPU {event.vcpu}, the VM has {len(self._queues)}")
                if self.daemon.draining:
                    continue  # left unanswered: the VMM re-sends it to the next daemon (protocol §7)
                try:
                    self._queues[event.vcpu].send_nowait(event)
                except trio.WouldBlock:
                    raise wire.RemoteProtocolError(
                        f"vCPU {event.vcpu} has more than {VCPU_QUEUE} calls queued") from None
                self.in_flight += 1
                self.idle = trio.Event() if self.idle.is_set() else self.idle
            elif isinstance(event, (wire.MemReadResp, wire.MemWriteResp)):
                pending = self._pending.get(event.seq)
                if pending is not None:
                    pending.result = event
                    pending.done.set()
            elif isinstance(event, wire.EffectDone):
                vm.effect_done(event.seq, event.index, event.status)
            elif isinstance(event, wire.VmEvent):
                vm.event(event)
            elif isinstance(event, wire.Error):
                log.error("%s: VMM sent ERROR %s: %s", vm.ctx.name, event.code.name, event.reason)
                return

    async def _vcpu_worker(self, calls: trio.MemoryReceiveChannel[wire.Call]) -> None:
        dispatch = self.vm.dispatch
        async for call in calls:
            try:
                reply = await dispatch(call)
                await self.send(reply)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self.idle.set()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _first_difference(have: tuple[wire.FilterRange, ...], want: tuple[wire.FilterRange, ...]) -> str:
    def fmt(r: wire.FilterRange | None) -> str:
        return "nothing" if r is None else f"{r.base:#010x}+{r.count:#x} {r.action.name}"

    for i in range(max(len(have), len(want))):
        a = have[i] if i < len(have) else None
        b = want[i] if i < len(want) else None
        if a != b:
            return f"entry {i}: in force {fmt(a)}, config wants {fmt(b)}"
    return "none"


def _errno_name(status: int) -> str:
    code = -status
    return f"{errno.errorcode.get(code, 'errno ' + str(code))} ({os.strerror(code)})"


class Daemon:
    """Serves one VM: owns the listener, the VmService and the signal handling."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.vm = VmService(config)
        self.session: Session | None = None
        self.draining = False
        #: QEMU's QMP view of this VM, when the config names its socket.
        self.qmp = QmpWatcher(str(config.qmp), config.name) if config.qmp else None
        self.peer_filter: Callable[[int, int, int], str | None] | None = None
        self.reloads = 0
        self.connections = 0
        self.protocol_errors = 0
        self.reconnects = 0
        #: Why the last reload was refused; None after one that applied.
        self.reload_error: str | None = None
        self._stop = trio.Event()
        self._handler_scopes: dict[str, trio.CancelScope] = {}

    # -- the listener
    def _bind(self) -> trio.socket.SocketType:
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        # We own the path: unlink a stale socket from an earlier run, never a regular file.
        with suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        return sock

    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        sock = self._bind()
        path = self.config.socket
        await sock.bind(str(path))
        os.chmod(path, 0o660)
        if self.config.vmm.gid is not None:
            set_group(path, self.config.vmm.gid, "vmm.gid")
        sock.listen(4)
        bound_inode = os.lstat(path).st_ino
        listener = trio.SocketListener(sock)
        log.info("%s: listening on %s (%d rules, %d forwarded/denied ranges)", self.config.name, path,
                 len(self.config.rules), len(self.vm.filter))
        try:
            async with self._asyncio_loop(), trio.open_nursery() as nursery:
                if self.qmp is not None:
                    await nursery.start(self.qmp.run)
                await self._start_handlers(nursery, self.vm.instances)
                self.vm.on_instances.append(lambda inst: nursery.start_soon(self._start_handlers, nursery, inst))
                nursery.start_soon(self._accept_loop, listener)
                task_status.started(path)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            with suppress(OSError):
                if os.lstat(path).st_ino == bound_inode:  # not a successor's socket
                    path.unlink()
            sock.close()

    def _asyncio_loop(self) -> AbstractAsyncContextManager[object]:
        """qemu.qmp is asyncio: give every task of the daemon a trio-asyncio loop when QMP is used."""
        if self.qmp is None:
            return nullcontext()
        import trio_asyncio

        return trio_asyncio.open_loop()  # type: ignore[no-any-return]

    async def _start_handlers(self, nursery: trio.Nursery, instances: dict[str, Handler]) -> None:
        """Run each instance's background work in a scope that ends when a reload
        replaces it, so an old instance never outlives its config."""
        for old in self._handler_scopes.values():
            old.cancel()
        self._handler_scopes = {}
        for name, inst in instances.items():
            scope = trio.CancelScope()
            self._handler_scopes[name] = scope
            await nursery.start(self._run_handler, inst, scope)

    @staticmethod
    async def _run_handler(inst: Handler, scope: trio.CancelScope, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            try:
                await inst.run(task_status=task_status)
            except Exception:
                log.exception("handler %s: background task failed", inst.name)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._connection, stream.socket)

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        transport = Transport(sock)
        name = self.config.name
        try:
            if self.peer_filter is not None:
                pid, uid, gid = transport.peer_credentials()
                why = self.peer_filter(pid, uid, gid)
                if why:
                    log.warning("%s: refused VMM pid %d uid %d gid %d: %s", name, pid, uid, gid, why)
                    return
            session = Session(self, transport)
            if self.session is not None:
                await session.refuse(wire.ErrorCode.BUSY, "another VMM is connected to this VM's socket")
                return
            if self.draining:
                await session.refuse(wire.ErrorCode.SHUTDOWN, "the daemon is shutting down")
                return
            self.session = session
            self.connections += 1
            try:
                await self._serve_session(session)
            finally:
                self.session = None
                self.vm.detach()
        finally:
            transport.close()

    async def _serve_session(self, session: Session) -> None:
        name = self.config.name
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                ok = await session.handshake()
            if scope.cancelled_caught:
                await session.refuse(wire.ErrorCode.PROTOCOL, f"no handshake within {HANDSHAKE_TIMEOUT:.0f}s")
                return
            if not ok:
                return
            await session.run()
        except wire.RemoteProtocolError as err:
            self.protocol_errors += 1
            await session.refuse(wire.ErrorCode.PROTOCOL, str(err))
        except TransportError as err:
            log.warning("%s: VMM connection lost: %s", name, err.reason)
        except Exception:
            # A bug of ours in this session must not take the daemon (and the next
            # VMM) down with it; Cancelled is a BaseException and passes through.
            log.exception("%s: internal error serving the VMM; closing its connection", name)
            await session.refuse(wire.ErrorCode.REFUSED, "internal error in hvcproxyd; see its log")

    # -- control
    def stop(self) -> None:
        self._stop.set()

    async def drain_and_stop(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """SIGTERM: stop taking calls, finish those in flight, say goodbye, exit."""
        self.draining = True
        session = self.session
        if session is not None:
            log.info("%s: draining %d call(s) in flight", self.config.name, session.in_flight)
            with trio.move_on_after(timeout) as scope:
                await session.idle.wait()
            if scope.cancelled_caught:
                log.error("%s: %d call(s) still running after %.0fs; stopping anyway", self.config.name,
                          session.in_flight, timeout)
            await session.refuse(wire.ErrorCode.SHUTDOWN, "daemon stopping (SIGTERM)")
        self.stop()

    def reload(self, path: Path | None = None) -> bool:
        """SIGHUP: re-read the config; apply it if valid and live-compatible."""
        path = path or self.config.path
        try:
            config = load_config(path, socket=str(self.config.socket))
        except ConfigError as err:
            log.error("%s: reload refused, keeping the running config: %s has errors:\n%s",
                      self.config.name, path, err)
            self.reload_error = f"{path} has errors:\n{err}"
            return False
        try:
            self.vm.reload(config)
        except ReloadRefused as err:
            log.error("%s: reload refused, keeping the running config: %s", self.config.name, err)
            self.reload_error = str(err)
            return False
        self.config = config
        self.reloads += 1
        self.reload_error = None
        log.info("%s: reloaded %s (%d handlers, %d rules)", config.name, path, len(config.handlers),
                 len(config.rules))
        return True

    async def handle_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    log.info("%s: %s received", self.config.name, signal.Signals(signum).name)
                    await self.drain_and_stop()
                    return


async def run_daemon(config: VmConfig, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGTERM/SIGINT; the CLI's ``run``."""
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.handle_signals)
        await nursery.start(daemon.serve)
        task_status.started(daemon)
        await daemon._stop.wait()
        nursery.cancel_scope.cancel()
