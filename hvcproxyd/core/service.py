"""One VM's service: handler instances, the bound rule table, dispatch, replays,
notes to sidecars, and the VM's stats.

This outlives any one VMM connection (a reconnect keeps handler state) and
knows nothing about sockets; the server layer feeds it calls and carries its
replies, and runs the sidecars it names.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ..rules.table import RuleTable
from ..rules.targets import Deny, LeaveToKvm, Target, ToHandler
from ..smccc import routing_id
from ..wire import (
    CALL_SMC,
    FEATURE_EFFECT_DONE,
    Call,
    Effect,
    EffectKind,
    EventKind,
    Hello,
    ProtocolError,
    RamRegion,
    RemoteProtocolError,
    Reply,
    VmEvent,
    reply_to,
)
from . import state
from .guestmem import GuestMemory
from .handler import NOT_SUPPORTED, Handler, Notes, Result, VmContext, VmFacts
from .sidecar import Sidecar, load_sidecar_class
from .stats import CallStats
from .vmconfig import VmConfig

log = logging.getLogger("hvcproxyd.vm")

#: Observer signature: (call, reply, handler name or "deny"/"kvm"/"none", seconds spent).
Observer = Callable[[Call, Reply, str, float], None]
#: What answers a call once names are bound to instances.
Bound = Handler | Deny | LeaveToKvm
#: Effects remembered for their EFFECT_DONE; older ones are forgotten first.
MAX_PENDING_EFFECTS = 4096


class StateSink(Protocol):
    """Where the service writes each guest-visible change (hvcproxyd.durable's
    journal).  ``append`` takes one record and must not suspend; the sink makes
    every reply that leaves after it wait until it is durable."""

    def append(self, record: dict[str, Any]) -> None: ...


class _Unrouted(enum.Enum):
    """dispatch()'s \"look the target up yourself\" (None already means \"no rule\")."""

    UNROUTED = enum.auto()


_UNROUTED = _Unrouted.UNROUTED


class ReloadRefused(Exception):
    """A new config cannot be applied live; the running one stays."""


@dataclass(slots=True)
class SidecarChange:
    """What a reload asks the server to do with sidecar tasks."""

    started: list[Sidecar] = field(default_factory=list)
    stopped: list[Sidecar] = field(default_factory=list)


