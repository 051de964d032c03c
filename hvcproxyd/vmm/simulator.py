"""A VMM in Python: the VMM half of docs/protocol.md, for tests, the demo and
benchmarks.

It models what matters to the daemon: N vCPUs with MPIDRs and power states, a
memfd-backed RAM region it can pass by fd or serve through MEM_READ/MEM_WRITE,
the filter from WELCOME applied as TCG would, effects carried out (a powered-on
vCPU runs the program registered for its entry address with x0 = context ID),
reconnects with call replay, and a transcript tests can assert against.

A vCPU's program is an ``async def prog(cpu: SimVcpu, x0: int)``.

Most users call :meth:`Simulator.run`.  Tests that speak the protocol frame by
frame use the public low-level API instead: :meth:`Simulator.connect` (connect
and handshake), :meth:`Simulator.send` (one frame), :meth:`Simulator.next_event`
(the next frame from the daemon) and :meth:`Simulator.close`.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import mmap
import os
import socket as stdsocket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .. import wire
from ..smccc import MASK64, SmcccResult, routing_id
from ..unixsock import fds_ancdata

log = logging.getLogger("hvcproxyd.simulator")

Program = Callable[["SimVcpu", int], Awaitable[None]]
RAM_BASE = 0x4000_0000


class PoweredOff(Exception):
    """Unwinds a vCPU program when its vCPU stops (CPU_OFF, suspend, system off)."""


class DaemonRefused(Exception):
    """The daemon answered the handshake with ERROR; ``code`` says which (None for
    a filter the simulator itself failed).  BUSY and SHUTDOWN are retried until
    the reconnect timeout, as QEMU does: the slot frees, a restarted daemon listens."""

    def __init__(self, message: str, code: wire.ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


#: ERROR codes of a daemon that is restarting or whose slot is still held: worth a retry.
RETRIED = (wire.ErrorCode.BUSY, wire.ErrorCode.SHUTDOWN)


class SystemStopped(Exception):
    """The whole simulated machine stopped (SYSTEM_OFF / SYSTEM_RESET)."""


def default_mpidr(index: int) -> int:
    # QEMU virt's layout: clusters of 8 (Aff1 = index / 8, Aff0 = index % 8).
    return ((index // 8) << 8) | (index % 8)


@dataclass(slots=True)
class TranscriptEntry:
    kind: str  # "call", "local", "effect", "print", "start", "stop", "system", "reconnect"
    vcpu: int
    data: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        items = " ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v}"
                         for k, v in self.data.items())
        return f"vcpu{self.vcpu} {self.kind} {items}"


class SimVcpu:
    """What a program sees: its index, MPIDR, and ``call``."""

    def __init__(self, sim: Simulator, index: int) -> None:
        self.sim = sim
        self.index = index
        self.mpidr = default_mpidr(index)
        self.powered_on = False
        self.aarch32 = False
        self.el = 1
        #: SGIs and PPIs the daemon made pending (INTERRUPT), bit n for INTID n.
        self.pending_irqs = 0

    async def call(self, func_id: int, *args: int, smc: bool | None = None) -> tuple[int, ...]:
        """Issue an HVC/SMC and return x0..xN as unsigned 64-bit values."""
        return await self.sim._call(self, func_id, args, self.sim.conduit_smc if smc is None else smc)

    def print(self, text: str) -> None:
        self.sim._record("print", self.index, text=text)


class Simulator:
    def __init__(self, socket_path: str | os.PathLike[str], *, n_vcpus: int = 4, name: str = "sim",
                 ram_size: int = 16 << 20, ipa_bits: int = 40, pass_memfd: bool = True,
                 conduit_smc: bool = False, accel: wire.Accel = wire.Accel.TCG,
                 programs: dict[int, Program] | None = None, boot: Program | None = None,
                 reconnect_timeout: float = 10.0, call_timeout: float = 30.0,
                 filter_status: int = 0, on_reset: str = "stop", seal_memfd: bool = True,
                 effects: frozenset[wire.EffectKind] = frozenset(wire.EffectKind),
                 interrupts: bool = True) -> None:
        """``seal_memfd`` seals the RAM memfd against shrinking and growing, as QEMU's
        memory-backend-memfd does by default (seal=on); without it the daemon must
        not map it.  ``effects``: what HELLO says the VMM carries out (the simulator
        does every kind; QEMU all but SYSTEM_SUSPEND).  ``interrupts``: HELLO offers
        INTERRUPT, whose frames become "interrupt" transcript entries and set bits
        of the vCPU's ``pending_irqs`` (the simulator has no GIC to take them)."""
        self.socket_path = str(socket_path)
        self.name = name
        self.ipa_bits = ipa_bits
        self.pass_memfd = pass_memfd
        self.conduit_smc = conduit_smc
        self.accel = accel
        self.programs = programs or {}
        self.boot = boot
        self.reconnect_timeout = reconnect_timeout
        self.call_timeout = call_timeout
        self.filter_status = filter_status
        self.on_reset = on_reset
        self.effects = effects
        self.interrupts = interrupts
        self.vcpus = [SimVcpu(self, i) for i in range(n_vcpus)]
        self.ram_fd = os.memfd_create(f"{name}-ram", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.ram_fd, ram_size)
        if seal_memfd:
            fcntl.fcntl(self.ram_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.ram = mmap.mmap(self.ram_fd, ram_size)
        self.ram_size = ram_size
        self.transcript: list[TranscriptEntry] = []
        self.on_record: Callable[[TranscriptEntry], None] | None = None
        self.ranges: tuple[wire.FilterRange, ...] = ()
        self.resets = 0
        self.welcome: wire.Welcome | None = None
        self._seq = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list[wire.Reply], wire.Call]] = {}
        #: seq -> the connection (its number) a waiting call was last sent on: a
        #: call goes once to each connection, by the replay or by its vCPU, never both.
        self._sent_on: dict[int, int] = {}
        self._link = 0
        self._sock: trio.socket.SocketType | None = None
        self._conn: wire.Connection | None = None
        self._ran = False
        self._connected = trio.Event()
        self._send_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._vcpu_scopes: dict[int, trio.CancelScope] = {}
        self._stopped = trio.Event()
        self._programs_running = 0
        self._programs_done = trio.Event()
        self.stop_reason: str | None = None
        #: The daemon's last MIGRATION_BLOCKER text ("": none, as at the handshake).
        self.migration_blocker = ""
        self._transfer: tuple[int, trio.Event, bytearray, list[wire.StateStatus]] | None = None
        self.vcpus[0].powered_on = True

    # -- transcript
    def _record(self, what: str, vcpu: int, **data: Any) -> None:
        entry = TranscriptEntry(what, vcpu, data)
        self.transcript.append(entry)
        if self.on_record is not None:
            self.on_record(entry)

    def entries(self, kind: str) -> list[TranscriptEntry]:
        return [e for e in self.transcript if e.kind == kind]

    # -- connection
    def hello(self, reconnect: bool) -> wire.Hello:
        return wire.Hello(
            self.name, self.accel, self.ipa_bits,
            tuple(wire.VcpuInfo(v.index, v.mpidr, v.powered_on, v.aarch32) for v in self.vcpus),
            (wire.RamRegion(RAM_BASE, self.ram_size, 0, 0 if self.pass_memfd else -1),),
            (wire.FEATURE_MEMFD if self.pass_memfd else 0) | wire.FEATURE_EFFECT_DONE
            | (wire.FEATURE_INTERRUPT if self.interrupts else 0),
            reconnect, self.ranges if reconnect else (),
            wire.PsciConduit.SMC if self.conduit_smc else wire.PsciConduit.HVC,
            effects=sum(1 << kind for kind in self.effects), fds=(self.ram_fd,) if self.pass_memfd else ())

    async def connect(self, reconnect: bool = False) -> wire.Welcome:
        """Connect to the daemon and run the handshake (HELLO, WELCOME, FILTER_STATUS).

        Transport failures are retried until ``reconnect_timeout`` (a daemon that is
        restarting may accept and then drop us); a daemon's ERROR frame is final and
        raises :class:`DaemonRefused`, as does a nonzero ``filter_status``.
        ``reconnect=True`` sends HELLO(RECONNECT) with :attr:`ranges` as the filter
        in force and replays every call still waiting for a reply.

        :meth:`run` calls this itself; call it directly to drive the protocol frame
        by frame with :meth:`send` and :meth:`next_event`.  Returns the WELCOME."""
        await self._connect(reconnect)
        assert self.welcome is not None
        return self.welcome

    async def _connect(self, reconnect: bool) -> None:
        deadline = trio.current_time() + self.reconnect_timeout
        while True:
            try:
                await self._connect_once(reconnect)
                return
            except (OSError, wire.RemoteProtocolError, DaemonRefused) as err:
                if self._sock is not None:
                    self._sock.close()
                if isinstance(err, DaemonRefused) and err.code not in RETRIED:
                    raise
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.05)

    async def _connect_once(self, reconnect: bool) -> None:
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        self._sock = sock
        await sock.connect(self.socket_path)
        conn = wire.Connection(wire.Role.VMM)
        hello = self.hello(reconnect)
        data = conn.send(hello)
        fds = list(hello.fds)
        await sock.sendmsg([data], fds_ancdata(fds))
        self._sock, self._conn = sock, conn
        welcome = await self.next_event()
        if isinstance(welcome, wire.Error):
            raise DaemonRefused(f"daemon refused: {welcome.code.name}: {welcome.reason}", welcome.code)
        if welcome is None:
            raise ConnectionResetError("daemon closed the connection during the handshake")
        if not isinstance(welcome, wire.Welcome):
            raise wire.RemoteProtocolError(f"expected WELCOME, got {welcome!r}")
        self.welcome = welcome
        if not reconnect:
            self.ranges = welcome.ranges
        await self.send(wire.FilterStatus(self.filter_status, 0 if self.filter_status else wire.NO_INDEX))
        if self.filter_status:
            err = await self.next_event()
            raise DaemonRefused(f"daemon refused: {err}")
        self._ran = True
        self._link += 1
        if reconnect:
            self._record("reconnect", 0)
            for _seq, (_ev, _box, call) in sorted(self._waiting.items()):
                await self._send_call(call)  # replay with the same seq (protocol §5)
        self._connected.set()

    async def _send_call(self, call: wire.Call) -> None:
        """Send ``call`` unless this connection has it already."""
        if self._sent_on.get(call.seq) == self._link:
            return
        self._sent_on[call.seq] = self._link
        try:
            await self.send(call)
        except (OSError, wire.ProtocolError):
            pass  # the connection is gone: the reader reconnects and replays everything still waiting

    async def send(self, event: wire.Event, fds: list[int] | None = None) -> None:
        """Encode ``event`` as one frame and send it, as the VMM's next frame, with
        ``fds`` attached (SCM_RIGHTS) if given.

        The codec checks only what a frame may carry, not whether the daemon will
        like it (a CALL for a vCPU the VM does not have is sent as it is, fds are
        attached to any frame), so tests can provoke the daemon's protocol errors.
        Needs :meth:`connect` first."""
        if self._conn is None or self._sock is None:
            raise RuntimeError("Simulator.send: not connected (call connect() first)")
        data = self._conn.send(event)
        async with self._send_lock:
            view = memoryview(data)
            if fds:
                n = await self._sock.sendmsg([view], fds_ancdata(fds))
                view = view[n:]
            while view:
                n = await self._sock.send(view)
                view = view[n:]

    async def next_event(self) -> wire.Event | None:
        """The next frame from the daemon, decoded; None once the daemon has closed
        the connection.  Needs :meth:`connect` first, and must not be used while
        :meth:`run` is reading the same connection.  No timeout of its own: wrap
        it in ``trio.fail_after``."""
        if self._conn is None or self._sock is None:
            raise RuntimeError("Simulator.next_event: not connected (call connect() first)")
        while True:
            ev = self._conn.next_event()
            if ev is not wire.NEED_DATA:
                return ev  # type: ignore[return-value]
            data = await self._sock.recv(1 << 17)
            self._conn.receive_data(data)
            if not data:
                return None

    async def _reader(self) -> None:
        while True:
            try:
                ev = await self.next_event()
            except (OSError, wire.ProtocolError) as err:
                log.info("simulator: connection lost: %s", err)
                ev = None
            if ev is None or isinstance(ev, wire.Error):
                if isinstance(ev, wire.Error):
                    self._record("daemon-error", 0, code=ev.code.name, reason=ev.reason)
                self._connected = trio.Event()
                if self._sock is not None:
                    self._sock.close()
                await self._connect(reconnect=self._ran)
                continue
            if isinstance(ev, wire.Reply):
                waiter = self._waiting.pop(ev.seq, None)
                if waiter is None:
                    self._record("stray-reply", ev.vcpu, seq=ev.seq, regs=ev.regs)
                else:
                    waiter[1].append(ev)
                    waiter[0].set()
            elif isinstance(ev, wire.MemRead):
                if ev.gpa >= RAM_BASE and ev.gpa + ev.length <= RAM_BASE + self.ram_size:
                    off = ev.gpa - RAM_BASE
                    await self.send(wire.MemReadResp(ev.seq, 0, self.ram[off:off + ev.length]))
                else:
                    await self.send(wire.MemReadResp(ev.seq, -14))  # EFAULT
            elif isinstance(ev, wire.Interrupt):
                self.vcpus[ev.vcpu].pending_irqs |= 1 << ev.intid
                self._record("interrupt", ev.vcpu, intid=ev.intid)
            elif isinstance(ev, wire.MigrationBlocker):
                self.migration_blocker = ev.reason
                self._record("migration-blocker", 0, reason=ev.reason)
            elif isinstance(ev, (wire.StateData, wire.StateStatus)) and self._transfer is not None:
                _seq, done, data, status = self._transfer
                if isinstance(ev, wire.StateData):
                    data += ev.data
                else:
                    status.append(ev)
                if isinstance(ev, wire.StateStatus) or ev.last:
                    done.set()
            elif isinstance(ev, wire.MemWrite):
                if ev.gpa >= RAM_BASE and ev.gpa + len(ev.data) <= RAM_BASE + self.ram_size:
                    off = ev.gpa - RAM_BASE
                    self.ram[off:off + len(ev.data)] = ev.data
                    await self.send(wire.MemWriteResp(ev.seq, 0))
                else:
                    await self.send(wire.MemWriteResp(ev.seq, -14))

    # -- state transfer, as QEMU's forwarder does it at migration (protocol v2)
    async def save_state(self) -> bytes:
        """The daemon's state document (STATE_SAVE); raises DaemonRefused with the
        daemon's reason if it will not give it.  Needs :meth:`run` reading."""
        seq = next(self._seq)
        done, data, status = trio.Event(), bytearray(), list[wire.StateStatus]()
        self._transfer = (seq, done, data, status)
        try:
            await self.send(wire.StateSave(seq))
            await done.wait()
        finally:
            self._transfer = None
        if status:
            raise DaemonRefused(f"state save refused: {status[0].reason}")
        return bytes(data)

    async def load_state(self, document: bytes) -> None:
        """Hand the daemon a state document (STATE_DATA chunks), as a migration's
        destination does before its vCPUs run; raises DaemonRefused with the
        daemon's reason if it refuses it."""
        seq = next(self._seq)
        done, status = trio.Event(), list[wire.StateStatus]()
        self._transfer = (seq, done, bytearray(), status)
        try:
            chunk = wire.MAX_MEM_CHUNK
            last = max(0, (len(document) - 1) // chunk)
            for i in range(last + 1):
                await self.send(wire.StateData(seq, document[i * chunk:(i + 1) * chunk], last=i == last))
            await done.wait()
        finally:
            self._transfer = None
        if status[0].status:
            raise DaemonRefused(f"state load refused: {status[0].reason}")

    # -- calls, as the VMM's vCPU thread would make them
    def _filter_action(self, func_id: int) -> wire.FilterAction:
        fid = routing_id(func_id)
        for r in self.ranges:
            if r.base <= fid <= r.last:
                return r.action
        return wire.FilterAction.HANDLE

    async def _call(self, cpu: SimVcpu, func_id: int, args: tuple[int, ...], smc: bool) -> tuple[int, ...]:
        if not cpu.powered_on:
            raise PoweredOff(cpu.index)
        action = self._filter_action(func_id)
        if action is not wire.FilterAction.FORWARD:
            # DENY, and HANDLE with no in-kernel service to ask: NOT_SUPPORTED, as stock TCG answers.
            regs = (SmcccResult.NOT_SUPPORTED & MASK64, 0, 0, 0)
            self._record("local", cpu.index, func=func_id, action=action.name, x0=regs[0])
            return regs
        padded = tuple(a & MASK64 for a in args) + (0,) * (wire.N_ARGS - len(args))
        flags = (wire.CALL_SMC if smc else 0) | (wire.CALL_AARCH32 if cpu.aarch32 else 0) | (cpu.el << 4)
        call = wire.Call(next(self._seq), cpu.index, func_id, padded, flags)
        done = trio.Event()
        box: list[wire.Reply] = []
        self._waiting[call.seq] = (done, box, call)
        await self._connected.wait()
        await self._send_call(call)
        with trio.fail_after(self.call_timeout):
            await done.wait()
        self._sent_on.pop(call.seq, None)
        reply = box[0]
        self._record("call", cpu.index, func=func_id, args=args, regs=reply.regs,
                     effects=[e.kind.name for e in reply.effects])
        for i, effect in enumerate(reply.effects):
            await self._apply(cpu, reply, i, effect)
        return reply.regs

    async def _apply(self, cpu: SimVcpu, reply: wire.Reply, index: int, e: wire.Effect) -> None:
        self._record("effect", cpu.index, kind=e.kind.name, target=e.vcpu, entry=e.entry, context=e.context,
                     arg=e.arg)
        kind = wire.EffectKind
        if e.kind is kind.CPU_ON:
            target = self.vcpus[e.vcpu]
            target.powered_on = True
            target.aarch32 = not e.eflags & wire.EFFECT_AARCH64
            self._start(target, e.entry, e.context)
            await self._confirm(reply.seq, index)
        elif e.kind is kind.CPU_OFF:
            cpu.powered_on = False
            await self._confirm(reply.seq, index)
            raise PoweredOff(cpu.index)
        elif e.kind is kind.CPU_STANDBY:
            await self._confirm(reply.seq, index)  # no interrupt model: a spurious wake-up, at once
        elif e.kind in (kind.CPU_SUSPEND, kind.SYSTEM_SUSPEND):
            # Wake at once (no interrupt model): resume at the entry point with the context.
            await self._confirm(reply.seq, index)
            self._start(cpu, e.entry, e.context, restart=True)
            raise PoweredOff(cpu.index)
        elif e.kind is kind.SYSTEM_OFF:
            self._finish("system-off")
            raise SystemStopped("system off")
        elif e.kind is kind.SYSTEM_RESET:
            self.resets += 1
            self._record("system", cpu.index, event="reset", type=e.arg, cookie=e.context)
            if self.on_reset == "stop":
                self._finish("system-reset")
                raise SystemStopped("system reset")
            await self._reboot()
            raise PoweredOff(cpu.index)

    async def _confirm(self, seq: int, index: int) -> None:
        try:
            await self.send(wire.EffectDone(seq, index, 0))
        except (OSError, wire.ProtocolError):
            pass  # the connection is gone: the next HELLO says how the vCPUs are

    def _start(self, cpu: SimVcpu, entry: int, context: int, restart: bool = False) -> None:
        program = self.programs.get(entry)
        self._record("start", cpu.index, entry=entry, x0=context)
        if program is None:
            cpu.print(f"no program at entry {entry:#x}; vCPU idles")
            return
        self._spawn(cpu, program, context)

    def _spawn(self, cpu: SimVcpu, program: Program, x0: int) -> None:
        """Run ``program`` on ``cpu``; counted from now, so the machine is never
        idle between starting a program and its first step."""
        assert self._nursery is not None
        self._programs_running += 1
        self._nursery.start_soon(self._run_vcpu, cpu, program, x0)

    async def _run_vcpu(self, cpu: SimVcpu, program: Program, x0: int) -> None:
        try:
            with trio.CancelScope() as scope:
                self._vcpu_scopes[cpu.index] = scope
                try:
                    await program(cpu, x0)
                except (PoweredOff, SystemStopped):
                    pass
        finally:
            self._programs_running -= 1
            if self._programs_running == 0:
                self._programs_done.set()

    async def _reboot(self) -> None:
        for i, scope in list(self._vcpu_scopes.items()):
            if i != 0:
                scope.cancel()
        for v in self.vcpus:
            v.powered_on = v.index == 0
        await self.send(wire.VmEvent(wire.EventKind.VM_RESET))
        if self.boot is not None:
            self._spawn(self.vcpus[0], self.boot, 0)

    def _finish(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self._record("stop", 0, reason=reason)
        self._stopped.set()

    # -- running
    async def run(self, timeout: float = 60.0) -> str:
        """Connect, run the boot program on vCPU 0, and return why the machine stopped
        ("system-off", "system-reset", or "idle" when every program ended)."""
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._connect(reconnect=False)
                nursery.start_soon(self._reader)
                async with trio.open_nursery() as programs:
                    self._nursery = programs
                    if self.boot is not None:
                        self._spawn(self.vcpus[0], self.boot, 0)
                    programs.start_soon(self._wait_stop, programs.cancel_scope)
                    await self._until_idle()
                nursery.cancel_scope.cancel()
        if self._sock is not None:
            with trio.move_on_after(1):
                try:
                    await self.send(wire.VmEvent(wire.EventKind.VM_SHUTDOWN))
                except (OSError, wire.ProtocolError):
                    pass
            self._sock.close()
        return self.stop_reason or "idle"

    async def _wait_stop(self, scope: trio.CancelScope) -> None:
        await self._stopped.wait()
        scope.cancel()

    async def _until_idle(self) -> None:
        # Every program ended: the machine is idle.
        if self._programs_running:
            await self._programs_done.wait()
        self._finish("idle")

    def close(self) -> None:
        """Close the connection (if any) and release the RAM; idempotent."""
        if self._sock is not None:
            self._sock.close()
        if not self.ram.closed:
            self.ram.close()
            os.close(self.ram_fd)


def socket_ready(path: str | Path) -> bool:
    return Path(path).is_socket()


__all__ = ["RAM_BASE", "RETRIED", "DaemonRefused", "PoweredOff", "SimVcpu", "Simulator", "SystemStopped",
           "default_mpidr"]
