"""A TEE that lies: hypothesis scripts what the backend answers (results whose
parameters do not match the call, output larger than the room given, RPCs
naming memory the guest never gave it, unknown threads, refusals mid-call)
while the test guest answers every RPC as Linux would.  The mediator must
never raise, never touch memory outside RAM, answer only OP-TEE codes, and
end every call.  The backend here is a script on purpose: it stands for a
malicious or broken TEE, which no real TEE would agree to be."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvcproxyd.handlers.tee_proxy import abi
from hvcproxyd.handlers.tee_proxy.backend import (
    Backend,
    BackendError,
    BackendInfo,
    BParam,
    Done,
    ForeignIntr,
    Msg,
    Pending,
    Refused,
    RpcCmd,
    Step,
)
from hvcproxyd.handlers.tee_proxy.msgarg import MsgArg, Param

from .tee_guest import memref
from .tee_support import rig

U64 = st.integers(0, (1 << 64) - 1)
SIZE = st.one_of(st.integers(0, 3 * 4096), U64)
BPARAM = st.one_of(
    st.builds(BParam, st.sampled_from([0, 1, 2, 3, 0x103]), U64, st.one_of(U64, st.just(0x1000)), U64),
    st.builds(lambda t, size, data, shm, offs: BParam(t, offs, size=size, data=data, shm=shm),
              st.sampled_from([9, 10, 11]), SIZE, st.one_of(st.none(), st.binary(max_size=9000)),
              st.one_of(st.just(0), st.integers(0x1000, 0x1010), U64), st.one_of(st.integers(0, 8192), U64)))
MSG = st.builds(lambda cmd, ret, session, params: Msg(cmd, ret=ret, session=session, params=params),
                st.one_of(st.sampled_from([abi.RPC_CMD_SHM_ALLOC, abi.RPC_CMD_SHM_FREE, abi.RPC_CMD_GET_TIME,
                                           0x3F0]), st.integers(0, 1 << 32 - 1)),
                st.one_of(st.just(0), U64.map(lambda v: v & 0xFFFF_FFFF)), st.integers(0, 5),
                st.lists(BPARAM, max_size=5))
STEP = st.one_of(st.builds(Done, MSG), st.builds(RpcCmd, st.integers(0, 3), MSG), st.builds(ForeignIntr, st.just(1)),
                 st.builds(Refused, st.sampled_from([1, 2, 7, 0xFFFF_FFFF])), st.builds(Pending, st.integers(0, 3)),
                 st.just("error"))
ANSWERS = {abi.RETURN_OK, abi.RETURN_ETHREAD_LIMIT, abi.RETURN_EBUSY, abi.RETURN_ERESUME, abi.RETURN_EBADADDR,
           abi.RETURN_EBADCMD, abi.RETURN_ENOMEM, abi.RETURN_ENOTAVAIL, 0xFFFF_FFFF}


class ScriptedTee(Backend):
    def __init__(self, script: list[Step | str]) -> None:
        self.script = list(script)
        self.info = BackendInfo(4, abi.SEC_CAP_DYNAMIC_SHM)

    def _next(self) -> Step:
        step = self.script.pop(0) if self.script else Done(Msg(0))
        if step == "error":
            raise BackendError("scripted failure")
        assert not isinstance(step, str)
        return step

    async def open(self) -> BackendInfo:
        assert self.info is not None
        return self.info

    async def close(self) -> None:
        pass

    async def vm_created(self, client: int, budget: float) -> int:
        return abi.RETURN_OK

    async def vm_destroyed(self, client: int, budget: float) -> int:
        return abi.RETURN_OK

    async def call(self, client: int, msg: Msg, budget: float) -> Step:
        return self._next()

    async def rpc_return(self, client: int, thread: int, msg: Msg | None, budget: float) -> Step:
        return self._next()

    async def wait(self, client: int, ticket: int, budget: float) -> Step:
        return self._next()


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(script=st.lists(STEP, max_size=12), calls=st.integers(1, 3))
async def test_lying_tee(tmp_path: Path, script: list[Step | str], calls: int) -> None:
    async with rig(tmp_path, serve_tee=False, pages_per_buffer=8, shared_pages=32) as r:
        r.handler.backend = ScriptedTee(script)
        r.handler.sessions.update(range(6))
        r.guest.shm[0x1000] = r.guest.ram.buffer(b"", capacity=4096)[0]  # guest memory never given to the TEE
        for _ in range(calls):
            src, n = r.guest.ram.buffer(b"in" * 100)
            dst, cap = r.guest.ram.buffer(b"", capacity=300)
            a0, _ = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, 0, 1, params=[
                memref(abi.ATTR_TYPE_TMEM_INPUT, src, n), memref(abi.ATTR_TYPE_TMEM_OUTPUT, dst, cap),
                Param(abi.ATTR_TYPE_VALUE_INOUT, 1, 2, 3)]))
            assert a0 in ANSWERS, hex(a0)
            assert r.guest.ram.read_buffer(src, n) == b"in" * 100  # an input is never written back
        assert r.handler.jobs == {} and r.handler.account.inflight == 0
        # Every RPC argument buffer the guest allocated was freed; the memory it never gave the TEE is still its own.
        assert r.guest.rpc_seen.count(abi.RPC_FUNC_ALLOC) == r.guest.rpc_seen.count(abi.RPC_FUNC_FREE)
        assert 0x1000 in r.guest.shm
        assert r.handler.account.pages == sum(len(b.pages) for b in r.handler.rpc_shm.values())
