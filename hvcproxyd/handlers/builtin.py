"""The small built-in handlers: deny, static, discovery, log.

They are registered as entry points like any plugin (pyproject.toml), so they
double as the simplest examples of the API.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.diagnostics import Section
from ..smccc import CALL_COUNT_FN, CALL_UID_FN, FUNC_NUM_MASK, REVISION_FN, SmcccResult
from ..wire import Call
from . import NOT_SUPPORTED, Handler, Result


class DenyHandler(Handler):
    """Answers NOT_SUPPORTED, as KVM does for a DENY filter entry."""

    inline = True


@dataclass(frozen=True, slots=True)
class StaticOptions:
    result: Result


class StaticHandler(Handler):
    """Fixed result registers from the config: for probing a guest's driver or
    faking a firmware service in tests."""

    inline = True

    @classmethod
    def parse_options(cls, section: Section) -> StaticOptions:
        section.allow_keys(("regs",))
        regs = section.integers("regs", min_len=1, max_len=18, default=[0])
        return StaticOptions(Result.of(*regs))

    async def handle(self, call: Call) -> Result:
        return self.options.result  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class DiscoveryOptions:
    call_count: int
    uid: tuple[int, int, int, int]
    revision: tuple[int, int]


class DiscoveryHandler(Handler):
    """Call count, UID and revision for an owned range (DEN0028 §6); every other
    function in the range is NOT_SUPPORTED.

    The UID is given either as a UUID string (encoded as SMCCC's four
    little-endian words, as Linux and KVM do) or as four explicit words, because
    some firmware (OP-TEE) publishes its UID as big-endian words instead.
    """

    ANSWERS_DISCOVERY = True
    inline = True

    @classmethod
    def parse_options(cls, section: Section) -> DiscoveryOptions:
        section.allow_keys(("uid", "call_count", "revision"))
        uid = section.uid("uid")
        count = section.integer("call_count", default=0, lo=0, hi=0xFFFF_FFFF)
        rev = section.integers("revision", min_len=2, max_len=2, default=[0, 1])
        return DiscoveryOptions(count, uid, (rev[0], rev[1]))

    async def handle(self, call: Call) -> Result:
        opts: DiscoveryOptions = self.options
        fn = call.func_id & FUNC_NUM_MASK
        if fn == CALL_UID_FN:
            return Result.of(*opts.uid)
        if fn == CALL_COUNT_FN:
            return Result.of(opts.call_count)
        if fn == REVISION_FN:
            return Result.of(*opts.revision)
        return NOT_SUPPORTED


class LogHandler(Handler):
    """Records each call at INFO and answers NOT_SUPPORTED: for finding out what a
    guest probes before writing a real handler."""

    inline = True

    PER_CALL_WARNING = ("writes an INFO line for every call, at a rate the guest chooses; use it to find out what "
                        "a guest probes, then replace it (`hvcproxyd trace` shows calls without logging them)")

    async def handle(self, call: Call) -> Result:
        self.log.info("vcpu %d called %#010x args %s", call.vcpu, call.func_id,
                      " ".join(f"{a:#x}" for a in call.args[:7]))
        return Result.of(SmcccResult.NOT_SUPPORTED)


__all__ = ["DenyHandler", "DiscoveryHandler", "LogHandler", "StaticHandler"]
