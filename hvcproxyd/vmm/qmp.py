"""QEMU's own view of the VM, through QMP (qemu.qmp, asyncio, run under trio
via trio-asyncio).

Used for three things the call socket cannot tell us:

- a cross-check of the handshake's vCPU table against QEMU (``query-cpus-fast``
  plus ``qom-get <cpu> mp-affinity``), refused loudly on mismatch;
- lifecycle events (RESET, SHUTDOWN, STOP, RESUME), logged and counted for
  ``status``; handler state follows the ordered VM_RESET event on the call
  socket instead, since a QMP event can arrive after the new boot's first calls;
- the run state (``query-status``) for ``hvcproxyd status``.

QMP is optional and never on the call path: when its socket goes away the
daemon keeps serving calls and says so once.  QEMU serves QMP only from its
main loop, i.e. after machine init, while the call-socket handshake happens
*during* machine init, so the cross-check runs after the handshake, never
inside it (that would deadlock both sides).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any

import trio
import trio_asyncio
from qemu.qmp import EventListener, QMPClient, QMPError

from ..wire import Hello

log = logging.getLogger("hvcproxyd.qmp")

LIFECYCLE_EVENTS = ("RESET", "SHUTDOWN", "STOP", "RESUME")
RETRY_SECONDS = 1.0
POLL_SECONDS = 2.0
CHECK_TIMEOUT = 30.0


class QmpState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    DISCONNECTED = "disconnected"


def _aio(fn: Callable[..., Any]) -> Callable[..., Any]:
    return trio_asyncio.aio_as_trio(fn)  # type: ignore[no-any-return]


class _QuietWhileConnecting(logging.Filter):
    """qemu.qmp logs every refused connect at ERROR (and its traceback at DEBUG).
    While the watcher retries, its own warning, once, says what an operator needs."""

    def __init__(self, watcher: QmpWatcher) -> None:
        super().__init__()
        self.watcher = watcher

    def filter(self, record: logging.LogRecord) -> bool:
        return self.watcher.state is not QmpState.CONNECTING


class QmpWatcher:
    """Keeps a QMP connection to one VM's QEMU for as long as the daemon runs.

    ``run`` must be started inside ``trio_asyncio.open_loop()``.
    """

    def __init__(self, path: str, vm_name: str, on_event: Callable[[str, dict[str, Any]], None] | None = None
                 ) -> None:
        self.path = path
        self.vm_name = vm_name
        self.on_event = on_event
        self.state = QmpState.IDLE
        self.run_status: str | None = None
        self.events_seen = 0
        self._client: QMPClient | None = None
        self._connected = trio.Event()
        quiet = _QuietWhileConnecting(self)
        for part in ("protocol", "qmp_client"):  # the library's per-client loggers
            logging.getLogger(f"qemu.qmp.{part}.{self.client_name}").addFilter(quiet)

    @property
    def client_name(self) -> str:
        return f"hvcproxyd-{self.vm_name}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        warned = False
        while True:
            self.state = QmpState.CONNECTING
            client = QMPClient(self.client_name)
            try:
                await _aio(client.connect)(self.path)
            except (QMPError, OSError) as err:
                if not warned:
                    log.warning("%s: QMP socket %s not available (%s); serving calls without it, retrying",
                                self.vm_name, self.path, err)
                    warned = True
                self.state = QmpState.DISCONNECTED
                await trio.sleep(RETRY_SECONDS)
                continue
            warned = False
            self._client = client
            self.state = QmpState.RUNNING
            self._connected.set()
            log.info("%s: QMP connected at %s", self.vm_name, self.path)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._events, client, nursery.cancel_scope)
                    await self._poll(client)
                    nursery.cancel_scope.cancel()
            finally:
                self._client = None
                self._connected = trio.Event()
                self.state = QmpState.DISCONNECTED
                with trio.move_on_after(1, shield=True):
                    try:
                        await _aio(client.disconnect)()
                    except Exception:  # the connection is already gone; nothing to tidy
                        pass
            log.warning("%s: QMP connection lost; still serving calls, reconnecting", self.vm_name)
            await trio.sleep(RETRY_SECONDS)

    async def _poll(self, client: QMPClient) -> None:
        while True:
            try:
                status = await self.execute("query-status")
            except (QMPError, OSError) as err:
                log.debug("%s: query-status failed: %s", self.vm_name, err)
                return
            self.run_status = str(status.get("status"))
            await trio.sleep(POLL_SECONDS)

    async def _events(self, client: QMPClient, scope: trio.CancelScope) -> None:
        listener = EventListener(LIFECYCLE_EVENTS)
        client.register_listener(listener)
        try:
            while True:
                event = await _aio(listener.get)()
                name = str(event["event"])
                data = dict(event.get("data", {}))
                self.events_seen += 1
                log.info("%s: QEMU event %s %s", self.vm_name, name, data or "")
                if name in ("STOP", "RESUME"):
                    self.run_status = "paused" if name == "STOP" else "running"
                if self.on_event is not None:
                    self.on_event(name, data)
        finally:
            client.remove_listener(listener)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on our connection.  QEMU's QMP socket takes one client
        at a time, so whoever else in the daemon needs QMP goes through here."""
        client = self._client
        if client is None:
            raise QMPError("QMP is not connected")
        return await _aio(client.execute)(command, arguments)

    async def vcpu_table(self) -> dict[int, int]:
        """cpu-index -> MPIDR, as QEMU sees it."""
        table: dict[int, int] = {}
        for cpu in await self.execute("query-cpus-fast"):
            mpidr = await self.execute("qom-get", {"path": cpu["qom-path"], "property": "mp-affinity"})
            table[int(cpu["cpu-index"])] = int(mpidr)
        return table

    async def cross_check(self, hello: Hello) -> str | None:
        """Compare the handshake's vCPUs with QEMU's; a problem text, or None if they agree.
        Waits for QMP up to CHECK_TIMEOUT; if it never comes, says so and does not refuse."""
        with trio.move_on_after(CHECK_TIMEOUT):
            await self._connected.wait()
        if self._client is None:
            log.warning("%s: QMP unavailable; the handshake's vCPU table is not cross-checked", self.vm_name)
            return None
        try:
            qemu = await self.vcpu_table()
        except (QMPError, OSError, KeyError, ValueError) as err:
            log.warning("%s: cannot read QEMU's vCPU table over QMP: %s", self.vm_name, err)
            return None
        ours = {v.index: v.mpidr for v in hello.vcpus}
        if ours == qemu:
            log.info("%s: QMP confirms the VMM's %d vCPUs and their MPIDRs", self.vm_name, len(ours))
            return None
        diffs = [f"vCPU {i}: VMM says {_fmt(ours.get(i))}, QEMU says {_fmt(qemu.get(i))}"
                 for i in sorted(set(ours) | set(qemu)) if ours.get(i) != qemu.get(i)]
        return "the VMM's vCPU table disagrees with QEMU's QMP view: " + "; ".join(diffs[:4])


def _fmt(mpidr: int | None) -> str:
    return "no such vCPU" if mpidr is None else f"MPIDR {mpidr:#x}"
