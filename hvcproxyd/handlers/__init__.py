"""The handler plugin API.

A handler is a class registered under the entry-point group
``hvcproxyd.handlers``; the built-ins are registered the same way in
pyproject.toml, so a third-party plugin takes exactly the path they do.

A handler sees a :class:`~hvcproxyd.wire.Call` and its :class:`VmContext`
(guest memory, the vCPU table, pinned versions) and returns a :class:`Result`:
registers plus effects.  It never touches the VMM or the socket; see
docs/handlers.md for the contract.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from ..plugins import installed, load_plugin
from ..smccc import MASK64, SmcccResult
from ..wire import Call, Effect, EffectKind, VcpuInfo, VmEvent

if TYPE_CHECKING:
    from ..config import Section
    from ..guestmem import GuestMemory

__all__ = [
    "Call",
    "Effect",
    "EffectKind",
    "Handler",
    "Result",
    "VmContext",
    "available_handlers",
    "load_handler_class",
]

ENTRY_POINT_GROUP = "hvcproxyd.handlers"


@dataclass(frozen=True, slots=True)
class Result:
    """What a handler returns: x0.. and the effects the VMM must carry out."""

    regs: tuple[int, ...]
    effects: tuple[Effect, ...] = ()

    @classmethod
    def of(cls, *values: int, effects: tuple[Effect, ...] = ()) -> Result:
        """Registers from ints (negatives become two's complement), padded to x0..x3,
        the SMCCC 1.0/1.1 result set."""
        regs = tuple(v & MASK64 for v in values)
        if len(regs) < 4:
            regs += (0,) * (4 - len(regs))
        return cls(regs, effects)


NOT_SUPPORTED = Result.of(SmcccResult.NOT_SUPPORTED)


@dataclass(slots=True)
class VmContext:
    """What a handler may know about its VM.  Filled in at the VMM's handshake and
    kept across reconnects; ``attached`` is False until the first VMM arrives."""

    name: str
    versions: dict[str, str]
    log: logging.Logger
    vcpus: tuple[VcpuInfo, ...] = ()
    memory: GuestMemory | None = None
    accel: str = "tcg"
    attached: bool = False
    #: The VMM sends EFFECT_DONE; without it, effect_done() is never called and a
    #: handler must infer completion (e.g. from the target's first call).
    confirms_effects: bool = False
    #: Every handler instance of this VM by name, for services one handler offers
    #: another in-process (e.g. the memshare ledger's "is this range shared?").
    handlers: dict[str, Handler] = field(default_factory=dict)
    _by_mpidr: dict[int, int] = field(default_factory=dict)

    def set_vcpus(self, vcpus: tuple[VcpuInfo, ...]) -> None:
        self.vcpus = tuple(sorted(vcpus, key=lambda v: v.index))
        self._by_mpidr = {v.mpidr: v.index for v in self.vcpus}

    def vcpu_by_mpidr(self, mpidr: int) -> int | None:
        return self._by_mpidr.get(mpidr)


class Handler:
    """Base class: every hook has a safe default, so a plugin overrides only what it needs.

    Class attributes a plugin may set:

    - ``SERVICES``: service name -> versions it can provide, checked against the
      VM's pinned ``versions`` before the daemon starts.
    - ``ANSWERS_DISCOVERY``: it answers call-count/UID/revision queries, so it
      may own a whole vendor or trusted-OS range.
    """

    SERVICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    ANSWERS_DISCOVERY: ClassVar[bool] = False

    def __init__(self, name: str, options: Any, vm: VmContext) -> None:
        self.name = name
        self.options = options
        self.vm = vm
        self.log = vm.log.getChild(name)

    @classmethod
    def parse_options(cls, section: Section) -> Any:
        """Validate this handler's ``options:``; report problems through ``section``."""
        section.allow_keys(())
        return None

    @classmethod
    def provided_versions(cls, options: Any, service: str) -> tuple[str, ...]:
        return cls.SERVICES.get(service, ())

    async def handle(self, call: Call) -> Result:
        return NOT_SUPPORTED

    def failure(self, call: Call) -> Result:
        """What the guest gets when this handler raises or times out: the service's
        own error (SMCCC: NOT_SUPPORTED; PSCI overrides with INTERNAL_FAILURE)."""
        return NOT_SUPPORTED

    # -- lifecycle hooks, all optional
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work for as long as this instance serves (its own sockets,
        timers).  Started by the daemon before the VMM socket listens, and
        cancelled when the daemon stops or a reload replaces the instance."""
        task_status.started()

    def attach(self, reconnect: bool) -> None:
        """A VMM completed the handshake; ``vm.vcpus`` and ``vm.memory`` are current.
        ``reconnect`` is the VMM's word that the VM has already run: keep the state
        you have (or rebuild it from the VMM's view if you have none, e.g. after a
        daemon restart).  On a fresh boot, start from the VMM's view."""

    def effect_done(self, effect: Effect, status: int) -> None:
        """The VMM confirmed (status 0) or failed an effect this handler returned."""

    def event(self, event: VmEvent) -> None:
        """A VM lifecycle event: vCPU reset, VM reset, shutdown, power change."""

    def snapshot(self) -> dict[str, Any]:
        """Guest-visible state as plain data, for restart and migration."""
        return {}

    def restore(self, data: dict[str, Any]) -> None:
        """Inverse of :meth:`snapshot`."""


def available_handlers() -> list[str]:
    return installed(ENTRY_POINT_GROUP)


def load_handler_class(type_name: str) -> type[Handler]:
    """An entry-point name, or ``package.module:Class`` for a handler under
    development that is not packaged yet.  Raises LookupError with a reason."""
    return load_plugin(ENTRY_POINT_GROUP, type_name, Handler, "handler type")
