"""tee-proxy end to end: the daemon, the VMM simulator over its socket, and the
reference TEE on its own socket.  One VM opens a session, invokes the echo TA,
makes a TA do an RPC round trip (shared memory allocated and freed by the
guest), and closes; two VMs against one reference TEE are seen as two client
IDs whose sessions stay apart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.handlers.tee_proxy import abi
from hvcproxyd.handlers.tee_proxy.msgarg import MsgArg, Param
from hvcproxyd.handlers.tee_proxy.reftee import (
    ECHO_CMD_ECHO,
    ECHO_CMD_WHOAMI,
    ECHO_TA,
    RPC_CMD_SHM_ROUNDTRIP,
    RPC_TA,
    RefTee,
)
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu

from .conftest import Serve
from .tee_guest import GuestRam, GuestTee, memref, open_session_arg

VALUE_IN, VALUE_OUT = abi.ATTR_TYPE_VALUE_INPUT, abi.ATTR_TYPE_VALUE_OUTPUT


def tee_config(name: str, client: int, tee_socket: Path) -> str:
    return f"""
        vm: {name}
        handlers:
          tee:
            type: tee-proxy
            options: {{client_id: {client}, socket: {tee_socket}}}
        rules:
          - match: optee
            action: tee
        """


async def run_guest(sim: Simulator, body: Callable[[GuestTee], object]) -> None:
    done = trio.Event()

    async def boot(cpu: SimVcpu, x0: int) -> None:
        await body(GuestTee(GuestRam(sim.ram, RAM_BASE), cpu.call))  # type: ignore[misc]
        done.set()

    sim.boot = boot
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sim.run)
        await done.wait()
        nursery.cancel_scope.cancel()


async def open_session(tee: GuestTee, ta: object) -> int:
    a0, out = await tee.call(open_session_arg(ta))  # type: ignore[arg-type]
    assert (a0, out.ret) == (abi.RETURN_OK, abi.TEEC_SUCCESS)
    return out.session


async def test_open_invoke_rpc_close(make_config: Callable[[str], VmConfig], tmp_path: Path, serve: Serve) -> None:
    tee_sock = tmp_path / "tee.sock"
    ref = RefTee(threads=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(ref.serve, str(tee_sock))
        daemon = await serve(make_config(tee_config("vm1", 7, tee_sock)))
        sim = Simulator(daemon.config.socket, n_vcpus=1, ram_size=8 << 20)

        async def guest(tee: GuestTee) -> None:
            assert (await tee.raw(abi.CALLS_UID))[:4] == abi.API_UID
            caps = await tee.raw(abi.EXCHANGE_CAPABILITIES, 0)
            assert caps[0] == abi.RETURN_OK and caps[1] & abi.SEC_CAP_DYNAMIC_SHM
            assert not caps[1] & (abi.SEC_CAP_HAVE_RESERVED_SHM | abi.SEC_CAP_VIRTUALIZATION)
            session = await open_session(tee, ECHO_TA)
            src, size = tee.ram.buffer(b"hello, secure world")
            dst, cap = tee.ram.buffer(b"", capacity=64)
            a0, out = await tee.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_ECHO, session, params=[
                memref(abi.ATTR_TYPE_TMEM_INPUT, src, size), memref(abi.ATTR_TYPE_TMEM_OUTPUT, dst, cap)]))
            assert (a0, out.ret) == (abi.RETURN_OK, abi.TEEC_SUCCESS)
            assert out.params[1].b == size
            assert tee.ram.read_buffer(dst, size) == b"hello, secure world"
            rpc_session = await open_session(tee, RPC_TA)
            a0, out = await tee.call(MsgArg(abi.CMD_INVOKE_COMMAND, RPC_CMD_SHM_ROUNDTRIP, rpc_session, params=[
                Param(VALUE_IN, 3 * 4096), Param(VALUE_OUT)]))
            assert (a0, out.ret) == (abi.RETURN_OK, abi.TEEC_SUCCESS)
            assert (out.params[1].a, out.params[1].b) == (3 * 4096, 1)  # allocated by the guest, then freed
            # The RPC flow as Linux sees it: arg buffer allocated, SHM_ALLOC and SHM_FREE commands, arg buffer freed.
            assert tee.rpc_seen == [abi.RPC_FUNC_ALLOC, abi.RPC_FUNC_CMD, abi.RPC_FUNC_CMD, abi.RPC_FUNC_FREE]
            assert tee.shm == {}  # everything the guest allocated for the TEE was freed again
            for s in (session, rpc_session):
                a0, out = await tee.call(MsgArg(abi.CMD_CLOSE_SESSION, session=s))
                assert (a0, out.ret) == (abi.RETURN_OK, abi.TEEC_SUCCESS)
            a0, out = await tee.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_ECHO, session))
            assert out.ret == abi.TEEC_ERROR_BAD_PARAMETERS  # closed means closed

        await run_guest(sim, guest)
        handler = daemon.vm.instances["tee"]
        assert handler.report()["shared_pages"] == 0 and handler.report()["calls"] == 0
        assert set(ref.callers) == {7}  # the guest's w7 (0xBAD) never reached the TEE
        assert ref.lifecycle[0] == ("created", 7)
        sim.close()
        nursery.cancel_scope.cancel()


async def test_two_vms_one_tee(write_config: Callable[..., Path], tmp_path: Path, serve: Serve) -> None:
    tee_sock = tmp_path / "tee.sock"
    ref = RefTee(threads=4)
    async with trio.open_nursery() as nursery:
        await nursery.start(ref.serve, str(tee_sock))
        daemons = []
        for name, client in (("vma", 1), ("vmb", 2)):
            cfg = load_config(write_config(tee_config(name, client, tee_sock), f"{name}.yaml"),
                              socket=str(tmp_path / f"{name}.sock"))
            daemons.append(await serve(cfg))
        sessions: dict[str, int] = {}
        whoami: dict[str, int] = {}
        a_open = trio.Event()

        async def vm(name: str, tee: GuestTee) -> None:
            sessions[name] = await open_session(tee, ECHO_TA)
            a0, out = await tee.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_WHOAMI, sessions[name],
                                            params=[Param(VALUE_OUT)]))
            assert (a0, out.ret) == (abi.RETURN_OK, abi.TEEC_SUCCESS)
            whoami[name] = out.params[0].a
            if name == "vma":
                a_open.set()
            else:
                await a_open.wait()
                # VM b names VM a's session: refused, by the mediator and (were it let through) by the TEE.
                a0, out = await tee.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_WHOAMI, sessions["vma"],
                                                params=[Param(VALUE_OUT)]))
                assert out.ret == abi.TEEC_ERROR_BAD_PARAMETERS and out.params[0].a == 0

        sims = [Simulator(d.config.socket, n_vcpus=1, ram_size=4 << 20, name=n)
                for d, n in zip(daemons, ("vma", "vmb"), strict=True)]
        async with trio.open_nursery() as guests:
            for sim, name in zip(sims, ("vma", "vmb"), strict=True):
                guests.start_soon(run_guest, sim, lambda t, n=name: vm(n, t))
        assert whoami == {"vma": 1, "vmb": 2}
        assert set(ref.clients) == {1, 2}
        assert {ref.clients[1][sessions["vma"]], ref.clients[2][sessions["vmb"]]} == {ECHO_TA}
        assert sessions["vma"] not in ref.clients[2]
        for sim in sims:
            sim.close()
        nursery.cancel_scope.cancel()


async def test_reload_keeps_the_guest_s_sessions(make_config: Callable[[str], VmConfig], tmp_path: Path,
                                                 serve: Serve) -> None:
    from hvcproxyd.handlers.tee_proxy import TeeProxyHandler
    from hvcproxyd.handlers.tee_proxy.reftee import ECHO_CMD_ADD
    tee_sock = tmp_path / "tee.sock"
    ref = RefTee()
    async with trio.open_nursery() as nursery:
        await nursery.start(ref.serve, str(tee_sock))
        daemon = await serve(make_config(tee_config("vm1", 3, tee_sock)))
        sim = Simulator(daemon.config.socket, n_vcpus=1, ram_size=4 << 20)

        async def guest(tee: GuestTee) -> None:
            s = await open_session(tee, ECHO_TA)
            old = daemon.vm.instances["tee"]
            assert await daemon.reload()
            new = daemon.vm.instances["tee"]
            assert isinstance(new, TeeProxyHandler) and new is not old and s in new.sessions
            a0, out = await tee.call(MsgArg(abi.CMD_INVOKE_COMMAND, ECHO_CMD_ADD, s,
                                            params=[Param(VALUE_IN, 2, 3), Param(VALUE_OUT)]))
            assert (a0, out.ret, out.params[1].a) == (abi.RETURN_OK, abi.TEEC_SUCCESS, 5)
            assert isinstance(old, TeeProxyHandler)
            with trio.fail_after(5):  # the lifecycle sidecar closes the old instance's connection
                while old.backend.info is not None:
                    await trio.sleep(0.01)

        await run_guest(sim, guest)
        assert ref.lifecycle == [("created", 3)]  # a reload is not a new VM
        sim.close()
        nursery.cancel_scope.cancel()
