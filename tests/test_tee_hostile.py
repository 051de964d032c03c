"""A hostile guest against the whole mediator (dispatcher, translation, RPC
flow) and the real reference TEE: hypothesis writes arbitrary argument
structures and page lists into RAM, calls CALL_WITH_ARG at arbitrary
addresses and resumes with arbitrary RETURN_FROM_RPC registers.  The handler
must never raise, never touch memory outside RAM (tee_support's memory
asserts it), answer only OP-TEE return codes, and release every page it
charged once the guest resets."""

from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvcproxyd.handlers.tee_proxy import abi
from hvcproxyd.handlers.tee_proxy.msgarg import MsgArg, Param, pack
from hvcproxyd.handlers.tee_proxy.reftee import ECHO_TA, RPC_TA
from hvcproxyd.smccc import MASK32
from hvcproxyd.wire import EventKind, VmEvent

from .tee_guest import open_session_arg
from .tee_support import RAM, RAM_SIZE, rig

ANSWERS = {abi.RETURN_OK, abi.RETURN_ETHREAD_LIMIT, abi.RETURN_EBUSY, abi.RETURN_ERESUME, abi.RETURN_EBADADDR,
           abi.RETURN_EBADCMD, abi.RETURN_ENOMEM, abi.RETURN_ENOTAVAIL,
           *(abi.rpc(f) for f in (abi.RPC_FUNC_ALLOC, abi.RPC_FUNC_FREE, abi.RPC_FUNC_FOREIGN_INTR, abi.RPC_FUNC_CMD))}
ATTRS = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 4, 8, 0xC]
PAGE = 4096
# Addresses a hostile guest likes: its own pages, page edges, RAM's edges, beyond RAM, 0.
ADDR = st.one_of(st.integers(0, RAM_SIZE // PAGE - 1).map(lambda p: RAM + p * PAGE),
                 st.integers(0, RAM_SIZE - 1).map(lambda o: RAM + o),
                 st.sampled_from([0, RAM - PAGE, RAM + RAM_SIZE - 32, RAM + RAM_SIZE, 1 << 39, (1 << 64) - PAGE]),
                 st.integers(0, (1 << 64) - 1))
PARAM = st.builds(lambda t, flags, a, b, c: Param(t | flags, a, b, c),
                  st.sampled_from(ATTRS), st.sampled_from([0, abi.ATTR_META, abi.ATTR_NONCONTIG]),
                  ADDR, st.one_of(st.integers(0, 3 * PAGE), st.integers(0, (1 << 64) - 1)),
                  st.one_of(st.integers(0, 4), st.integers(0, (1 << 64) - 1)))
ARG = st.one_of(
    st.builds(lambda cmd, func, session, params: MsgArg(cmd, func, session, params=params),
              st.integers(0, 8), st.integers(0, 6), st.integers(0, 4), st.lists(PARAM, max_size=6)),
    # Calls the rpc TA (session 2) answers with RPCs, so the resumes below meet every RPC phase.
    st.builds(lambda func, size: MsgArg(abi.CMD_INVOKE_COMMAND, func, 2, params=[
        Param(abi.ATTR_TYPE_VALUE_INPUT, size), Param(abi.ATTR_TYPE_VALUE_OUTPUT)]),
        st.integers(0, 2), st.integers(0, 12 * PAGE)))
REGS = st.lists(st.integers(0, MASK32), min_size=6, max_size=6)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(args=st.lists(ARG, min_size=1, max_size=4), where=st.lists(ADDR, min_size=1, max_size=4),
       lists=st.lists(st.lists(ADDR, max_size=6), max_size=4), resumes=st.lists(REGS, max_size=6),
       use_tid=st.booleans())
async def test_hostile_guest(tmp_path: Path, args: list[MsgArg], where: list[int], lists: list[list[int]],
                             resumes: list[list[int]], use_tid: bool) -> None:
    async with rig(tmp_path, slice_ms=5, call_timeout_ms=50, pages_per_buffer=8, shared_pages=20) as r:
        await r.guest.call(open_session_arg(ECHO_TA))
        await r.guest.call(open_session_arg(RPC_TA))
        # Page lists in RAM naming whatever the guest likes.
        for i, entries in enumerate(lists):
            page = RAM + (100 + i) * PAGE
            r.ram[page - RAM:page - RAM + 8 * len(entries)] = struct.pack(f"<{len(entries)}Q",
                                                                          *(e & ((1 << 64) - 1) for e in entries))
        tids: list[int] = []
        for i, arg in enumerate(args):
            gpa = where[i % len(where)]
            data = pack(arg)
            if gpa >= RAM and gpa + len(data) <= RAM + RAM_SIZE:
                r.ram[gpa - RAM:gpa - RAM + len(data)] = data
            regs = await r.smc(abi.CALL_WITH_ARG, (gpa >> 32) & MASK32, gpa & MASK32, 0, 0, 0, 0, 0xDEAD)
            assert regs[0] in ANSWERS, hex(regs[0])
            if regs[0] >> 16 == 0xFFFF:
                tids.append(regs[3])
        for regs_in in resumes:
            if use_tid and tids:
                regs_in[2] = tids[regs_in[2] % len(tids)]
            regs = await r.smc(abi.RETURN_FROM_RPC, *regs_in)
            assert regs[0] in ANSWERS, hex(regs[0])
        assert set(r.ref.callers) <= {5}
        assert 0 <= r.handler.account.pages <= 20 and 0 <= r.handler.account.buffers <= 16
        r.handler.event(VmEvent(EventKind.VM_RESET))
        assert (r.handler.account.pages, r.handler.account.buffers, len(r.handler.jobs)) == (0, 0, 0)
