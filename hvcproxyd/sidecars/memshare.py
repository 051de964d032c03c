"""The memshare handler's sidecar: the subscriber stream (a snapshot, then one
JSON line per change; docs/handlers/pkvm-memshare.md) and in-process
subscriber plugins (entry points in ``hvcproxyd.memshare_subscribers``).

It consumes the handler's notes: a :class:`~hvcproxyd.handlers.pkvm_memshare.ledger.Change`
per transition, and the :class:`~hvcproxyd.handlers.pkvm_memshare.ledger.Ledger`
itself when the handler replaced it (restore), which resynchronises everyone.
Times are stamped here, at publication: the handler has no clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trio

from ..config.diagnostics import Section
from ..core.handler import Handler, VmContext
from ..core.sidecar import Sidecar
from ..errors import HvcproxydError
from ..handlers.pkvm_memshare.handler import MemshareHandler, MemshareOptions, default_socket
from ..handlers.pkvm_memshare.ledger import Change, Ledger, SnapshotView
from ..plugins import load_plugin
from .eventstream import EventStream

SUBSCRIBER_GROUP = "hvcproxyd.memshare_subscribers"


class LedgerSubscriber:
    """Base for in-process subscribers, registered under the entry-point group
    ``hvcproxyd.memshare_subscribers`` and named in the handler's ``subscribers``
    option.  Called synchronously on the guest's call path: keep it quick and
    never block (hand slow work to a thread or a queue of your own)."""

    def __init__(self, vm: VmContext, handler: str) -> None:
        self.vm = vm
        self.log = vm.log.getChild(f"{handler}.subscriber")

    def on_snapshot(self, ledger: Ledger) -> None:
        """The ledger as a whole: once at start and again whenever it is replaced (restore)."""

    def on_change(self, change: Change) -> None:
        """One share, unshare or reset, after the ledger applied it."""


class LogSubscriber(LedgerSubscriber):
    """Logs every change: the simplest audit trail, and an example plugin."""

    def on_change(self, change: Change) -> None:
        self.log.info("%s vcpu %d ipa %#x size %#x -> %#x bytes shared", change.op, change.vcpu, change.ipa,
                      change.size, change.shared)


def load_subscriber(name: str) -> type[LedgerSubscriber]:
    """An entry-point name, or ``package.module:Class`` for one not packaged yet."""
    return load_plugin(SUBSCRIBER_GROUP, name, LedgerSubscriber, "memshare subscriber")


class MemshareSidecar(Sidecar):
    """Publishes a memshare handler's ledger to its subscribers."""

    def __init__(self, handler: Handler, vm: VmContext) -> None:
        super().__init__(handler, vm)
        assert isinstance(handler, MemshareHandler)
        self._memshare = handler
        opts: MemshareOptions = handler.opts
        self.socket_path = opts.socket or default_socket(vm.name)
        self.stream = (EventStream(self.socket_path, self._snapshot, queue_limit=opts.subscriber_queue,
                                   max_subscribers=opts.max_subscribers, coalesce_s=opts.subscriber_flush_ms / 1000,
                                   name=f"{vm.name} memshare")
                       if opts.stream else None)
        self.plugins = [load_subscriber(n)(vm, handler.name) for n in opts.subscribers]
        for plugin in self.plugins:
            self._notify(plugin.on_snapshot, handler.ledger)

    @classmethod
    def check(cls, options: Any, section: Section) -> None:
        if not isinstance(options, MemshareOptions):
            return
        for name in options.subscribers:
            try:
                load_subscriber(name)
            except LookupError as err:
                section.problem("subscribers", str(err))

    def rebind(self, handler: Handler) -> None:
        assert isinstance(handler, MemshareHandler)
        super().rebind(handler)
        self._memshare = handler
        # The new instance holds the same state (restored from the old one); anyone
        # who missed nothing still gets a fresh snapshot, which is always safe.
        self.consume(handler.ledger)

    # -- notes from the call path
    def consume(self, note: object) -> None:
        if isinstance(note, Change):
            stream = self.stream
            if stream is not None and stream.subscribers:
                stream.publish(note.json_line(time.time()))
            for plugin in self.plugins:
                self._notify(plugin.on_change, note)
        elif isinstance(note, Ledger):
            if self.stream is not None:
                self.stream.publish(self._snapshot())
            for plugin in self.plugins:
                self._notify(plugin.on_snapshot, note)

    def _notify(self, hook: Callable[[Any], None], arg: Any) -> None:
        try:
            hook(arg)
        except Exception:
            self.log.exception("memshare subscriber %s failed", type(getattr(hook, "__self__", hook)).__name__)

    def _snapshot(self) -> SnapshotView:
        return self._memshare.ledger.view(self.vm.name, time.time())

    # -- the socket side
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.stream is None:
            task_status.started()
            return
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(self.stream.serve)
            except (HvcproxydError, OSError) as err:
                # The guest is served regardless; only the subscribers go without.
                self.log.error("no memshare subscribers: %s", err)
                task_status.started()
                return
            self.log.info("memshare subscribers: %s", self.socket_path)
            task_status.started()

    def report(self) -> dict[str, Any]:
        if self.stream is None:
            return {"stream": None, "plugins": len(self.plugins)}
        st = self.stream.stats
        return {"stream": str(self.socket_path), "subscribers": len(self.stream.subscribers),
                "connected": st.connected, "refused": st.refused, "stalled": st.stalled, "resyncs": st.resyncs,
                "lost": st.lost,
                "plugins": len(self.plugins)}


__all__ = ["LedgerSubscriber", "LogSubscriber", "MemshareSidecar", "load_subscriber"]
