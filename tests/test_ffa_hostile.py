"""A hostile guest: random sequences of FF-A calls with register values drawn
from what matters (guest addresses in and out of RAM, endpoint pairs, sizes,
handles the ledger gave out) never make the handler raise, and never leave
its state inconsistent."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.ffa.defs import HANDLE_HYPERVISOR
from hvcproxyd.wire import N_ARGS, Call

from .ffa_support import ECHO, PAGE, RAM, RAM_SIZE, RX, STORE, TX, U64, VM_ID, Desc, Guest, make_guest

VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 0x10001, 0x10002, TX, RX, RAM + 0x10000, RAM + RAM_SIZE - PAGE, RAM + RAM_SIZE,
                     RAM - PAGE, PAGE, 20, 40, 64, 96, 4096, 8192, VM_ID << 16 | ECHO, VM_ID << 16 | STORE,
                     ECHO << 16 | VM_ID, HANDLE_HYPERVISOR >> 32, 0x45430001, 0x45430002, 0x45430003,
                     0xFFFF_FFFF, U64, 1 << 31, 1 << 63]),
    st.integers(0, U64))
CALLS = st.lists(st.tuples(st.integers(0x60, 0x8F), st.booleans(), st.lists(VALUES, min_size=6, max_size=6)),
                 min_size=1, max_size=40)


@pytest.fixture(scope="module")
def guest_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Callable[[str], VmConfig]], Guest]:
    tmp = tmp_path_factory.mktemp("hostile")

    def make(make_config: Callable[[str], VmConfig]) -> Guest:
        return make_guest(make_config, tmp, "donate: true\n      limits: {fragments: 2, pending_messages: 2}")
    return make


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(CALLS, st.binary(max_size=256))
async def test_random_calls_never_raise(make_config: Callable[[str], VmConfig],
                                        guest_factory: Callable[[Callable[[str], VmConfig]], Guest],
                                        calls: list[tuple[int, bool, list[int]]], tx: bytes) -> None:
    g = guest_factory(make_config)  # a fresh VM (and RAM) for every example
    handler = g.handler
    await g.ready(0x10002)
    # TX holds random bytes or a valid 96-byte descriptor, so MEM_* calls also get past the first checks.
    g.write(TX, tx or Desc().encode())
    for seq, (fn, wide, vals) in enumerate(calls):
        ledger = handler.endpoint.ledger
        handles = list(ledger.entries)
        if handles and vals[0] == 1:  # now and then, name a live handle
            vals[0], vals[1] = handles[0] & 0xFFFF_FFFF, handles[0] >> 32
        fid = (0xC400_0000 if wide else 0x8400_0000) | fn
        args = tuple(vals) + (0,) * (N_ARGS - len(vals))
        result = await handler.handle(Call(seq + 1, 0, fid, args))  # raises if the handler has a bug
        assert result.regs and all(0 <= r <= U64 for r in result.regs)
        ep = handler.endpoint
        # Invariants: the ledger's spans never overlap the mailbox, counts stay in their limits.
        assert len(ep.ledger) <= ep.opts.limits.shares
        assert len(ep.queued) <= ep.opts.limits.pending_messages
        for entry in ep.ledger.entries.values():
            for addr, n in entry.tx.ranges:
                assert addr >= RAM and addr + n * PAGE <= RAM + RAM_SIZE
                assert not ep.mailbox.overlaps(addr, n * PAGE)
