"""tee-proxy's dispatcher, limits, lifecycle and RPC flow, against the real
reference TEE on a socket and guest memory over a bytearray."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.tee_proxy import abi
from hvcproxyd.handlers.tee_proxy.msgarg import MsgArg, Param, pack
from hvcproxyd.handlers.tee_proxy.reftee import (
    ECHO_CMD_ADD,
    ECHO_CMD_ECHO,
    ECHO_CMD_REVERSE,
    ECHO_CMD_SLOW,
    ECHO_TA,
    RPC_CMD_GET_TIME,
    RPC_CMD_INTERRUPT,
    RPC_CMD_SHM_ROUNDTRIP,
    RPC_TA,
)
from hvcproxyd.smccc import MASK32
from hvcproxyd.wire import EventKind, VmEvent

from .tee_guest import memref, open_session_arg
from .tee_support import RAM, RAM_SIZE, Rig, rig

VIN, VOUT = abi.ATTR_TYPE_VALUE_INPUT, abi.ATTR_TYPE_VALUE_OUTPUT
TIN, TOUT, TINOUT = abi.ATTR_TYPE_TMEM_INPUT, abi.ATTR_TYPE_TMEM_OUTPUT, abi.ATTR_TYPE_TMEM_INOUT


async def session(r: Rig, ta: object = ECHO_TA) -> int:
    a0, out = await r.guest.call(open_session_arg(ta))  # type: ignore[arg-type]
    assert (a0, out.ret) == (abi.RETURN_OK, abi.TEEC_SUCCESS)
    return out.session


async def raw_call(r: Rig, arg: MsgArg, gpa: int | None = None) -> tuple[int, ...]:
    """CALL_WITH_ARG without answering RPCs."""
    gpa = gpa if gpa is not None else r.guest.ram.alloc() + 0x40
    r.guest.ram.write(gpa, pack(arg))
    return await r.smc(abi.CALL_WITH_ARG, gpa >> 32, gpa & MASK32, 0, 0, 0, 0, 0xFFFF)


# -- fast calls
async def test_identity_and_fast_calls(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        assert (await r.smc(abi.CALLS_UID))[:4] == abi.API_UID
        assert (await r.smc(abi.fast(0xFF01)))[:4] == abi.API_UID  # owner 50's own discovery query
        assert (await r.smc(abi.CALLS_REVISION))[:2] == abi.API_REVISION
        assert (await r.smc(abi.GET_OS_UUID))[:4] == abi.OS_UUID
        assert (await r.smc(abi.GET_OS_REVISION))[:2] == (4, 0)
        assert (await r.smc(abi.GET_SHM_CONFIG))[0] == abi.RETURN_ENOTAVAIL
        assert (await r.smc(abi.ENABLE_SHM_CACHE))[0] == abi.RETURN_OK
        assert (await r.smc(abi.DISABLE_SHM_CACHE))[0] == abi.RETURN_ENOTAVAIL
        assert (await r.smc(abi.GET_THREAD_COUNT))[:2] == (abi.RETURN_OK, 4)
        assert (await r.smc(abi.ENABLE_ASYNC_NOTIF))[0] == abi.RETURN_ENOTAVAIL
        assert (await r.smc(abi.CALL_WITH_RPC_ARG))[0] == abi.RETURN_UNKNOWN_FUNCTION
        assert (await r.smc(abi.fast(0x1234)))[0] == abi.RETURN_UNKNOWN_FUNCTION
        assert (await r.smc(abi.GET_OS_UUID | 0x4000_0000))[0] == abi.RETURN_UNKNOWN_FUNCTION  # no SMC64 OP-TEE calls


async def test_capabilities_filtered(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.handler.backend.info = None
        r.ref.caps = (abi.SEC_CAP_HAVE_RESERVED_SHM | abi.SEC_CAP_DYNAMIC_SHM | abi.SEC_CAP_VIRTUALIZATION
                      | abi.SEC_CAP_ASYNC_NOTIF | abi.SEC_CAP_RPC_ARG | abi.SEC_CAP_MEMREF_NULL)
        a0, caps, *_ = await r.smc(abi.EXCHANGE_CAPABILITIES, abi.NSEC_CAP_UNIPROCESSOR)
        assert a0 == abi.RETURN_OK
        assert caps == abi.SEC_CAP_DYNAMIC_SHM | abi.SEC_CAP_MEMREF_NULL


async def test_no_dynamic_shm_means_no_tee(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.ref.caps = abi.SEC_CAP_HAVE_RESERVED_SHM
        assert (await r.smc(abi.EXCHANGE_CAPABILITIES))[0] == abi.RETURN_ENOTAVAIL


# -- client ID and lifecycle
async def test_w7_is_always_the_configured_client(tmp_path: Path) -> None:
    async with rig(tmp_path, client_id=9) as r:
        r.guest.w7 = 3  # pretends to be another VM
        await session(r)
        r.guest.w7 = 0  # pretends to be the hypervisor
        await session(r)
        assert r.ref.callers == [9, 9]


@pytest.mark.parametrize("fid", [abi.VM_CREATED, abi.VM_DESTROYED])
async def test_guest_vm_lifecycle_calls_never_reach_the_backend(tmp_path: Path, fid: int) -> None:
    async with rig(tmp_path) as r:
        await session(r)  # the handler's own VM_CREATED has gone out
        before = list(r.ref.lifecycle)
        assert (await r.smc(fid, 77, 0, 0, 0, 0, 0, 0))[0] == abi.RETURN_ENOTAVAIL
        assert (await r.smc(fid, 5))[0] == abi.RETURN_ENOTAVAIL
        assert r.ref.lifecycle == before == [("created", 5)]


async def test_lifecycle_on_reset_and_shutdown(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.handler.settle()
        s = await session(r)
        r.handler.event(VmEvent(EventKind.VM_RESET))
        await r.handler.settle()
        assert r.ref.lifecycle == [("created", 5), ("destroyed", 5), ("created", 5)]
        assert r.ref.clients[5] == {}  # the TEE dropped the old sessions
        _a0, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_ADD, s))
        assert out.ret == abi.TEEC_ERROR_BAD_PARAMETERS  # nor does the mediator know it any more
        r.handler.event(VmEvent(EventKind.VM_SHUTDOWN))
        await r.handler.settle()
        assert r.ref.lifecycle[-1] == ("destroyed", 5) and 5 not in r.ref.clients
        assert (await raw_call(r, open_session_arg(ECHO_TA)))[0] == abi.RETURN_ENOTAVAIL


async def test_refused_vm_created_is_a_tee_without_capacity(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.ref.clients[5] = {}  # the TEE already has a client 5: VM_CREATED is refused
        assert (await r.smc(abi.EXCHANGE_CAPABILITIES))[0] == abi.RETURN_ENOTAVAIL
        assert (await raw_call(r, open_session_arg(ECHO_TA)))[0] == abi.RETURN_ENOTAVAIL
        assert r.ref.callers == []


async def test_dead_backend_answers_errors(tmp_path: Path) -> None:
    async with rig(tmp_path, serve_tee=False) as r:
        with trio.fail_after(5):
            assert (await r.smc(abi.EXCHANGE_CAPABILITIES))[0] == abi.RETURN_ENOTAVAIL
            assert (await raw_call(r, open_session_arg(ECHO_TA)))[0] == abi.RETURN_ENOTAVAIL
            assert (await r.smc(abi.GET_THREAD_COUNT))[0] == abi.RETURN_ENOTAVAIL


async def test_backend_dying_mid_call_ends_it_with_communication_error(tmp_path: Path) -> None:
    sock = tmp_path / "tee.sock"
    async with rig(tmp_path, serve_tee=False) as r, trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def tee() -> None:
            with scope:
                await r.ref.serve(str(sock))

        nursery.start_soon(tee)
        while not sock.exists():
            await trio.sleep(0.01)
        s = await session(r, RPC_TA)
        regs = await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_SHM_ROUNDTRIP, s,
                                        params=[Param(VIN, 4096), Param(VOUT)]))
        assert regs[0] == abi.rpc(abi.RPC_FUNC_ALLOC)
        scope.cancel()
        await trio.sleep(0.05)
        gpa = r.guest.ram.alloc()
        regs = await r.smc(abi.RETURN_FROM_RPC, gpa >> 32, gpa & MASK32, regs[3], 0, 0x77)
        assert regs[0] == abi.rpc(abi.RPC_FUNC_CMD)  # SHM_ALLOC, for the guest to carry out
        regs = await r.smc(abi.RETURN_FROM_RPC, 0, 0, regs[3])
        # The TEE is gone; the RPC arg buffer is the guest's, so it is asked to free it before the answer.
        assert regs[0] == abi.rpc(abi.RPC_FUNC_FREE) and regs[2] == 0x77
        assert (await r.smc(abi.RETURN_FROM_RPC, 0, 0, regs[3]))[0] == abi.RETURN_OK
        assert r.handler.report()["calls"] == 0


async def test_hung_backend_gives_foreign_interrupts_then_an_error(tmp_path: Path) -> None:
    async with rig(tmp_path, slice_ms=20, call_timeout_ms=200) as r:
        s = await session(r)
        gpa = r.guest.ram.alloc()
        regs = await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_SLOW, s, params=[Param(VIN, 60_000)]), gpa)
        interrupts = 0
        with trio.fail_after(5):
            while regs[0] == abi.rpc(abi.RPC_FUNC_FOREIGN_INTR):
                interrupts += 1
                regs = await r.smc(abi.RETURN_FROM_RPC, regs[1], regs[2], regs[3])
        assert interrupts >= 5 and regs[0] == abi.RETURN_OK
        ret, origin = struct.unpack_from("<II", r.guest.ram.read(gpa + 20, 8))
        assert (ret, origin) == (abi.TEEC_ERROR_COMMUNICATION, abi.TEEC_ORIGIN_COMMS)


# -- messages and memrefs
async def test_values_and_memrefs(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s = await session(r)
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_ADD, s,
                                            params=[Param(VIN, 40, 2), Param(VOUT, 1, 1, 1)]))
        assert out.params[1].a == 42
        buf, size = r.guest.ram.buffer(b"abcdef" * 1000, offset=100)  # 6000 bytes over two pages, offset in page
        _a0, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_REVERSE, s,
                                            params=[memref(TINOUT, buf, size)]))
        assert out.ret == abi.TEEC_SUCCESS
        assert r.guest.ram.read_buffer(buf, size) == (b"abcdef" * 1000)[::-1]


async def test_short_output_buffer_reports_size_and_writes_nothing(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s = await session(r)
        src, n = r.guest.ram.buffer(b"x" * 100)
        dst, cap = r.guest.ram.buffer(b"y" * 10)
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_ECHO, s,
                                           params=[memref(TIN, src, n), memref(TOUT, dst, cap)]))
        assert (out.ret, out.params[1].b) == (abi.TEEC_ERROR_SHORT_BUFFER, 100)
        assert r.guest.ram.read_buffer(dst, 10) == b"y" * 10


async def test_null_memref_and_device_enumeration(tmp_path: Path) -> None:
    from hvcproxyd.handlers.tee_proxy.reftee import DEVICE_ENUM_PTA
    async with rig(tmp_path) as r:
        s = await session(r, DEVICE_ENUM_PTA)
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, 0, s, params=[Param(TOUT, 0, 0, 0)]))
        assert (out.ret, out.params[0].b) == (abi.TEEC_ERROR_SHORT_BUFFER, 16)  # Linux's size query


async def test_registered_shm_and_rmem(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s = await session(r)
        buf, size = r.guest.ram.buffer(b"0123456789" * 500)
        _, out = await r.guest.call(MsgArg(abi.CMD_REGISTER_SHM, params=[memref(TOUT, buf, size, 0xC00C1E)]))
        assert out.ret == abi.TEEC_SUCCESS
        assert r.handler.report()["buffers"] == 1 and r.handler.report()["shared_pages"] == 2
        rm = Param(abi.ATTR_TYPE_RMEM_INOUT, 4090, 10, 0xC00C1E)  # straddles the page boundary
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_REVERSE, s, params=[rm]))
        assert out.ret == abi.TEEC_SUCCESS
        assert r.guest.ram.read_buffer(buf, size)[4090:4100] == b"9876543210"
        bad = Param(abi.ATTR_TYPE_RMEM_INPUT, 4990, 20, 0xC00C1E)  # past the registered end
        assert (await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_REVERSE, s, params=[bad])))[0] \
            == abi.RETURN_EBADADDR
        unknown = Param(abi.ATTR_TYPE_RMEM_INPUT, 0, 1, 0xBAD)
        assert (await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, 0, s, params=[unknown])))[0] == abi.RETURN_EBADADDR
        _, out = await r.guest.call(MsgArg(abi.CMD_UNREGISTER_SHM, params=[Param(abi.ATTR_TYPE_RMEM_INPUT, 0, 0,
                                                                                 0xC00C1E)]))
        assert out.ret == abi.TEEC_SUCCESS and r.handler.report()["shared_pages"] == 0
        _, out = await r.guest.call(MsgArg(abi.CMD_UNREGISTER_SHM, params=[Param(abi.ATTR_TYPE_RMEM_INPUT, 0, 0,
                                                                                 0xC00C1E)]))
        assert out.ret == abi.TEEC_ERROR_BAD_PARAMETERS


async def test_bad_argument_addresses(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s = await session(r)
        outside = RAM + RAM_SIZE + 0x1000
        assert (await r.smc(abi.CALL_WITH_ARG, outside >> 32, outside & MASK32))[0] == abi.RETURN_EBADADDR
        crossing = r.guest.ram.alloc(2) + 4096 - 64  # header plus params run into the next page
        arg = MsgArg(abi.CMD_INVOKE_COMMAND, 0, s, params=[Param(VIN)] * 4)
        assert (await raw_call(r, arg, crossing))[0] == abi.RETURN_EBADADDR
        huge = bytearray(pack(MsgArg(abi.CMD_INVOKE_COMMAND, 0, s)))
        struct.pack_into("<I", huge, 28, 1000)
        gpa = r.guest.ram.alloc()
        r.guest.ram.write(gpa, bytes(huge))
        assert (await r.smc(abi.CALL_WITH_ARG, gpa >> 32, gpa & MASK32))[0] == abi.RETURN_EBADCMD
        assert (await raw_call(r, MsgArg(99)))[0] == abi.RETURN_EBADCMD
        assert (await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, 0, s, params=[Param(0x1_0000_0000 | VIN)])))[0] \
            == abi.RETURN_EBADCMD
        contiguous = Param(TIN, RAM + 0x10000, 16, 0)  # no NONCONTIG: names reserved SHM, never offered
        assert (await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, 0, s, params=[contiguous])))[0] \
            == abi.RETURN_EBADADDR


async def test_page_lists_refused(tmp_path: Path) -> None:
    async with rig(tmp_path, pages_per_buffer=1000) as r:  # room for the two-page cyclic list
        s = await session(r)
        ram = r.guest.ram
        arg_gpa = ram.alloc()
        outside = ram.pagelist([RAM + RAM_SIZE])
        onto_arg = ram.pagelist([arg_gpa])
        cyclic = ram.alloc()
        entries = [ram.alloc() for _ in range(abi.PAGELIST_ENTRIES)] + [cyclic]
        ram.write(cyclic, struct.pack("<512Q", *entries))  # 511 pages, then links back to itself
        list_outside = (RAM + RAM_SIZE) & ~0xFFF
        for buf_ptr, size in ((outside, 16), (onto_arg, 16), (cyclic, 600 * 4096), (list_outside, 16),
                              (arg_gpa, 16), (ram.pagelist([RAM + 0x10001]), 16)):
            arg = MsgArg(abi.CMD_INVOKE_COMMAND, 0, s, params=[memref(TIN, buf_ptr, size)])
            assert (await raw_call(r, arg, arg_gpa))[0] == abi.RETURN_EBADADDR, hex(buf_ptr)
        assert r.handler.report()["shared_pages"] == 0 and r.ref.callers.count(5) == 1


# -- limits
async def test_pages_per_buffer_limit(tmp_path: Path) -> None:
    async with rig(tmp_path, pages_per_buffer=2) as r:
        s = await session(r)
        buf, size = r.guest.ram.buffer(b"z" * (2 * 4096 + 1))
        assert (await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_REVERSE, s,
                                         params=[memref(TINOUT, buf, size)])))[0] == abi.RETURN_ENOMEM


async def test_shared_pages_limit(tmp_path: Path) -> None:
    async with rig(tmp_path, shared_pages=3) as r:
        s = await session(r)
        a, n = r.guest.ram.buffer(b"a" * 8192)
        b, m = r.guest.ram.buffer(b"b" * 8192)
        arg = MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_ECHO, s, params=[memref(TIN, a, n), memref(TOUT, b, m)])
        assert (await raw_call(r, arg))[0] == abi.RETURN_ENOMEM
        assert r.handler.report()["shared_pages"] == 0  # nothing stays charged for a refused call


async def test_registered_buffer_limit(tmp_path: Path) -> None:
    async with rig(tmp_path, buffers=3) as r:
        rets = []
        for cookie in range(1, 5):
            buf, size = r.guest.ram.buffer(b"r" * 16)
            _, out = await r.guest.call(MsgArg(abi.CMD_REGISTER_SHM, params=[memref(TOUT, buf, size, cookie)]))
            rets.append(out.ret)
        assert rets == [abi.TEEC_SUCCESS] * 3 + [abi.TEEC_ERROR_OUT_OF_MEMORY]


async def test_concurrent_call_limit(tmp_path: Path) -> None:
    async with rig(tmp_path, max_calls=1) as r:
        s = await session(r, RPC_TA)
        regs = await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_SHM_ROUNDTRIP, s,
                                        params=[Param(VIN, 4096), Param(VOUT)]))
        assert regs[0] == abi.rpc(abi.RPC_FUNC_ALLOC)  # one call suspended in an RPC
        assert (await raw_call(r, open_session_arg(ECHO_TA)))[0] == abi.RETURN_ETHREAD_LIMIT
        assert (await r.smc(abi.GET_THREAD_COUNT))[:2] == (abi.RETURN_OK, 1)


async def test_backend_thread_limit_passes_through(tmp_path: Path) -> None:
    async with rig(tmp_path, threads=1, max_calls=4) as r:
        s = await session(r, RPC_TA)
        await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_SHM_ROUNDTRIP, s,
                                 params=[Param(VIN, 4096), Param(VOUT)]))
        assert r.handler.max_calls(r.handler.backend.info) == 1  # type: ignore[arg-type]


# -- RPC
async def test_rpc_get_time_and_backend_foreign_interrupt(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s = await session(r, RPC_TA)
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_GET_TIME, s, params=[Param(VOUT)]))
        assert (out.ret, out.params[0].a, out.params[0].b) == (abi.TEEC_SUCCESS, 1234, 5678)
        r.guest.rpc_seen.clear()
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_INTERRUPT, s, params=[Param(VOUT)]))
        assert out.params[0].a == 1 and r.guest.rpc_seen == [abi.RPC_FUNC_FOREIGN_INTR]


async def test_return_from_rpc_errors(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        assert (await r.smc(abi.RETURN_FROM_RPC, 0, 0, 12345))[0] == abi.RETURN_ERESUME
        s = await session(r, RPC_TA)
        regs = await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_SHM_ROUNDTRIP, s,
                                        params=[Param(VIN, 4096), Param(VOUT)]))
        job = r.handler.jobs[regs[3]]
        job.busy = True
        assert (await r.smc(abi.RETURN_FROM_RPC, 0, 0, regs[3]))[0] == abi.RETURN_EBUSY
        job.busy = False
        # An RPC argument buffer outside RAM: the TEE hears of a failed RPC, the guest still frees it.
        regs = await r.smc(abi.RETURN_FROM_RPC, 0x7F, 0, regs[3], 0, 0x99)
        assert regs[0] == abi.rpc(abi.RPC_FUNC_FREE) and regs[2] == 0x99
        regs = await r.smc(abi.RETURN_FROM_RPC, 0, 0, regs[3])
        assert regs[0] == abi.RETURN_OK


async def test_rpc_shm_answers_are_checked(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s = await session(r, RPC_TA)

        def outside(rpc: MsgArg) -> None:
            if rpc.cmd == abi.RPC_CMD_SHM_ALLOC:  # the guest hands back memory it does not have
                rpc.params[0] = Param(TOUT, RAM + RAM_SIZE, rpc.params[0].b, 0x5)

        r.guest.tamper = outside
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_SHM_ROUNDTRIP, s,
                                           params=[Param(VIN, 4096), Param(VOUT)]))
        assert out.ret == abi.TEEC_ERROR_OUT_OF_MEMORY and r.handler.rpc_shm == {}


# -- config
def test_options_name_file_line_key(make_config: Callable[[str], VmConfig]) -> None:
    from hvcproxyd.config.diagnostics import ConfigError
    with pytest.raises(ConfigError) as err:
        make_config("""
            vm: t
            handlers:
              tee:
                type: tee-proxy
                options:
                  client_id: 0
                  backend: socket
                  pages_per_buffer: lots
                  colour: blue
            rules:
              - match: optee
                action: tee
            """)
    where = {(p.mark.line, p.key) for p in err.value.problems}
    assert where == {(6, "handlers.tee.options.socket"), (6, "handlers.tee.options.client_id"),
                     (8, "handlers.tee.options.pages_per_buffer"), (9, "handlers.tee.options.colour")}, where
    assert all(str(p).startswith(str(p.mark.file)) and p.mark.file.endswith("vm.yaml") for p in err.value.problems)


async def test_daemon_restart_under_a_running_vm_starts_the_client_afresh(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.handler.settle()
        r.handler.created = False  # a new daemon: it never sent VM_CREATED itself
        r.handler.pending.clear()
        r.handler.attach(reconnect=True)
        await r.handler.settle()
        assert r.ref.lifecycle == [("created", 5), ("destroyed", 5), ("created", 5)]
        assert r.handler.created and not r.handler.refused


async def test_lifecycle_sidecar_sends_without_a_guest_call(tmp_path: Path) -> None:
    from hvcproxyd.handlers.tee_proxy.handler import WAKE
    from hvcproxyd.handlers.tee_proxy.lifecycle import LifecycleSidecar
    async with rig(tmp_path) as r, trio.open_nursery() as nursery:
        sidecar = LifecycleSidecar(r.handler, r.handler.vm)
        await nursery.start(sidecar.run)
        sidecar.consume(WAKE)
        with trio.fail_after(3):
            while r.ref.lifecycle != [("created", 5)]:
                await trio.sleep(0.01)
        for note in r.handler.event(VmEvent(EventKind.VM_SHUTDOWN)):
            sidecar.consume(note)
        with trio.fail_after(3):
            while r.ref.lifecycle[-1] != ("destroyed", 5):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_rpcs_the_guest_must_not_see(tmp_path: Path) -> None:
    from hvcproxyd.handlers.tee_proxy.reftee import RPC_CMD_FREE_FOREIGN
    async with rig(tmp_path) as r:
        s = await session(r, RPC_TA)
        victim = r.guest._new_cookie()
        r.guest.shm[victim] = RAM + 0x10000  # memory the guest holds, but never gave the TEE
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_FREE_FOREIGN, s,
                                           params=[Param(VIN, victim), Param(VOUT)]))
        assert out.ret == abi.TEEC_SUCCESS
        assert (out.params[1].a, out.params[1].b) == (abi.TEEC_ERROR_BAD_PARAMETERS, abi.TEEC_ERROR_NOT_SUPPORTED)
        assert victim in r.guest.shm  # the SHM_FREE never reached the guest
        assert abi.RPC_FUNC_CMD not in r.guest.rpc_seen  # nor did the RPC with a memref outside its SHM


async def test_guest_that_cannot_allocate_the_rpc_argument(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s = await session(r, RPC_TA)
        regs = await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_GET_TIME, s, params=[Param(VOUT)]))
        assert regs[0] == abi.rpc(abi.RPC_FUNC_ALLOC)
        regs = await r.smc(abi.RETURN_FROM_RPC, 0, 0, regs[3])  # a1:a2 = 0: no memory
        assert regs[0] == abi.RETURN_OK  # the TA heard of the failure; nothing to free
        assert r.handler.report()["calls"] == 0


async def test_guest_rewriting_an_rpc_argument(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        s = await session(r, RPC_TA)
        # num_params grows: not what the TEE asked
        r.guest.tamper = lambda rpc: rpc.params.append(Param(VOUT, 1, 2, 3))
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_GET_TIME, s, params=[Param(VOUT)]))
        assert out.ret == abi.TEEC_ERROR_BAD_PARAMETERS and r.guest.shm == {}


async def test_reload_keeps_sessions_and_registered_memory(tmp_path: Path) -> None:
    from .tee_support import make_handler
    async with rig(tmp_path) as r:
        s = await session(r)
        buf, size = r.guest.ram.buffer(b"abc")
        await r.guest.call(MsgArg(abi.CMD_REGISTER_SHM, params=[memref(TOUT, buf, size, 0x77)]))
        new = make_handler(r.handler.opts, r.ram)
        new.pending.clear()
        new.restore(r.handler.snapshot())
        await r.handler.backend.close()
        r.handler = new
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_REVERSE, s,
                                           params=[Param(abi.ATTR_TYPE_RMEM_INOUT, 0, 3, 0x77)]))
        assert out.ret == abi.TEEC_SUCCESS and r.guest.ram.read_buffer(buf, 3) == b"cba"
        assert new.report()["buffers"] == 1 and r.ref.lifecycle == [("created", 5)]
        other = make_handler(replace(r.handler.opts, client_id=6), r.ram)
        other.restore(r.handler.snapshot())  # another client's state is not taken over
        assert other.sessions == set() and other.registered == {}


async def test_concurrent_calls_cannot_pass_the_limit_while_buffers_are_read(tmp_path: Path) -> None:
    async with rig(tmp_path, max_calls=1) as r:
        s = await session(r)
        buf, size = r.guest.ram.buffer(b"q" * 100)
        results: list[int] = []

        async def one() -> None:
            regs = await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_SLOW, s, params=[
                Param(VIN, 50), memref(TIN, buf, size)]))
            results.append(regs[0])

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
        # One call got the backend thread; the others hit the limit although none had reached the backend yet.
        assert sorted(results) == [abi.RETURN_OK, abi.RETURN_ETHREAD_LIMIT, abi.RETURN_ETHREAD_LIMIT]


async def test_sve_hint_is_not_part_of_the_function(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        assert (await r.smc(abi.CALLS_UID | (1 << 16)))[:4] == abi.API_UID


async def test_two_vcpus_registering_one_cookie(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        rets: list[int] = []

        async def register() -> None:
            buf, size = r.guest.ram.buffer(b"c" * 5000)
            _, out = await r.guest.call(MsgArg(abi.CMD_REGISTER_SHM, params=[memref(TOUT, buf, size, 0xAB)]))
            rets.append(out.ret)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(register)
            nursery.start_soon(register)
        assert sorted(rets) == [abi.TEEC_SUCCESS, abi.TEEC_ERROR_BAD_PARAMETERS]
        assert (r.handler.account.buffers, r.handler.account.pages) == (1, 2)  # charged once


async def test_supplicant_rpc_with_a_memref(tmp_path: Path) -> None:
    from hvcproxyd.handlers.tee_proxy.reftee import RPC_CMD_SUPPLICANT
    async with rig(tmp_path) as r:
        s = await session(r, RPC_TA)
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_SUPPLICANT, s,
                                           params=[Param(VIN, 5000), Param(VOUT)]))
        assert (out.ret, out.params[1].a) == (abi.TEEC_SUCCESS, 1)  # the bytes went to the guest and came back
        assert r.guest.rpc_seen == [abi.RPC_FUNC_ALLOC] + [abi.RPC_FUNC_CMD] * 3 + [abi.RPC_FUNC_FREE]
        assert r.guest.shm == {} and r.handler.rpc_shm == {} and r.handler.account.pages == 0


async def test_bytes_held_for_calls_are_bounded_too(tmp_path: Path) -> None:
    async with rig(tmp_path, shared_pages=3) as r:
        s = await session(r)
        buf, size = r.guest.ram.buffer(b"m" * 8000)
        _, out = await r.guest.call(MsgArg(abi.CMD_REGISTER_SHM, params=[memref(TOUT, buf, size, 0x51)]))
        assert out.ret == abi.TEEC_SUCCESS
        rm = Param(abi.ATTR_TYPE_RMEM_INOUT, 0, 8000, 0x51)
        _, out = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_REVERSE, s, params=[rm]))
        assert out.ret == abi.TEEC_SUCCESS and r.handler.account.inflight == 0  # released with the call
        # The same registered pages named twice: 16000 bytes held would pass 3 pages' worth.
        assert (await raw_call(r, MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_REVERSE, s, params=[rm, rm])))[0] \
            == abi.RETURN_ENOMEM
        assert r.handler.account.inflight == 0


async def test_a_dead_backend_is_warned_about_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    async with rig(tmp_path, serve_tee=False) as r:
        with caplog.at_level(logging.DEBUG, logger="test.tee"):
            for _ in range(5):
                await r.smc(abi.EXCHANGE_CAPABILITIES)
                await raw_call(r, open_session_arg(ECHO_TA))
        warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert len(warnings) == 1, [rec.getMessage() for rec in warnings]
