"""Sidecars: the daemon-side companions of a handler instance.

A handler stays ``(state, call) -> Result`` and never serves a socket; what it
wants the world to hear about (a ledger change, a snapshot after a restore) it
returns as *notes*.  A sidecar consumes those notes and does the I/O: an event
stream for local subscribers, audit plugins, exports.  Sidecars are plugins in
the entry-point group ``hvcproxyd.sidecars``, named by the handler class's
``SIDECARS``; the daemon runs each one in its own task for as long as the
handler's config is unchanged, and a misbehaving sidecar never costs the guest
a call.
"""

from __future__ import annotations

from typing import Any

import trio

from ..config.diagnostics import Section
from ..plugins import load_plugin
from .handler import Handler, VmContext

ENTRY_POINT_GROUP = "hvcproxyd.sidecars"


class Sidecar:
    """Base class.  ``consume`` runs synchronously on the call path, after the reply
    is built: it must be quick and never block (queue, then write in ``run``)."""

    def __init__(self, handler: Handler, vm: VmContext) -> None:
        self.handler = handler
        self.vm = vm
        self.log = vm.log.getChild(f"{handler.name}.{type(self).__name__}")

    @classmethod
    def check(cls, options: Any, section: Section) -> None:
        """Validate what this sidecar takes from its handler's options, at config load."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (the daemon stops, or a reload changes the handler's
        options).  Call ``task_status.started()`` once ready."""
        task_status.started()

    def rebind(self, handler: Handler) -> None:
        """A reload kept the handler's options but built a new instance (its state
        carried over); consume the new one's notes from now on."""
        self.handler = handler

    def consume(self, note: object) -> None:
        """One note the handler returned (from a call or a lifecycle hook)."""

    def report(self) -> dict[str, Any]:
        """Plain data for ``status`` and /metrics."""
        return {}


def load_sidecar_class(name: str) -> type[Sidecar]:
    """An entry-point name, or ``package.module:Class``; LookupError with a reason."""
    return load_plugin(ENTRY_POINT_GROUP, name, Sidecar, "sidecar")


__all__ = ["ENTRY_POINT_GROUP", "Sidecar", "load_sidecar_class"]
