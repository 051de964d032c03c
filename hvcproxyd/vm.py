"""One VM's service: handler instances, the bound rule table, dispatch, replays.

This outlives any one VMM connection (a reconnect keeps handler state) and
knows nothing about sockets; daemon.py feeds it calls and carries its replies.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .config import VmConfig
from .guestmem import GuestMemory
from .handlers import NOT_SUPPORTED, Handler, Result, VmContext
from .rules import DENY, KVM, RuleTable
from .smccc import routing_id
from .wire import CALL_SMC, FEATURE_EFFECT_DONE, Call, Effect, EventKind, FilterRange, Hello, Reply, VmEvent

log = logging.getLogger("hvcproxyd.vm")

#: Observer signature: (call, reply, handler name or "deny"/"none", seconds spent).
Observer = Callable[[Call, Reply, str, float], None]


@dataclass(slots=True)
class Stats:
    calls: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    timeouts: Counter[str] = field(default_factory=Counter)
    replays: int = 0


class ReloadRefused(Exception):
    """A new config cannot be applied live; the running one stays."""


class VmService:
    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.ctx = VmContext(config.name, dict(config.versions), logging.getLogger(f"hvcproxyd.{config.name}"))
        self.instances = self._instantiate(config, {})
        self.ctx.handlers = self.instances
        #: Called with the new instances after a reload (the daemon restarts their run()).
        self.on_instances: list[Callable[[dict[str, Handler]], None]] = []
        self.table: RuleTable[Any] = self._bind(config, self.instances)
        self.filter = self._filter_of(config)
        self.timeouts = {name: spec.timeout_s for name, spec in config.handlers.items()}
        self._last_reply: dict[int, Reply] = {}
        self._effects: OrderedDict[int, tuple[str, tuple[Effect, ...]]] = OrderedDict()
        self.observers: list[Observer] = []
        #: Called with each VMM event (power changes, resets), for status and metrics.
        self.event_observers: list[Callable[[VmEvent], None]] = []
        self.stats = Stats()
        self.started = time.time()

    # -- construction and reload
    def _instantiate(self, config: VmConfig, old: dict[str, Handler]) -> dict[str, Handler]:
        out: dict[str, Handler] = {}
        for name, spec in config.handlers.items():
            inst: Handler = spec.cls(name, spec.options, self.ctx)
            prev = old.get(name)
            if prev is not None and type(prev) is spec.cls:
                inst.restore(prev.snapshot())
                if self.ctx.attached:
                    inst.attach(reconnect=True)
            out[name] = inst
        return out

    @staticmethod
    def _bind(config: VmConfig, instances: dict[str, Handler]) -> RuleTable[Any]:
        return config.table.map(lambda name: instances.get(name, name))  # type: ignore[no-any-return]

    @staticmethod
    def _filter_of(config: VmConfig) -> tuple[FilterRange, ...]:
        return config.table.filter_ranges()  # type: ignore[no-any-return]

    def reload(self, config: VmConfig) -> None:
        """Apply a validated config live, or raise ReloadRefused and change nothing."""
        new_filter = self._filter_of(config)
        if new_filter != self.filter:
            raise ReloadRefused("it changes the forwarded/denied ranges, which KVM fixes once the VM has run; "
                                "restart the VM to apply it")
        if config.name != self.config.name:
            raise ReloadRefused(f"it renames the VM ({self.config.name!r} -> {config.name!r})")
        if config.socket != self.config.socket:
            raise ReloadRefused("it moves the VMM socket, which the running VMM is connected to")
        instances = self._instantiate(config, self.instances)
        self.table = self._bind(config, instances)
        self.instances = instances
        self.ctx.handlers = instances
        for listener in self.on_instances:
            listener(instances)
        self.timeouts = {name: spec.timeout_s for name, spec in config.handlers.items()}
        self.config = config
        self.ctx.versions = dict(config.versions)

    # -- VMM lifecycle
    def attach(self, hello: Hello, memory: GuestMemory) -> None:
        if self.ctx.memory is not None and self.ctx.memory is not memory:
            self.ctx.memory.close()
        self.ctx.set_vcpus(hello.vcpus)
        self.ctx.memory = memory
        self.ctx.accel = hello.accel.name.lower()
        self.ctx.confirms_effects = bool(hello.features & FEATURE_EFFECT_DONE)
        if not hello.reconnect:
            self._last_reply.clear()  # a fresh VM process numbers its calls anew
            self._effects.clear()
        self.ctx.attached = True
        for inst in self.instances.values():
            inst.attach(reconnect=hello.reconnect)

    def detach(self) -> None:
        """The VMM went away; state stays for its reconnect, memory access does not."""
        if self.ctx.memory is not None:
            self.ctx.memory.close()
            self.ctx.memory = None

    def event(self, ev: VmEvent) -> None:
        log.info("%s: VMM event %s vcpu=%s", self.ctx.name, ev.kind.name,
                 "all" if ev.vcpu == 0xFFFF_FFFF else ev.vcpu)
        if ev.kind is EventKind.VM_RESET:
            self._effects.clear()
        for obs in self.event_observers:
            obs(ev)
        for inst in self.instances.values():
            try:
                inst.event(ev)
            except Exception:
                log.exception("handler %s failed on event %s", inst.name, ev.kind.name)

    def effect_done(self, seq: int, index: int, status: int) -> None:
        pending = self._effects.get(seq)
        if pending is None:
            return
        name, effects = pending
        handler = self.instances.get(name)  # after a reload, the instance now serving that name
        if handler is None:
            return
        try:
            handler.effect_done(effects[index], status)
        except Exception:
            log.exception("handler %s failed on effect confirmation", handler.name)

    def snapshot(self) -> dict[str, Any]:
        return {name: inst.snapshot() for name, inst in self.instances.items()}

    # -- the hot path
    async def dispatch(self, call: Call) -> Reply:
        last = self._last_reply.get(call.vcpu)
        if last is not None and last.seq == call.seq:
            self.stats.replays += 1  # a VMM re-sent after reconnect: same answer, no second run
            return last
        start = time.perf_counter()
        target = self.table.lookup(routing_id(call.func_id), call.flags & CALL_SMC, call.vcpu)
        if isinstance(target, Handler):
            name = target.name
            result = await self._run(target, call)
        else:
            # deny, no rule, or kvm (a call the VMM forwarded although the table leaves it to KVM)
            name = target if target in (DENY, KVM) else "none"
            result = NOT_SUPPORTED
        reply = Reply(call.seq, call.vcpu, result.regs, result.effects)
        self._last_reply[call.vcpu] = reply
        if result.effects:  # only handlers return effects
            self._effects[call.seq] = (name, result.effects)
            if len(self._effects) > 4096:
                self._effects.popitem(last=False)
        self.stats.calls[name] += 1
        if self.observers:
            elapsed = time.perf_counter() - start
            for obs in self.observers:
                obs(call, reply, name, elapsed)
        return reply

    async def _run(self, handler: Handler, call: Call) -> Result:
        timeout = self.timeouts.get(handler.name, self.config.timeout_s)
        with trio.move_on_after(timeout) as scope:
            try:
                return await handler.handle(call)
            except Exception:
                # Exceptions are handler bugs or infrastructure failures, never a
                # guest-visible answer: log, count, and give the service's own error.
                log.exception("handler %s raised on %#010x from vcpu %d", handler.name, call.func_id, call.vcpu)
                self.stats.errors[handler.name] += 1
                return handler.failure(call)
        if scope.cancelled_caught:
            log.error("handler %s timed out after %.3fs on %#010x from vcpu %d", handler.name, timeout,
                      call.func_id, call.vcpu)
            self.stats.timeouts[handler.name] += 1
        return handler.failure(call)
