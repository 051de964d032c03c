"""The trio daemon for one VM: listen on the VM's socket, serve one VMM session
at a time, run the sidecars, drain and stop in order, reload on request.

Shape (after trio servers): :meth:`Daemon.serve` starts the listener and
reports it through ``task_status``, then runs until :meth:`Daemon.stop`.  The
VMM listener is the same :class:`~hvcproxyd.unixsock.UnixListener` as every
other socket, served by ``trio.serve_listeners`` (which backs off on EMFILE).
What operations add (peer policy, reload and drain notifications) comes in as
explicit :class:`DaemonHooks`, never by subclassing.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio_asyncio

from .. import wire
from ..config import ConfigError
from ..core.service import ReloadRefused, SidecarChange, VmService
from ..core.sidecar import Sidecar
from ..core.vmconfig import VmConfig, load_config
from ..durable.store import Fsync, Journal, vm_dir
from ..errors import TransportError
from ..unixsock import UnixListener, peer_credentials
from ..vmm.qmp import QmpWatcher
from .session import CLEANUP_TIMEOUT, HANDSHAKE_TIMEOUT, LinkStats, Session
from .transport import Transport

log = logging.getLogger("hvcproxyd.daemon")

DRAIN_TIMEOUT = 10.0
#: How long a VMM whose HELLO arrived waits for the slot of a session that is
#: closing (its peer has gone) before it is told BUSY: that session's teardown
#: (cancelling its handlers, unmapping guest RAM) plus a margin.
SLOT_WAIT = CLEANUP_TIMEOUT + 1.0

#: (pid, uid, gid) -> None if the peer may act as the VMM, else why not.
PeerCheck = Callable[[int, int, int], str | None]


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What one reload attempt did; ``error`` says why it was refused."""

    path: Path
    old: VmConfig
    new: VmConfig | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class DaemonHooks:
    """The extension points of the daemon, all optional."""

    #: Who may connect as the VMM (SO_PEERCRED); None admits any peer the socket's mode lets in.
    peer_check: PeerCheck | None = None
    #: Before a reload starts (systemd: RELOADING=1).
    reloading: list[Callable[[], object]] = field(default_factory=list)
    #: After a reload was applied or refused.
    reloaded: list[Callable[[ReloadOutcome], object]] = field(default_factory=list)
    #: When SIGTERM starts the drain (systemd: STOPPING=1).
    draining: list[Callable[[], object]] = field(default_factory=list)


