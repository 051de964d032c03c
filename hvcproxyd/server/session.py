"""One VMM connection: the handshake, the reader, the writer, one worker per vCPU.

One nursery per connection owns its tasks, so when the connection ends they
end.  The reader answers every call whose handler never waits
(``Handler.inline``: PSCI, memshare, the built-ins) itself, between reading a
batch and writing its replies in one send: no task switch per call, which in
trio costs more than the handler.  A handler that may wait runs in its vCPU's
worker task under its timeout, so it delays only its own vCPU.  Within a
batch, vCPUs are served by how little they have been served so far, so a
flooding vCPU cannot hold a quiet one back (issue 15).  The writer task only
takes over when the socket buffer is full.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass

import trio

from .. import wire
from ..core.guestmem import GuestMemory, GuestMemoryError
from ..core.handler import Handler
from ..core.service import VmService
from ..errors import TransportError
from ..vmm.qmp import QmpWatcher
from .fairqueue import FairQueue
from .transfer import StateTransfer
from .transport import Transport

log = logging.getLogger("hvcproxyd.daemon")

HANDSHAKE_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 2.0
#: Calls a vCPU may have queued; the protocol allows one in flight, a little slack
#: absorbs a replay racing its original without letting a VMM grow our memory.
VCPU_QUEUE = 4
#: Longest the reader goes without a checkpoint while frames keep arriving (s).
YIELD_EVERY = 0.001


@dataclass(slots=True)
class _Pending:
    done: trio.Event
    result: wire.MemReadResp | wire.MemWriteResp | None = None


@dataclass(slots=True)
class LinkStats:
    """The VMM connections a daemon has seen; rendered by status and /metrics."""

    accepted: int = 0
    reconnects: int = 0
    refused_peers: int = 0
    protocol_errors: int = 0


class Session:
    """One VMM connection, from HELLO to close.  ``draining`` says whether the
    daemon has stopped taking calls (SIGTERM)."""

    def __init__(self, vm: VmService, transport: Transport, *, links: LinkStats,
                 qmp: QmpWatcher | None = None, draining: Callable[[], bool] = lambda: False) -> None:
        self.vm = vm
        self.links = links
        self.qmp = qmp
        self.draining = draining
        self.transport = transport
        self.conn = wire.Connection(wire.Role.DAEMON)
        self.hello: wire.Hello | None = None
        self._mem_seq = 0
        self._pending: dict[int, _Pending] = {}
        self._queues: list[trio.MemorySendChannel[wire.Call]] = []
        self.in_flight = 0
        self.idle = trio.Event()
        self.idle.set()
        #: Set once the reader has stopped (peer closed, error, cancel): the session is
        #: only tearing down, and a reconnecting VMM may wait for its slot.
        self.closing = trio.Event()
        self.connected_at = time.time()
        # Frames go out through _out: the reader and the vCPU workers append, then
        # _flush() writes whatever is queued in one nonblocking send, so replies
        # read in one batch leave in one write and no task switch is needed to
        # write.  Only what the kernel cannot take yet goes to the writer task,
        # which waits for room; until it has written that, later frames queue
        # behind it, so frames never interleave or reorder.
        self._out: list[bytes] = []
        self._blocked = False
        self._out_ready = trio.Event()
        self._out_empty = trio.Event()
        self._out_empty.set()
        self._writer_running = False
        #: vCPU -> calls queued for or running in its worker; while any is, that
        #: vCPU's next call queues behind it (replies stay in order per vCPU).
        self._busy: list[int] = []
        #: Calls read and not yet answered or given to a worker, in their fair
        #: order (sized at the handshake, when the vCPUs are known).
        self._waiting = FairQueue(0)
        self._reader_task: trio.lowlevel.Task | None = None
        self._nursery: trio.Nursery | None = None
        self.transfer = StateTransfer(vm, self._queue, self.flush, self._wait_idle)

    async def send(self, event: wire.Event) -> None:
        data = self.conn.send(event)
        if not self._writer_running:
            await self.transport.send(data)
            return
        self._out.append(data)
        self._flush()

    def _queue(self, event: wire.Event) -> None:
        """Send from a task that is not the reader, without waiting for the kernel."""
        self._out.append(self.conn.send(event))
        self._flush()

    def _send_interrupt(self, vcpu: int, intid: int) -> None:
        """For VmContext.raise_interrupt, from any task: a session that is going
        drops it (the handler raises it again when the VMM is back)."""
        if self.closing.is_set():
            return
        try:
            self._queue(wire.Interrupt(vcpu, intid))
        except (wire.ProtocolError, TransportError) as err:
            log.debug("%s: INTERRUPT %d for vCPU %d not sent: %s", self.vm.config.name, intid, vcpu, err)

    async def _wait_idle(self) -> None:
        while not self.idle.is_set():
            await self.idle.wait()

    def reloaded(self) -> None:
        """The VM's config changed live: the VMM hears if the migration blocker did."""
        if self._nursery is not None and self.conn.version >= wire.STATE_VERSION:
            self.transfer.announce_blocker()

    def _flush(self) -> None:
        """Write what is queued, without waiting; hand the rest to the writer task."""
        out = self._out
        if self._blocked or not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        n = self.transport.send_nowait(data)
        if n < len(data):
            out.append(data[n:])
            self._blocked = True
            self._out_empty = trio.Event()
            self._out_ready.set()

    async def _writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._writer_running = True
        task_status.started()
        try:
            while True:
                await self._out_ready.wait()
                self._out_ready = trio.Event()
                while self._out:
                    data = b"".join(self._out)
                    self._out.clear()
                    await self.transport.send(data)
                self._blocked = False
                self._out_empty.set()
        finally:
            self._writer_running = False

    async def flush(self) -> None:
        """Wait until every frame queued so far is written (e.g. before an ERROR closes)."""
        self._flush()
        await self._out_empty.wait()

    def _decode(self) -> wire.Event | wire._NeedData:
        """The next buffered frame or NEED_DATA; fds received are closed on a protocol error."""
        try:
            return self.conn.next_event()
        except wire.ProtocolError:
            _close_fds(self.conn.take_fds())
            raise

    def _feed(self, data: bytes, fds: tuple[int, ...]) -> bool:
        """Hand received bytes to the codec; False once the peer has closed."""
        conn = self.conn
        if fds and conn.state is not wire.State.AWAIT_HELLO:
            _close_fds(fds)
            _close_fds(conn.take_fds())
            raise wire.RemoteProtocolError(
                f"{len(fds)} file descriptor(s) sent outside HELLO; only HELLO may carry them")
        conn.receive_data(data, fds)
        if conn.state is wire.State.CLOSED:
            _close_fds(conn.take_fds())
            return False
        return True

    async def next_event(self) -> wire.Event | None:
        """The next frame, or None when the peer closed.

        File descriptors are accepted only with the HELLO of the handshake: any
        that come with another frame are closed at once and the frame is a
        protocol error; those of a HELLO that fails to decode are closed too."""
        while True:
            event = self._decode()
            if event is not wire.NEED_DATA:
                return event  # type: ignore[return-value]
            if not self._feed(*await self.transport.receive()):
                return None

    async def refuse(self, code: wire.ErrorCode, reason: str) -> None:
        log.error("%s: closing VMM connection: %s", self.vm.config.name, reason)
        with trio.move_on_after(CLEANUP_TIMEOUT), suppress(TransportError, wire.ProtocolError):
            await self.send(wire.Error(code, reason[:1000]))
            if self._writer_running:
                await self.flush()

    # -- handshake
    async def handshake(self, admit: Callable[[], Awaitable[tuple[wire.ErrorCode, str] | None]] | None = None
                        ) -> bool:
        """HELLO, WELCOME, FILTER_STATUS.  ``admit`` runs once a HELLO has arrived
        and before anything is answered: it returns None to go on, or the
        (code, reason) of the ERROR that refuses the VMM (BUSY, SHUTDOWN).  Every
        fd the HELLO carried is closed when the handshake ends, whatever it did
        (mapped guest RAM keeps its own references)."""
        try:
            hello = await self.next_event()
        except BaseException:
            _close_fds(self.conn.take_fds())
            raise
        if hello is None:
            return False
        if not isinstance(hello, wire.Hello):
            _close_fds(self.conn.take_fds())
            raise wire.RemoteProtocolError(f"expected HELLO, got {type(hello).__name__}")
        fds = list(hello.fds) + self.conn.take_fds()
        try:
            if admit is not None:
                refusal = await admit()
                if refusal is not None:
                    await self.refuse(*refusal)
                    return False
            self.hello = hello
            return await self._handshake(hello, fds)
        finally:
            _close_fds(fds)

    async def _handshake(self, hello: wire.Hello, fds: list[int]) -> bool:
        name = self.vm.config.name
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
                memory = GuestMemory.from_fds(hello.ram, hello.ipa_bits, fds,
                                              remote_read=self.mem_read, remote_write=self.mem_write)
            except (GuestMemoryError, OSError, ValueError) as err:
                await self.refuse(wire.ErrorCode.REFUSED, f"cannot map guest RAM: {err}")
                return False
            if memory.unsealed:
                log.warning("%s: guest RAM at %s is not sealed against shrinking (F_SEAL_SHRINK), so it is not "
                            "mapped: the daemon reaches it through the VMM (MEM_READ/MEM_WRITE), which is slower; "
                            "QEMU's memory-backend-memfd seals by default (seal=on)", self.vm.config.name,
                            ", ".join(f"{gpa:#x}" for gpa in memory.unsealed))
        else:
            memory = GuestMemory(hello.ram, hello.ipa_bits, remote_read=self.mem_read,
                                 remote_write=self.mem_write)
        timeout_ms = int(max(self.vm.timeouts.values(), default=self.vm.config.timeout_s) * 1000)
        try:
            await self.send(wire.Welcome(version, ranges, timeout_ms))
            status = await self.next_event()
        except BaseException:
            memory.close()  # a timeout or a broken peer before FILTER_STATUS: never attached
            raise
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
        offers_interrupts = version >= wire.STATE_VERSION and hello.features & wire.FEATURE_INTERRUPT
        self.vm.attach(hello, memory, self._send_interrupt if offers_interrupts else None)
        if hello.reconnect:
            self.links.reconnects += 1
        log.info("%s: VMM attached (%s, %d vCPUs, %d RAM and %d ROM regions%s, %s, protocol v%d, %d filter ranges)",
                 name, hello.accel.name, len(hello.vcpus), len(hello.ram), len(hello.regions) - len(hello.ram),
                 ", memfd-mapped" if memory.mapped else "", "reconnect" if hello.reconnect else "fresh boot",
                 version, len(ranges))
        return True

    # -- guest memory through the VMM
    async def _mem_request(self, event: wire.MemRead | wire.MemWrite) -> wire.MemReadResp | wire.MemWriteResp:
        if self._reader_task is not None and trio.lowlevel.current_task() is self._reader_task:
            # A handler marked inline that reached guest memory through the VMM: the
            # reader waiting for the answer it must itself read would deadlock.
            raise GuestMemoryError("guest memory through the VMM from a handler marked inline")
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
            self._nursery = nursery
            if self.conn.version >= wire.STATE_VERSION:
                self.transfer.announce_blocker()
            self._waiting = FairQueue(len(self.hello.vcpus))
            for index in range(len(self.hello.vcpus)):
                send, receive = trio.open_memory_channel[wire.Call](VCPU_QUEUE)
                self._queues.append(send)
                self._busy.append(0)
                nursery.start_soon(self._vcpu_worker, index, receive)
            if self.qmp is not None:
                nursery.start_soon(self._cross_check, self.qmp, nursery.cancel_scope)
            self._reader_task = trio.lowlevel.current_task()
            try:
                await self._read_loop()
            finally:
                self._reader_task = None
                self._nursery = None
                self.closing.set()
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
        """Read what there is, answer it, write the replies in one send, repeat.

        Calls wait in ``_waiting`` in their fair order (:mod:`.fairqueue`), and are
        answered one at a time; after each, if more has arrived it is read
        first, so a quiet vCPU's call that comes in meanwhile goes ahead of the
        flooders' calls already waiting.  Replies go out when nothing is
        waiting, or at once for a quiet vCPU.  The reader never yields on its
        own while frames keep coming, so it checkpoints at least every
        YIELD_EVERY seconds (and parks in trio whenever another task is runnable
        and nothing is to be read)."""
        transport, waiting = self.transport, self._waiting
        last_yield = time.perf_counter()
        while True:
            while (event := self._decode()) is not wire.NEED_DATA:
                if type(event) is wire.Call:
                    if event.vcpu >= len(self._queues):
                        raise wire.RemoteProtocolError(f"CALL from vCPU {event.vcpu}, the VM has {len(self._queues)}")
                    if not self.draining():  # else left unanswered: the VMM re-sends it (protocol §7)
                        waiting.push(event)
                    continue
                while waiting:  # calls before an event are answered before it, all of them
                    await self._serve_next()
                if not self._other(event):  # type: ignore[arg-type]
                    return
            if waiting:
                if await self._serve_next():
                    last_yield = 0.0  # a worker has work: let it run soon
                if waiting and not transport.readable_now():
                    continue
            if not waiting:
                self._flush()
            got = transport.receive_nowait()
            if got is None:
                if not waiting:
                    await transport.wait_readable()
                continue
            if not self._feed(*got):
                log.info("%s: VMM disconnected", self.vm.config.name)
                return
            now = time.perf_counter()
            if now - last_yield > YIELD_EVERY:
                await trio.lowlevel.checkpoint()
                last_yield = now

    async def _serve_next(self) -> bool:
        """Answer the first waiting call; True if it went to its vCPU's worker.

        A call its handler answers without waiting (``Handler.inline``) is
        answered here, unless its vCPU still has one in its worker; the rest go
        to that vCPU's worker, under the handler's timeout.  The reply to a vCPU
        served less than half as often as the busiest one waiting is written at
        once, not after the flooders' replies."""
        call, quiet = self._waiting.pop()
        v = call.vcpu
        vm = self.vm
        target = vm.route(call)
        if not self._busy[v] and (not isinstance(target, Handler) or target.inline):
            self._out.append(self.conn.send(await vm.dispatch(call, target)))  # never suspends
            if quiet:
                self._flush()
            return False
        try:
            self._queues[v].send_nowait(call)
        except trio.WouldBlock:
            raise wire.RemoteProtocolError(f"vCPU {v} has more than {VCPU_QUEUE} calls queued") from None
        self._busy[v] += 1
        self.in_flight += 1
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        return True

    def _other(self, event: wire.Event) -> bool:
        """Any frame but a CALL; False when the VMM said ERROR (the session ends)."""
        vm = self.vm
        if isinstance(event, (wire.MemReadResp, wire.MemWriteResp)):
            pending = self._pending.get(event.seq)
            if pending is not None:
                pending.result = event
                pending.done.set()
        elif isinstance(event, wire.EffectDone):
            vm.effect_done(event.seq, event.index, event.status)
        elif isinstance(event, wire.VmEvent):
            vm.event(event)
        elif isinstance(event, wire.MemoryMap):
            assert self.hello is not None
            limit = 1 << self.hello.ipa_bits
            beyond = next((r for r in event.regions if r.end > limit), None)
            if beyond is not None:
                raise wire.RemoteProtocolError(f"MEMORY_MAP region {beyond.gpa:#x}+{beyond.size:#x} is beyond the "
                                               f"{self.hello.ipa_bits}-bit IPA size of HELLO")
            vm.remap(event.regions)
        elif isinstance(event, wire.StateSave):
            assert self._nursery is not None
            self._nursery.start_soon(self.transfer.save, event.seq)
        elif isinstance(event, wire.StateData):
            data = self.transfer.load_chunk(event)
            if data is not None:
                assert self._nursery is not None
                self._nursery.start_soon(self.transfer.load, event.seq, data)
        elif isinstance(event, wire.Error):
            log.error("%s: VMM sent ERROR %s: %s", vm.config.name, event.code.name, event.reason)
            return False
        return True

    async def _vcpu_worker(self, vcpu: int, calls: trio.MemoryReceiveChannel[wire.Call]) -> None:
        dispatch = self.vm.dispatch
        async for call in calls:
            try:
                reply = await dispatch(call)
                self._out.append(self.conn.send(reply))
                self._flush()
            finally:
                self._busy[vcpu] -= 1
                self.in_flight -= 1
                if self.in_flight == 0:
                    self.idle.set()


def _close_fds(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        with suppress(OSError):
            os.close(fd)


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


__all__ = ["CLEANUP_TIMEOUT", "HANDSHAKE_TIMEOUT", "LinkStats", "Session"]
