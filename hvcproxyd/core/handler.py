"""The handler plugin API: what a handler is given and what it gives back.

A handler is a class registered under the entry-point group
``hvcproxyd.handlers``; the built-ins are registered the same way in
pyproject.toml, so a third-party plugin takes exactly the path they do.

A handler is ``(state, call) -> Result``: it sees a :class:`~hvcproxyd.wire.Call`
and a read-only :class:`VmContext` (guest memory, the vCPU table, pinned
versions, the other handlers' published interfaces) and returns registers,
effects for the VMM, and *notes* for the daemon's sidecars (an event stream,
audit subscribers).  It owns no socket, task or clock; docs/handlers.md
spells out the contract.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..config.diagnostics import Section
from ..plugins import installed, load_plugin
from ..smccc import MASK64, SmcccResult
from ..wire import EFFECTS_UNDECLARED, Call, Effect, EffectKind, FilterRange, VcpuInfo, VmEvent
from .guestmem import GuestMemory

ENTRY_POINT_GROUP = "hvcproxyd.handlers"
#: A handler's notes: plain objects its sidecars understand (e.g. a ledger change).
Notes = tuple[object, ...]
Iface = TypeVar("Iface")


@dataclass(frozen=True, slots=True)
class Result:
    """What a handler returns: x0.., the effects the VMM must carry out, and notes
    for the sidecars (never seen by the guest or the VMM)."""

    regs: tuple[int, ...]
    effects: tuple[Effect, ...] = ()
    notes: Notes = ()

    @classmethod
    def of(cls, *values: int, effects: tuple[Effect, ...] = (), notes: Notes = ()) -> Result:
        """Registers from ints (negatives become two's complement), padded to x0..x3,
        the SMCCC 1.0/1.1 result set."""
        regs = tuple(v & MASK64 for v in values)
        if len(regs) < 4:
            regs += (0,) * (4 - len(regs))
        return cls(regs, effects, notes)


NOT_SUPPORTED = Result.of(SmcccResult.NOT_SUPPORTED)


class VmFacts:
    """The VM as the VM service keeps it; handlers read it through :class:`VmContext`."""

    __slots__ = ("accel", "attached", "by_mpidr", "confirms_effects", "executable", "filter", "highest_el",
                 "interfaces", "interrupts", "memory", "name", "peers", "performs", "touched", "vcpus", "versions")

    def __init__(self, name: str, versions: Mapping[str, str]) -> None:
        self.name = name
        self.versions: Mapping[str, str] = dict(versions)
        self.vcpus: tuple[VcpuInfo, ...] = ()
        self.by_mpidr: dict[int, int] = {}
        self.memory: GuestMemory | None = None
        #: (start, end) of every region a vCPU can execute: RAM, ROM and flash.
        self.executable: tuple[tuple[int, int], ...] = ()
        #: The ranges the VMM forwards or denies (the config's filter, fixed once the VM ran).
        self.filter: tuple[FilterRange, ...] = ()
        self.accel = "tcg"
        self.highest_el = 1
        self.attached = False
        self.confirms_effects = False
        self.performs: frozenset[EffectKind] = EFFECTS_UNDECLARED
        #: Sends INTERRUPT (vcpu, intid) to the VMM; None while no VMM that offers it is attached.
        self.interrupts: Callable[[int, int], None] | None = None
        self.peers: Mapping[str, Handler] = {}
        self.interfaces: Mapping[type, object] = {}
        #: Peers a handler reached through :meth:`VmContext.peer` during the call in
        #: progress: the journal looks at their state too (a delegated call changes it).
        self.touched: set[str] = set()

    def set_vcpus(self, vcpus: tuple[VcpuInfo, ...]) -> None:
        self.vcpus = tuple(sorted(vcpus, key=lambda v: v.index))
        self.by_mpidr = {v.mpidr: v.index for v in self.vcpus}


class VmContext:
    """What a handler may know about its VM: a read-only view, current at every
    call.  Filled in at the VMM's handshake and kept across reconnects;
    ``attached`` is False until the first VMM arrives."""

    __slots__ = ("_facts", "log")

    def __init__(self, facts: VmFacts, log: logging.Logger) -> None:
        self._facts = facts
        self.log = log

    @property
    def name(self) -> str:
        return self._facts.name

    @property
    def versions(self) -> Mapping[str, str]:
        """Service -> pinned version (``versions:`` in the config)."""
        return self._facts.versions

    @property
    def vcpus(self) -> tuple[VcpuInfo, ...]:
        return self._facts.vcpus

    @property
    def memory(self) -> GuestMemory | None:
        """Guest RAM, bounds-checked; None while no VMM is attached."""
        return self._facts.memory

    @property
    def accel(self) -> str:
        return self._facts.accel

    @property
    def highest_el(self) -> int:
        """The highest non-secure exception level the vCPUs implement: 2 when the
        VMM says EL2 exists (HELLO flag EL2), else 1."""
        return self._facts.highest_el

    @property
    def attached(self) -> bool:
        return self._facts.attached

    @property
    def confirms_effects(self) -> bool:
        """The VMM sends EFFECT_DONE; without it, effect_done() is never called and a
        handler must infer completion (e.g. from the target's first call)."""
        return self._facts.confirms_effects

    def executable(self, addr: int, size: int = 4) -> bool:
        """Whether ``size`` bytes at ``addr`` lie in memory a vCPU can execute: guest
        RAM, or ROM and flash (a firmware or kernel there), which the handler
        cannot read but a vCPU may start in."""
        return any(lo <= addr and addr + size <= hi for lo, hi in self._facts.executable)

    def left_to_kvm(self, func_id: int) -> bool:
        """Whether the config leaves ``func_id`` to the hypervisor (no filter range
        forwards or denies it): under KVM the kernel answers it, under TCG QEMU."""
        return not any(r.base <= func_id <= r.last for r in self._facts.filter)

    def vmm_performs(self, kind: EffectKind) -> bool:
        """Whether the VMM carries out effects of this kind (HELLO's ``effects``):
        a handler offers the guest only what will work (QEMU has no SYSTEM_SUSPEND)."""
        return kind in self._facts.performs

    @property
    def raises_interrupts(self) -> bool:
        """Whether the attached VMM makes SGIs and PPIs pending on request (HELLO's
        INTERRUPT feature): a handler offers its guest an interrupt only then."""
        return self._facts.interrupts is not None

    def raise_interrupt(self, vcpu: int, intid: int) -> bool:
        """Make SGI or PPI ``intid`` (0..31) pending on ``vcpu``, inside a call or not
        (the VMM does it soon after, not at a defined point of the call).  False when
        no VMM that can is attached: the interrupt is lost, so a handler that keeps
        the reason pending raises it again at :meth:`Handler.attach`."""
        send = self._facts.interrupts
        if send is None or not 0 <= vcpu < len(self._facts.vcpus):
            return False
        send(vcpu, intid)
        return True

    def vcpu_by_mpidr(self, mpidr: int) -> int | None:
        return self._facts.by_mpidr.get(mpidr)

    # -- in-process cooperation, through an explicit registry
    def peer(self, name: str) -> Handler | None:
        """Another handler instance of this VM, by its name in the config; for a
        handler that is configured to pass some calls on (e.g. memshare's ``delegate``)."""
        found = self._facts.peers.get(name)
        if found is not None:
            self._facts.touched.add(name)
        return found

    def interface(self, kind: type[Iface]) -> Iface | None:
        """The object some handler of this VM publishes as ``kind`` (see
        :meth:`Handler.interfaces`), e.g. the memshare ledger's "is this shared?"."""
        found = self._facts.interfaces.get(kind)
        return found if isinstance(found, kind) else None


class Handler:
    """Base class: every hook has a safe default, so a plugin overrides only what it needs.

    Class attributes a plugin may set:

    - ``SERVICES``: service name -> versions it can provide, checked against the
      VM's pinned ``versions`` before the daemon starts.
    - ``ANSWERS_DISCOVERY``: it answers call-count/UID/revision queries, so it
      may own a whole vendor or trusted-OS range.
    - ``SIDECARS``: sidecar plugins (entry points in ``hvcproxyd.sidecars``) the
      daemon runs beside each instance, fed with the instance's notes.
    - ``PER_CALL_WARNING``: a warning ``check`` prints for every rule using it
      (the ``log`` handler writes a line per call).
    """

    SERVICES: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: True when ``handle`` never suspends (no guest memory through the VMM, no
    #: I/O, no sleep): the daemon then answers the call in its reader, with no
    #: task switch and no timeout scope (which could not fire on a call that
    #: never suspends).  An instance may set it from its options.
    inline: bool = False
    ANSWERS_DISCOVERY: ClassVar[bool] = False
    #: True when :meth:`take_delta`/:meth:`apply_delta` carry this handler's changes
    #: to the durable journal; otherwise the journal writes the whole
    #: :meth:`snapshot` whenever it differs from the last one written (fine for a
    #: small state such as PSCI's, not for a ledger of millions of ranges).
    JOURNAL_DELTAS: ClassVar[bool] = False
    SIDECARS: ClassVar[tuple[str, ...]] = ()
    PER_CALL_WARNING: ClassVar[str | None] = None

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

    # -- what this instance offers besides calls
    def interfaces(self) -> Mapping[type, object]:
        """Objects other handlers of the VM may look up with :meth:`VmContext.interface`."""
        return {}

    def report(self) -> dict[str, Any]:
        """Plain data for ``status`` and /metrics: what this instance holds (PSCI's
        power states, memshare's ledger counters).  Read outside the call path."""
        return {}

    # -- lifecycle hooks, all optional; each may return notes for the sidecars
    def attach(self, reconnect: bool) -> Notes:
        """A VMM completed the handshake; ``vm.vcpus`` and ``vm.memory`` are current.
        ``reconnect`` is the VMM's word that the VM has already run: keep the state
        you have (or rebuild it from the VMM's view if you have none, e.g. after a
        daemon restart).  On a fresh boot, start from the VMM's view."""
        return ()

    def effect_done(self, effect: Effect, status: int) -> Notes:
        """The VMM confirmed (status 0) or failed an effect this handler returned."""
        return ()

    def event(self, event: VmEvent) -> Notes:
        """A VM lifecycle event: vCPU reset, VM reset, shutdown, power change."""
        return ()

    def snapshot(self) -> dict[str, Any]:
        """Guest-visible state as plain data, for restart and migration."""
        return {}

    def frozen_snapshot(self) -> Callable[[], dict[str, Any]]:
        """:meth:`snapshot` in two steps: the state is captured when this returns, and
        the function returned builds the snapshot of it later, in a thread (a
        compaction, a migration), while calls go on changing the live state.  What
        it returns must be its own (the caller takes it apart when done).  The
        default takes the snapshot now and copies it then; a handler whose state is
        large captures it in O(small), such as a copy-on-write copy, and leaves the
        walk to the function."""
        snap = self.snapshot()
        return lambda: copy.deepcopy(snap)

    def restore(self, data: dict[str, Any]) -> Notes:
        """Inverse of :meth:`snapshot`.  ``data`` may come from a damaged file: raise
        ValueError, changing nothing, for anything this handler's snapshot() did not write."""
        return ()

    def take_delta(self) -> Any:
        """With ``JOURNAL_DELTAS``: plain data (JSON) for every change since the last
        call of this method, or None when nothing changed, which must be cheap: it
        runs after every call this handler answers."""
        return None

    def apply_delta(self, delta: Any) -> Notes:
        """Redo a :meth:`take_delta` record on top of the state it followed (daemon
        start-up, replaying the journal).  Raise ValueError for a record this
        handler's take_delta() did not write."""
        raise ValueError(f"{type(self).__name__} journals no deltas")

    def guest_abi(self) -> dict[str, Any]:
        """What the guest has seen from this instance and relies on (a service's
        version, an endpoint ID), as plain data: a migration or state import into
        an instance whose ``guest_abi()`` differs is refused, naming the keys."""
        return {}

    def migration_blocker(self) -> str | None:
        """Why this instance's state cannot move with the VM now (it lives in a
        backend outside the daemon), or None.  The VMM registers it as a
        migration blocker, so ``migrate`` and ``savevm`` refuse with this text."""
        return None

    def adopt(self, previous: Handler) -> Notes:
        """Take over the state of ``previous``, an instance of the same class that
        this one replaces on a reload.  The default goes through :meth:`snapshot`
        and :meth:`restore`; a handler whose state is large overrides it to share
        or cheaply copy its structures instead of walking them on the event loop.
        ``previous`` must be left intact: a reload refused later keeps it running."""
        return self.restore(previous.snapshot())


def available_handlers() -> list[str]:
    return installed(ENTRY_POINT_GROUP)


def load_handler_class(type_name: str) -> type[Handler]:
    """An entry-point name, or ``package.module:Class`` for a handler under
    development that is not packaged yet.  Raises LookupError with a reason."""
    return load_plugin(ENTRY_POINT_GROUP, type_name, Handler, "handler type")


__all__ = ["ENTRY_POINT_GROUP", "NOT_SUPPORTED", "Handler", "Notes", "Result", "VmContext", "VmFacts",
           "available_handlers", "load_handler_class"]
