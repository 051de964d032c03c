"""Handlers that exist only to exercise the daemon: loaded by ``type: tests.plugins:Name``,
the same path a not-yet-packaged third-party handler takes."""

from __future__ import annotations

import hashlib
from typing import Any

import trio

from hvcproxyd.config import Section
from hvcproxyd.core.guestmem import GuestMemoryError
from hvcproxyd.handlers import Handler, Notes, Result
from hvcproxyd.smccc import SmcccResult
from hvcproxyd.wire import Call


class Raiser(Handler):
    """Has a bug: raises on every call."""

    async def handle(self, call: Call) -> Result:
        raise RuntimeError("deliberate failure in a test handler")


class Sleeper(Handler):
    """Sleeps x1 milliseconds, then answers x0 = 0, x1 = the vCPU."""

    async def handle(self, call: Call) -> Result:
        self.log.info("vcpu %d sleeps %d ms", call.vcpu, call.args[0])  # tests wait for this line
        await trio.sleep(call.args[0] / 1000)
        return Result.of(0, call.vcpu)


class MemoryProbe(Handler):
    """x1 = GPA, x2 = length, x3 = 0: read and answer the first 8 bytes + a checksum.
    x3 = 1: write ``length`` bytes of pattern x4 at GPA.  Bad addresses get
    INVALID_PARAMETER, as a real service must answer them."""

    async def handle(self, call: Call) -> Result:
        gpa, length, op, pattern = call.args[0], call.args[1], call.args[2], call.args[3]
        memory = self.vm.memory
        assert memory is not None
        try:
            if op == 0:
                data = await memory.read(gpa, length)
                digest = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
                return Result.of(0, int.from_bytes(data[:8].ljust(8, b"\0"), "little"), digest)
            await memory.write(gpa, bytes([pattern & 0xFF]) * length)
            return Result.of(0)
        except GuestMemoryError:
            return Result.of(SmcccResult.INVALID_PARAMETER)


class Counter(Handler):
    """Counts calls; its count survives reloads and reconnects via snapshot/restore."""

    def __init__(self, name: str, options: Any, vm: Any) -> None:
        super().__init__(name, options, vm)
        self.count = 0

    @classmethod
    def parse_options(cls, section: Section) -> int:
        section.allow_keys(("step",))
        return int(section.integer("step", default=1, lo=1, hi=100))

    async def handle(self, call: Call) -> Result:
        self.count += self.options
        return Result.of(0, self.count)

    def snapshot(self) -> dict[str, Any]:
        return {"count": self.count}

    def restore(self, data: dict[str, Any]) -> Notes:
        self.count = data["count"]
        return ()


class Blocking(Handler):
    """Holds state it says cannot move (``reason``), like a handler with a backend
    outside the daemon; an empty reason lets it move."""

    @classmethod
    def parse_options(cls, section: Section) -> str:
        section.allow_keys(("reason",))
        return section.string("reason", default="") or ""

    def migration_blocker(self) -> str | None:
        return self.options or None


class OldPsci(Handler):
    """Claims to provide only PSCI 0.2, for the pinned-version check."""

    SERVICES = {"psci": ("0.2",)}