class Daemon:
    """Serves one VM: owns the listener, the VmService, the sidecars and the signals."""

    def __init__(self, config: VmConfig, hooks: DaemonHooks | None = None) -> None:
        self.config = config
        self.hooks = hooks or DaemonHooks()
        self.vm = VmService(config)
        #: The write-ahead journal, with a ``state:`` section; opened (and the state
        #: restored) when serving starts, so a bad directory fails the start.
        self.journal = (Journal(vm_dir(config.state.dir, config.name), self.vm, Fsync(config.state.fsync),
                                on_failure=lambda _err: self.stop()) if config.state is not None else None)
        self.session: Session | None = None
        self.draining = False
        #: QEMU's QMP view of this VM, when the config names its socket.
        self.qmp = QmpWatcher(str(config.qmp), config.name) if config.qmp else None
        self.links = LinkStats()
        self.reloads = 0
        self.reloads_refused = 0
        self._stop = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._sidecar_scopes: dict[int, trio.CancelScope] = {}
        #: Set whenever no session holds the VMM slot.
        self._slot_free = trio.Event()
        self._slot_free.set()

    # -- serving
    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        path = self.config.socket
        journal = self.journal
        if journal is not None:
            journal.open()  # before the socket exists: a VMM never meets a daemon that forgot
        try:
            await self._serve(path, task_status)
        finally:
            if journal is not None:
                journal.close()

    async def _serve(self, path: Path, task_status: trio.TaskStatus[Path]) -> None:
        async with UnixListener(path, 0o660, self.config.vmm.gid, "socket", "vmm.gid") as listener, \
                self._asyncio_loop(), trio.open_nursery() as nursery:
            self._nursery = nursery
            log.info("%s: listening on %s (%d rules, %d forwarded/denied ranges)", self.config.name, path,
                     len(self.config.rules), len(self.vm.filter))
            if self.qmp is not None:
                await nursery.start(self.qmp.run)
            if self.journal is not None:
                await nursery.start(self.journal.run)
            for sidecar in self.vm.all_sidecars():
                await self._start_sidecar(sidecar)
            nursery.start_soon(trio.serve_listeners, self._connection, [listener])
            task_status.started(path)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        self._nursery = None

    def _asyncio_loop(self) -> AbstractAsyncContextManager[object]:
        """qemu.qmp is asyncio: give every task of the daemon a trio-asyncio loop when QMP is used."""
        if self.qmp is None:
            return nullcontext()
        return trio_asyncio.open_loop()  # type: ignore[no-any-return]

    async def _start_sidecar(self, sidecar: Sidecar) -> None:
        """Each sidecar runs in a scope that a reload can end, so a sidecar never
        outlives the handler options it was made for."""
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._sidecar_scopes[id(sidecar)] = scope
        await self._nursery.start(self._run_sidecar, sidecar, scope)

    @staticmethod
    async def _run_sidecar(sidecar: Sidecar, scope: trio.CancelScope, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            try:
                await sidecar.run(task_status=task_status)
            except Exception:
                log.exception("sidecar %s of handler %s failed", type(sidecar).__name__, sidecar.handler.name)

    def _apply_sidecars(self, change: SidecarChange) -> None:
        for sidecar in change.stopped:
            scope = self._sidecar_scopes.pop(id(sidecar), None)
            if scope is not None:
                scope.cancel()
        if self._nursery is not None:
            for sidecar in change.started:
                self._nursery.start_soon(self._start_sidecar, sidecar)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One peer on the VM's socket.  Several may be handshaking at once (each
        under the handshake timeout); the VMM slot goes only to a peer that passed
        the credential check and sent a HELLO, so a silent connection cannot lock
        QEMU out."""
        transport = Transport(stream.socket, self.journal)
        name = self.config.name
        try:
            check = self.hooks.peer_check
            if check is not None:
                pid, uid, gid = peer_credentials(stream.socket)
                why = check(pid, uid, gid)
                if why:
                    self.links.refused_peers += 1
                    log.warning("%s: refused VMM pid %d uid %d gid %d: %s", name, pid, uid, gid, why)
                    return
            session = Session(self.vm, transport, links=self.links, qmp=self.qmp, draining=lambda: self.draining)
            if self.draining:
                await session.refuse(wire.ErrorCode.SHUTDOWN, "the daemon is shutting down")
                return
            try:
                await self._serve_session(session)
            finally:
                if self.session is session:
                    self.vm.detach()
                    self.session = None
                    self._slot_free.set()
        finally:
            transport.close()

    async def _claim_slot(self, session: Session) -> tuple[wire.ErrorCode, str] | None:
        """Give ``session`` (whose HELLO has arrived) the VMM slot, or say why not.
        A session whose reader has already seen its peer go is only tearing down:
        a VMM reconnecting after a clean close waits for it (bounded), never BUSY."""
        held = self.session
        if held is not None and held.closing.is_set():
            with trio.move_on_after(SLOT_WAIT):
                while self.session is not None and self.session.closing.is_set():
                    await self._slot_free.wait()
            held = self.session
        if self.draining:
            return wire.ErrorCode.SHUTDOWN, "the daemon is shutting down"
        if held is not None:
            return wire.ErrorCode.BUSY, "another VMM is connected to this VM's socket"
        self.session = session
        self._slot_free = trio.Event()
        self.links.accepted += 1
        return None

    async def _serve_session(self, session: Session) -> None:
        name = self.config.name
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                ok = await session.handshake(lambda: self._claim_slot(session))
            if scope.cancelled_caught:
                await session.refuse(wire.ErrorCode.PROTOCOL, f"no handshake within {HANDSHAKE_TIMEOUT:.0f}s")
                return
            if not ok:
                return
            await session.run()
        except wire.RemoteProtocolError as err:
            self.links.protocol_errors += 1
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

    async def stopped(self) -> None:
        """Wait until :meth:`stop` (or a finished drain) asks the daemon to end."""
        await self._stop.wait()

    async def drain_and_stop(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """SIGTERM: stop taking calls, finish those in flight, say goodbye, exit."""
        for hook in self.hooks.draining:
            hook()
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

    async def reload(self, path: Path | None = None) -> bool:
        """SIGHUP: re-read the config in a worker thread (compiling a large rule table
        must not stall the vCPUs) and apply it if valid and live-compatible; the
        swap itself is one synchronous step on the event loop."""
        for before in self.hooks.reloading:
            before()
        old = self.config
        path = path or old.path
        new: VmConfig | None = None
        error: str | None
        try:
            new = await trio.to_thread.run_sync(lambda: load_config(path, socket=str(old.socket)))
        except ConfigError as err:
            error = f"{path} has errors:\n{err}"
        except Exception as err:
            # Any file must load or raise ConfigError; anything else is a bug of ours,
            # which must cost this reload, never the running daemon.
            log.exception("%s: internal error loading %s", old.name, path)
            error = (f"{path}: internal error in hvcproxyd while loading it (a bug; the log has the traceback): "
                     f"{type(err).__name__}: {err}")
        else:
            try:
                self._apply_sidecars(self.vm.reload(new))
            except ReloadRefused as err:
                error = str(err)
            except Exception as err:
                # A handler or sidecar plugin failed to start on the new config; the
                # VM service builds the new set before it swaps, so the old one runs on.
                log.exception("%s: internal error applying %s", old.name, path)
                error = (f"{path}: a handler or sidecar failed to start on it (the log has the traceback): "
                         f"{type(err).__name__}: {err}")
            else:
                error = None
        if error is None and new is not None:
            self.config = new
            self.reloads += 1
            if self.journal is not None:
                self.journal.compact_soon()
            log.info("%s: reloaded %s (%d handlers, %d rules)", new.name, path, len(new.handlers), len(new.rules))
            if self.session is not None:
                self.session.reloaded()
        else:
            self.reloads_refused += 1
            log.error("%s: reload refused, keeping the running config: %s", old.name, error)
        outcome = ReloadOutcome(path, old, new if error is None else None, error)
        for after in self.hooks.reloaded:
            after(outcome)
        return error is None

    async def handle_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                else:
                    log.info("%s: %s received", self.config.name, signal.Signals(signum).name)
                    await self.drain_and_stop()
                    return

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve with signal handling until SIGTERM/SIGINT or :meth:`stop`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.handle_signals)
            await nursery.start(self.serve)
            task_status.started(self)
            await self._stop.wait()
            nursery.cancel_scope.cancel()


__all__ = ["DRAIN_TIMEOUT", "SLOT_WAIT", "Daemon", "DaemonHooks", "PeerCheck", "ReloadOutcome"]