class VmService:
    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.facts = VmFacts(config.name, config.versions)
        self.ctx = VmContext(self.facts, logging.getLogger(f"hvcproxyd.{config.name}"))
        self.instances = self._instantiate(config, {})
        self._publish_registry()
        self.table: RuleTable[Bound] = self._bind(config, self.instances)
        self.filter = config.table.filter_ranges()
        self.facts.filter = self.filter
        self.timeouts = {name: spec.timeout_s for name, spec in config.handlers.items()}
        self.sidecars: dict[str, list[Sidecar]] = {name: self._make_sidecars(inst)
                                                   for name, inst in self.instances.items()}
        self._last_reply: dict[int, Reply] = {}
        #: The journal, when the state is durable; see :meth:`_changes`.
        self.sink: StateSink | None = None
        #: The snapshot last journaled of each handler without JOURNAL_DELTAS.
        self._written: dict[str, dict[str, Any]] = {}
        self._effects: OrderedDict[int, tuple[str, tuple[Effect, ...]]] = OrderedDict()
        #: Per-call views (trace, per-call logging): attached only while someone wants them.
        self.observers: list[Observer] = []
        self.stats = CallStats()
        #: The VMM's own word on each vCPU's power (HELLO, VCPU_POWER, VM_RESET, and
        #: EFFECT_DONE of a power effect), for status when no handler holds power state.
        self.vmm_power: dict[int, bool] = {}
        self.started = time.time()

    # -- construction and reload
    def _instantiate(self, config: VmConfig, old: dict[str, Handler]) -> dict[str, Handler]:
        out: dict[str, Handler] = {}
        for name, spec in config.handlers.items():
            inst: Handler = spec.cls(name, spec.options, self.ctx)
            out[name] = inst
        for name, inst in out.items():
            prev = old.get(name)
            if prev is not None and type(prev) is type(inst):
                inst.adopt(prev)  # the old sidecars are rebound or replaced below
        return out

    def _publish_registry(self) -> None:
        self.facts.peers = dict(self.instances)
        interfaces: dict[type, object] = {}
        for inst in self.instances.values():
            interfaces.update(inst.interfaces())
        self.facts.interfaces = interfaces

    @staticmethod
    def _bind(config: VmConfig, instances: dict[str, Handler]) -> RuleTable[Bound]:
        def bind(target: Target) -> Bound:
            return instances[target.name] if isinstance(target, ToHandler) else target
        return config.table.map(bind)

    def _make_sidecars(self, inst: Handler) -> list[Sidecar]:
        return [load_sidecar_class(name)(inst, self.ctx) for name in type(inst).SIDECARS]

    def reload(self, config: VmConfig) -> SidecarChange:
        """Apply a validated config live, or raise ReloadRefused and change nothing."""
        new_filter = config.table.filter_ranges()
        if new_filter != self.filter:
            raise ReloadRefused("it changes the forwarded/denied ranges, which KVM fixes once the VM has run; "
                                "restart the VM to apply it")
        if config.name != self.config.name:
            raise ReloadRefused(f"it renames the VM ({self.config.name!r} -> {config.name!r})")
        if config.socket != self.config.socket:
            raise ReloadRefused("it moves the VMM socket, which the running VMM is connected to")
        # Build everything new before touching anything running, so a failure here
        # (a plugin's constructor, a snapshot it refuses) leaves the old service whole.
        old_specs = self.config.handlers
        instances = self._instantiate(config, self.instances)
        for inst in instances.values():
            if inst.JOURNAL_DELTAS:
                inst.take_delta()  # adopting the old state is no change to journal
        change = SidecarChange()
        sidecars: dict[str, list[Sidecar]] = {}
        rebound: list[tuple[Sidecar, Handler]] = []
        for name, inst in instances.items():
            old = self.sidecars.get(name, [])
            old_spec = old_specs.get(name)
            same = (old_spec is not None and old_spec.cls is config.handlers[name].cls
                    and old_spec.options == config.handlers[name].options)
            if same and old:
                rebound.extend((sidecar, inst) for sidecar in old)
                sidecars[name] = old
            else:
                change.stopped.extend(old)
                sidecars[name] = self._make_sidecars(inst)
                change.started.extend(sidecars[name])
        for name, old in self.sidecars.items():
            if name not in instances:
                change.stopped.extend(old)
        for sidecar, inst in rebound:
            sidecar.rebind(inst)
        self.table = self._bind(config, instances)
        self.instances = instances
        self.sidecars = sidecars
        self._publish_registry()
        self.timeouts = {name: spec.timeout_s for name, spec in config.handlers.items()}
        self.config = config
        self.facts.versions = dict(config.versions)
        if self.facts.attached:
            for name, inst in instances.items():
                self._notes(name, inst.attach(reconnect=True))
        self._journal_all()
        return change

    def all_sidecars(self) -> list[Sidecar]:
        return [s for group in self.sidecars.values() for s in group]

    # -- notes to sidecars
    def _notes(self, name: str, notes: Iterable[object]) -> None:
        for sidecar in self.sidecars.get(name, ()):
            for note in notes:
                try:
                    sidecar.consume(note)
                except Exception:
                    log.exception("%s: sidecar %s of handler %s failed on a note", self.config.name,
                                  type(sidecar).__name__, name)

    def _each_handler(self, hook: Callable[[Handler], Notes], what: str) -> None:
        for name, inst in self.instances.items():
            try:
                notes = hook(inst)
            except Exception:
                log.exception("handler %s failed on %s", name, what)
                continue
            if notes:
                self._notes(name, notes)

    # -- VMM lifecycle
    def attach(self, hello: Hello, memory: GuestMemory,
               interrupts: Callable[[int, int], None] | None = None) -> None:
        """The VMM's handshake ended; ``interrupts`` sends it INTERRUPT frames, when
        it offered them."""
        facts = self.facts
        if facts.memory is not None and facts.memory is not memory:
            facts.memory.close()
        facts.set_vcpus(hello.vcpus)
        facts.memory = memory
        facts.accel = hello.accel.name.lower()
        facts.highest_el = 2 if hello.el2 else 1
        facts.confirms_effects = bool(hello.features & FEATURE_EFFECT_DONE)
        facts.performs = hello.performs
        facts.interrupts = interrupts
        facts.executable = tuple((r.gpa, r.end) for r in hello.regions)
        self.vmm_power = {v.index: v.powered_on for v in hello.vcpus}
        if not hello.reconnect:
            self._last_reply.clear()  # a fresh VM process numbers its calls anew
            self._effects.clear()
        facts.attached = True
        self._each_handler(lambda inst: inst.attach(reconnect=hello.reconnect), "attach")
        self._journal_all(fresh=not hello.reconnect)

    def remap(self, regions: tuple[RamRegion, ...]) -> None:
        """The VMM's RAM and ROM map changed (memory hotplug): guest memory and what
        is executable follow it."""
        facts = self.facts
        before = {(r.gpa, r.end) for r in facts.memory.regions} if facts.memory is not None else set()
        ram = tuple(r for r in regions if not r.rom)
        if facts.memory is not None:
            facts.memory.remap(ram)
        facts.executable = tuple((r.gpa, r.end) for r in regions)
        after = {(r.gpa, r.end) for r in ram}
        log.info("%s: guest RAM map changed: %s", self.config.name, "; ".join(
            [f"+{lo:#x}..{hi - 1:#x}" for lo, hi in sorted(after - before)]
            + [f"-{lo:#x}..{hi - 1:#x}" for lo, hi in sorted(before - after)]) or "no RAM change")

    def detach(self) -> None:
        """The VMM went away; state stays for its reconnect, memory access and
        interrupts do not."""
        self.facts.interrupts = None
        if self.facts.memory is not None:
            self.facts.memory.close()
            self.facts.memory = None

    def event(self, ev: VmEvent) -> None:
        log.info("%s: VMM event %s vcpu=%s", self.config.name, ev.kind.name,
                 "all" if ev.vcpu == 0xFFFF_FFFF else ev.vcpu)
        if ev.kind is EventKind.VM_RESET:
            self._effects.clear()
            boot = {v.index for v in self.facts.vcpus if v.powered_on}
            self.vmm_power = {i: i in boot for i in self.vmm_power}
        elif ev.kind is EventKind.VCPU_POWER and ev.vcpu in self.vmm_power:
            self.vmm_power[ev.vcpu] = bool(ev.arg)
        self._each_handler(lambda inst: inst.event(ev), f"event {ev.kind.name}")
        self._journal_all()

    def effect_done(self, seq: int, index: int, status: int) -> None:
        pending = self._effects.get(seq)
        if pending is None:
            return
        name, effects = pending
        if not 0 <= index < len(effects):
            return
        effect = effects[index]
        if status == 0 and effect.kind in (EffectKind.CPU_ON, EffectKind.CPU_OFF) and effect.vcpu in self.vmm_power:
            self.vmm_power[effect.vcpu] = effect.kind is EffectKind.CPU_ON  # the VMM says it did it
        handler = self.instances.get(name)  # after a reload, the instance now serving that name
        if handler is None:
            return
        try:
            notes = handler.effect_done(effect, status)
        except Exception:
            log.exception("handler %s failed on effect confirmation", handler.name)
            return
        self._notes(name, notes)
        self._journal_all()

    def snapshot(self) -> dict[str, Any]:
        return {name: inst.snapshot() for name, inst in self.instances.items()}

    # -- the whole state, for migration, savevm/loadvm and offline export
    def state_document(self) -> dict[str, Any]:
        return self.frozen_state_document()()

    def frozen_state_document(self) -> Callable[[], dict[str, Any]]:
        """The state as it is now, built when the function is called (in a thread)."""
        return state.frozen_document(self.config, self.instances)

    def load_state(self, doc: dict[str, Any]) -> None:
        """Adopt a state document (from :func:`state.decode`) as this VM's, all or
        nothing; raises StateError naming every way its guest ABI differs from this
        VM's, or the handler that refused its part."""
        self._check_fits(doc, "the guest would see a different machine")
        state.restore_all(self.instances, doc["handlers"], self._notes)
        self._last_reply.clear()  # the source's vCPUs numbered their calls on another connection
        self._effects.clear()
        self._journal_all(fresh=True)

    def _check_fits(self, doc: dict[str, Any], what: str) -> None:
        """StateError naming every way ``doc`` is not this VM's machine."""
        differences = state.abi_differences(doc["abi"], state.guest_abi(self.config, self.instances))
        if doc["vm"] != self.config.name:
            differences.insert(0, f"it is VM {doc['vm']!r}'s state, this is {self.config.name!r}")
        if differences:
            raise state.StateError(f"{what}: " + "; ".join(differences))

    # -- durable state: the journal's records (hvcproxyd.durable writes and reads them)
    def durable_document(self) -> dict[str, Any]:
        """:meth:`state_document` plus the replay window (each vCPU's last journaled
        reply), which a restart must keep and a migration must not carry."""
        return self.frozen_durable_document()()

    def frozen_durable_document(self) -> Callable[[], dict[str, Any]]:
        """:meth:`durable_document` as it is now, built when the function is called."""
        build = self.frozen_state_document()
        replay = {str(v): _reply_data(r) for v, r in sorted(self._last_reply.items())}
        return lambda: {**build(), "replay": replay}

    def resume(self, doc: dict[str, Any] | None, records: Iterable[dict[str, Any]]) -> None:
        """Daemon start-up: adopt the compacted ``doc`` (from :func:`state.decode`, or
        None for none yet) and redo the journal's ``records`` after it, replay
        window included.  Raises StateError, naming the record, for state this
        config cannot take; then nothing may be served from it."""
        if doc is not None:
            self._check_fits(doc, "the saved state is of a different machine")
            state.restore_all(self.instances, doc["handlers"], self._notes)
            self._last_reply = _replies(doc.get("replay", {}))
        for n, record in enumerate(records, 1):
            try:
                self._redo(record)
            except (ValueError, TypeError, KeyError) as err:
                raise state.StateError(f"journal record {n} cannot be applied: {err}") from err
        for inst in self.instances.values():
            if inst.JOURNAL_DELTAS:
                inst.take_delta()  # what the journal already says
        self._written = {name: inst.snapshot() for name, inst in self.instances.items() if not inst.JOURNAL_DELTAS}

    def _redo(self, record: dict[str, Any]) -> None:
        if record.get("fresh"):
            self._last_reply.clear()
        for name, change in record.get("h", {}).items():
            inst = self.instances.get(name)
            if inst is None:
                raise ValueError(f"it changes handler {name!r}, which this config does not have")
            self._notes(name, inst.restore(change["s"]) if "s" in change else inst.apply_delta(change["d"]))
        if "v" in record:
            self._last_reply[record["v"]] = _reply_of(record["v"], record["q"], record["r"], record["e"])

    def _changes(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """What changed in these handlers since the journal last looked: a delta
        where the handler keeps them, else the snapshot when it differs."""
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            inst = self.instances[name]
            if inst.JOURNAL_DELTAS:
                delta = inst.take_delta()
                if delta is not None:
                    out[name] = {"d": delta}
                continue
            snap = inst.snapshot()
            if snap != self._written.get(name):
                self._written[name] = snap
                out[name] = {"s": snap}
        return out

    def _journal_all(self, *, fresh: bool = False) -> None:
        """Journal whatever a lifecycle hook changed; ``fresh``: the whole state
        replaces what came before, replay window included (a new VM process, a
        migrated-in state)."""
        sink = self.sink
        if sink is None:
            return
        if fresh:
            for inst in self.instances.values():
                if inst.JOURNAL_DELTAS:
                    inst.take_delta()
            self._written = {}
            changes = {name: {"s": inst.snapshot()} for name, inst in self.instances.items()}
            sink.append({"fresh": 1, "h": changes})
            self._written = {name: change["s"] for name, change in changes.items()
                             if not self.instances[name].JOURNAL_DELTAS}
            return
        changes = self._changes(self.instances)
        if changes:
            sink.append({"h": changes})

    def migration_blockers(self) -> list[str]:
        """Each handler's reason its state cannot move with the VM now."""
        return [reason for inst in self.instances.values() if (reason := inst.migration_blocker())]

    def reports(self) -> dict[str, dict[str, Any]]:
        """Each handler's and sidecar's own report, for status and /metrics."""
        out: dict[str, dict[str, Any]] = {}
        for name, inst in self.instances.items():
            report = dict(inst.report())
            for sidecar in self.sidecars.get(name, ()):
                extra = sidecar.report()
                if extra:
                    report[type(sidecar).__name__] = extra
            out[name] = report
        return out

    # -- the hot path
    def route(self, call: Call) -> Bound | None:
        """What answers ``call`` now (None: no rule)."""
        return self.table.lookup(routing_id(call.func_id), call.flags & CALL_SMC, call.vcpu)

    async def dispatch(self, call: Call, target: Bound | _Unrouted | None = _UNROUTED) -> Reply:
        """Answer one call (``target``: what :meth:`route` just said, to look it up once).

        For a handler with ``inline`` set this never suspends, so a caller may
        run it without a task of its own; any other handler runs under its
        timeout."""
        last = self._last_reply.get(call.vcpu)
        if last is not None and call.seq <= last.seq:
            if call.seq < last.seq:
                # Protocol §5: seqs only increase for the VM process's life.  An older
                # one is not a replay the daemon can answer (it keeps only the last
                # reply): running it again could repeat a CPU_ON.  Refused instead.
                raise RemoteProtocolError(f"CALL seq {call.seq} from vCPU {call.vcpu} is older than its last "
                                          f"answered call ({last.seq}); sequence numbers only increase (§5)")
            self.stats.replays += 1  # a VMM re-sent after reconnect: same answer, no second run
            return last
        start = time.perf_counter()
        if target is _UNROUTED:
            target = self.route(call)
        if isinstance(target, Handler):
            name = target.name
            if target.inline:
                # No timeout scope: a call that never suspends cannot be interrupted
                # by one (trio cancels only at checkpoints), and a scope costs 5.7 µs.
                try:
                    result = await target.handle(call)
                except Exception:
                    result = self._failed(target, call)
            else:
                result = await self._run(target, call)
        else:
            # deny, no rule, or kvm (a call the VMM forwarded although the table leaves it to KVM)
            name = "none" if target is None else target.name
            result = NOT_SUPPORTED
        reply = reply_to(call, result.regs, result.effects)
        sink = self.sink
        if sink is not None and isinstance(target, Handler):
            touched = self.facts.touched
            changes = self._changes((target.name, *touched) if touched else (target.name,))
            touched.clear()
            if changes:  # a call that changed nothing costs no write (PSCI_VERSION, FEATURES, refusals)
                # A write that fails raises here: no reply, not even a replayed one, for
                # a change that is not durable (the journal stops the daemon).
                sink.append({"v": call.vcpu, **_reply_data(reply), "h": changes})
        self._last_reply[call.vcpu] = reply
        if result.effects:  # only handlers return effects
            self._effects[call.seq] = (name, result.effects)
            if len(self._effects) > MAX_PENDING_EFFECTS:
                self._effects.popitem(last=False)
        if result.notes:
            self._notes(name, result.notes)
        elapsed = time.perf_counter() - start
        self.stats.record(call, reply, name, elapsed)
        for obs in self.observers:
            obs(call, reply, name, elapsed)
        return reply

    async def _run(self, handler: Handler, call: Call) -> Result:
        timeout = self.timeouts.get(handler.name, self.config.timeout_s)
        with trio.move_on_after(timeout) as scope:
            try:
                return await handler.handle(call)
            except Exception:
                return self._failed(handler, call)
        if scope.cancelled_caught:
            log.error("handler %s timed out after %.3fs on %#010x from vcpu %d", handler.name, timeout,
                      call.func_id, call.vcpu)
            self.stats.failure(handler.name, "timeout")
        return handler.failure(call)

    def _failed(self, handler: Handler, call: Call) -> Result:
        # Exceptions are handler bugs or infrastructure failures, never a
        # guest-visible answer: log, count, and give the service's own error.
        log.exception("handler %s raised on %#010x from vcpu %d", handler.name, call.func_id, call.vcpu)
        self.stats.failure(handler.name, "exception")
        return handler.failure(call)


def _reply_data(reply: Reply) -> dict[str, Any]:
    return {"q": reply.seq, "r": list(reply.regs),
            "e": [[int(e.kind), e.vcpu, e.entry, e.context, e.arg, e.eflags] for e in reply.effects]}


def _reply_of(vcpu: int, seq: int, regs: list[int], effects: list[list[int]]) -> Reply:
    """A journaled reply; ValueError for one the codec would not send."""
    try:
        return Reply(seq, vcpu, tuple(regs), tuple(Effect(EffectKind(e[0]), *e[1:]) for e in effects))
    except ProtocolError as err:
        raise ValueError(str(err)) from err


def _replies(data: object) -> dict[int, Reply]:
    if not isinstance(data, dict):
        raise state.StateError(f"the replay window is not a mapping: {type(data).__name__}")
    try:
        return {int(v): _reply_of(int(v), r["q"], r["r"], r["e"]) for v, r in data.items()}
    except (ValueError, TypeError, KeyError) as err:
        raise state.StateError(f"the replay window is damaged: {err!r}") from err


__all__ = ["Bound", "Observer", "ReloadRefused", "SidecarChange", "StateSink", "VmService"]
