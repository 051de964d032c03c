"""The ``tee-lifecycle`` sidecar: tells the TEE that the VM came or went.

VM_CREATED and VM_DESTROYED are backend I/O, and a handler's lifecycle hooks
are synchronous and own no task.  So :meth:`TeeProxyHandler.attach` and
``event`` only queue what is due and return a :data:`~.handler.WAKE` note;
this sidecar, in its own task, then runs the handler's ``settle()``.  A guest
call that comes first settles the queue itself (same lock, same order), so the
TEE always hears VM_CREATED before the VM's first call.
"""

from __future__ import annotations

import trio

from ...core.handler import Handler, VmContext
from ...core.sidecar import Sidecar
from .handler import TeeProxyHandler, Wake

#: The most a settle may take here; a backend that does not answer is retried at the next wake or call.
SETTLE_TIMEOUT = 5.0


class LifecycleSidecar(Sidecar):
    def __init__(self, handler: Handler, vm: VmContext) -> None:
        super().__init__(handler, vm)
        self._wake = trio.Event()
        self._retired: list[Handler] = []

    def consume(self, note: object) -> None:
        if isinstance(note, Wake):
            self._wake.set()

    def rebind(self, handler: Handler) -> None:
        """A reload built a new instance; the old one's backend connection is closed."""
        if handler is not self.handler:
            self._retired.append(self.handler)
        super().rebind(handler)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            with trio.move_on_after(SETTLE_TIMEOUT):
                current = self.handler
                while self._retired:
                    old = self._retired.pop()
                    if isinstance(old, TeeProxyHandler) and isinstance(current, TeeProxyHandler) \
                            and old.backend is not current.backend:
                        await old.backend.close()
                if isinstance(self.handler, TeeProxyHandler):
                    try:
                        await self.handler.settle()
                    except Exception:
                        self.log.exception("sending VM lifecycle to the TEE failed")


__all__ = ["LifecycleSidecar"]
