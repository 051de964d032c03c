"""The reference TEE: a small trusted OS behind the ``socket`` backend's
protocol, for the tests, the demo config and as a model for real attachments.

It keeps what OP-TEE's virtualization support keeps: a set of known clients
(VM_CREATED / VM_DESTROYED), each with its own sessions, so one client cannot
name another's session; a fixed number of threads (ETHREAD_LIMIT past it);
and RPCs that suspend a thread until the normal world answers.  Its trusted
applications:

- **echo** (:data:`ECHO_TA`): ECHO copies memref 0 into memref 1 (SHORT_BUFFER
  with the size needed if it does not fit), REVERSE reverses memref 0 in
  place, ADD puts value 0's a+b in value 1's a, WHOAMI answers the client ID
  and session, SLOW sleeps value 0's a milliseconds (a TEE that takes its time).
- **rpc** (:data:`RPC_TA`): SHM_ROUNDTRIP asks the normal world for shared
  memory of value 0's a bytes (OPTEE_RPC_CMD_SHM_ALLOC), frees it again and
  answers the size it got; GET_TIME asks the normal world for the time;
  INTERRUPT lets a foreign interrupt through before answering; FREE_FOREIGN
  makes RPCs a mediator must not pass on (freeing memory the guest never gave
  the TEE, a memref outside such memory) and answers their results;
  SUPPLICANT does what a TA does to reach tee-supplicant (application SHM
  from the normal world, a command with a memref in it, the answer read back).
- **device enumeration** (:data:`DEVICE_ENUM_PTA`), the pseudo-TA Linux's
  ``optee`` driver queries at probe: GET_DEVICES lists the echo TA's UUID,
  GET_DEVICES_SUPP and GET_DEVICES_RPMB list nothing.

Run it with ``python -m hvcproxyd.handlers.tee_proxy.reftee SOCKET``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import abi
from .backend import BackendError, BParam, Done, ForeignIntr, Msg, Refused, RpcCmd, Step, step_to_json
from .framing import Decoder, FrameError, encode

log = logging.getLogger("hvcproxyd.reftee")

ECHO_TA = uuid.UUID("5e1f0c2a-7d4b-4c8e-9a61-0e2f4b6d8a10")
RPC_TA = uuid.UUID("5e1f0c2a-7d4b-4c8e-9a61-0e2f4b6d8a11")
DEVICE_ENUM_PTA = uuid.UUID("7011a688-ddde-4053-a5a9-7b3c4ddf13b8")

ECHO_CMD_ECHO, ECHO_CMD_REVERSE, ECHO_CMD_ADD, ECHO_CMD_WHOAMI, ECHO_CMD_SLOW = range(5)
RPC_CMD_SHM_ROUNDTRIP, RPC_CMD_GET_TIME, RPC_CMD_INTERRUPT, RPC_CMD_FREE_FOREIGN, RPC_CMD_SUPPLICANT = range(5)
#: An RPC command outside OP-TEE's numbers, for the tests' normal world to answer the way
#: tee-supplicant answers its commands: it reverses the bytes of memref 0 in place.
RPC_CMD_TEST_REVERSE = 0x3F0
PTA_CMD_GET_DEVICES, PTA_CMD_GET_DEVICES_SUPP, PTA_CMD_GET_DEVICES_RPMB = range(3)

DEFAULT_CAPS = abi.SEC_CAP_DYNAMIC_SHM | abi.SEC_CAP_MEMREF_NULL | abi.SEC_CAP_VIRTUALIZATION
REVISION = (4, 0)


class TaError(Exception):
    def __init__(self, ret: int, origin: int = abi.TEEC_ORIGIN_TRUSTED_APP) -> None:
        super().__init__(f"{ret:#x}")
        self.ret, self.origin = ret, origin


def uuid_of(p0: BParam) -> uuid.UUID:
    """The TA UUID in an OPEN_SESSION's first meta parameter: Linux copies the
    16 octets into value.a and value.b as they lie in memory (little-endian words)."""
    return uuid.UUID(bytes=p0.a.to_bytes(8, "little") + p0.b.to_bytes(8, "little"))


def uuid_params(u: uuid.UUID) -> tuple[int, int]:
    return int.from_bytes(u.bytes[:8], "little"), int.from_bytes(u.bytes[8:], "little")


@dataclass(slots=True)
class Thread:
    """A yielding call in progress: answers go to request ``rid``; an RPC's answer
    arrives on ``answers`` with the id of the rpc-return that carried it."""

    tid: int
    client: int
    rid: int
    reply: Callable[[dict[str, Any]], Awaitable[None]]
    answers: tuple[trio.MemorySendChannel[tuple[int, Msg | None]], trio.MemoryReceiveChannel[tuple[int, Msg | None]]] \
        = field(default_factory=lambda: trio.open_memory_channel[tuple[int, Msg | None]](1))

    async def _suspend(self, step: Step) -> Msg | None:
        await self.reply({"id": self.rid, **step_to_json(step)})
        self.rid, answer = await self.answers[1].receive()
        return answer

    async def rpc(self, cmd: int, *params: BParam) -> Msg:
        answer = await self._suspend(RpcCmd(self.tid, Msg(cmd, params=list(params))))
        if answer is None:
            raise TaError(abi.TEEC_ERROR_COMMUNICATION, abi.TEEC_ORIGIN_COMMS)
        return answer

    async def foreign_interrupt(self) -> None:
        await self._suspend(ForeignIntr(self.tid))


def _memref(params: list[BParam], i: int, *, need_data: bool = True) -> BParam:
    if i >= len(params) or not params[i].is_memref or (need_data and params[i].data is None):
        raise TaError(abi.TEEC_ERROR_BAD_PARAMETERS)
    return params[i]


def _value(params: list[BParam], i: int) -> BParam:
    if i >= len(params) or params[i].type not in abi.VALUE_TYPES:
        raise TaError(abi.TEEC_ERROR_BAD_PARAMETERS)
    return params[i]


def _put(out: BParam, data: bytes) -> None:
    """Write ``data`` into an output memref, or say how much room it needs."""
    if out.data is None or len(data) > out.size:
        out.size = len(data)
        raise TaError(abi.TEEC_ERROR_SHORT_BUFFER)
    out.data, out.size = data, len(data)


async def echo_ta(th: Thread, session: int, func: int, params: list[BParam]) -> None:
    if func == ECHO_CMD_ECHO:
        src = _memref(params, 0)
        _put(_memref(params, 1, need_data=False), src.data or b"")
    elif func == ECHO_CMD_REVERSE:
        buf = _memref(params, 0)
        buf.data = bytes(reversed(buf.data or b""))
    elif func == ECHO_CMD_ADD:
        a = _value(params, 0)
        _value(params, 1).a = (a.a + a.b) & 0xFFFF_FFFF_FFFF_FFFF
    elif func == ECHO_CMD_WHOAMI:
        out = _value(params, 0)
        out.a, out.b = th.client, session
    elif func == ECHO_CMD_SLOW:
        await trio.sleep(_value(params, 0).a / 1000)
    else:
        raise TaError(abi.TEEC_ERROR_NOT_SUPPORTED)


async def rpc_ta(th: Thread, session: int, func: int, params: list[BParam]) -> None:
    if func == RPC_CMD_SHM_ROUNDTRIP:
        size = _value(params, 0).a
        got = await th.rpc(abi.RPC_CMD_SHM_ALLOC, BParam(abi.ATTR_TYPE_VALUE_INPUT, abi.RPC_SHM_TYPE_KERNEL, size))
        if got.ret != abi.TEEC_SUCCESS or not got.params or not got.params[0].is_memref or not got.params[0].shm:
            raise TaError(abi.TEEC_ERROR_OUT_OF_MEMORY)
        shm = got.params[0]
        freed = await th.rpc(abi.RPC_CMD_SHM_FREE,
                             BParam(abi.ATTR_TYPE_VALUE_INPUT, abi.RPC_SHM_TYPE_KERNEL, shm.shm))
        out = _value(params, 1)
        out.a, out.b = shm.size, int(freed.ret == abi.TEEC_SUCCESS)
    elif func == RPC_CMD_GET_TIME:
        got = await th.rpc(abi.RPC_CMD_GET_TIME, BParam(abi.ATTR_TYPE_VALUE_OUTPUT))
        if got.ret != abi.TEEC_SUCCESS or not got.params:
            raise TaError(got.ret or abi.TEEC_ERROR_GENERIC)
        out = _value(params, 0)
        out.a, out.b = got.params[0].a, got.params[0].b
    elif func == RPC_CMD_INTERRUPT:
        await th.foreign_interrupt()
        _value(params, 0).a = 1
    elif func == RPC_CMD_SUPPLICANT:
        # What a TA does to reach tee-supplicant: application SHM from the normal world, a command whose
        # memref lies in it, the answer read back, the SHM freed.  value 1 = 1 if the bytes came back reversed.
        text = bytes(i & 0xFF for i in range(1, 1 + min(_value(params, 0).a, 1 << 16)))
        got = await th.rpc(abi.RPC_CMD_SHM_ALLOC, BParam(abi.ATTR_TYPE_VALUE_INPUT, abi.RPC_SHM_TYPE_APPL,
                                                         len(text) + 16))
        if got.ret != abi.TEEC_SUCCESS or not got.params or not got.params[0].shm:
            raise TaError(abi.TEEC_ERROR_OUT_OF_MEMORY)
        cookie = got.params[0].shm
        done = await th.rpc(RPC_CMD_TEST_REVERSE, BParam(abi.ATTR_TYPE_TMEM_INOUT, 16, size=len(text), data=text,
                                                          shm=cookie))
        await th.rpc(abi.RPC_CMD_SHM_FREE, BParam(abi.ATTR_TYPE_VALUE_INPUT, abi.RPC_SHM_TYPE_APPL, cookie))
        back = done.params[0].data if done.params else None
        _value(params, 1).a = int(done.ret == abi.TEEC_SUCCESS and back == text[::-1])
    elif func == RPC_CMD_FREE_FOREIGN:
        # Asks the normal world to free memory it never allocated for this TEE (value 0's a as the cookie),
        # then passes a memref in an RPC; value 1 = the two answers' results.
        freed = await th.rpc(abi.RPC_CMD_SHM_FREE,
                             BParam(abi.ATTR_TYPE_VALUE_INPUT, abi.RPC_SHM_TYPE_KERNEL, _value(params, 0).a))
        memref = await th.rpc(abi.RPC_CMD_GET_TIME, BParam(abi.ATTR_TYPE_TMEM_OUTPUT, size=16, data=b""))
        out = _value(params, 1)
        out.a, out.b = freed.ret, memref.ret
    else:
        raise TaError(abi.TEEC_ERROR_NOT_SUPPORTED)


async def device_enum_pta(th: Thread, session: int, func: int, params: list[BParam]) -> None:
    if func == PTA_CMD_GET_DEVICES:
        devices = ECHO_TA.bytes
    elif func in (PTA_CMD_GET_DEVICES_SUPP, PTA_CMD_GET_DEVICES_RPMB):
        devices = b""
    else:
        raise TaError(abi.TEEC_ERROR_NOT_SUPPORTED)
    _put(_memref(params, 0, need_data=False), devices)


TAS: dict[uuid.UUID, Callable[[Thread, int, int, list[BParam]], Awaitable[None]]] = {
    ECHO_TA: echo_ta, RPC_TA: rpc_ta, DEVICE_ENUM_PTA: device_enum_pta,
}


class RefTee:
    """The TEE's state; ``serve`` puts it on a UNIX socket."""

    def __init__(self, threads: int = 4, caps: int = DEFAULT_CAPS) -> None:
        self.threads = threads
        self.caps = caps
        #: client ID -> its sessions (session ID -> TA UUID)
        self.clients: dict[int, dict[int, uuid.UUID]] = {}
        self.running: dict[int, Thread] = {}
        #: Every client ID a call came from, in order (what the tests check w7 against).
        self.callers: list[int] = []
        self.lifecycle: list[tuple[str, int]] = []
        self._sessions = itertools.count(1)
        self._tids = itertools.count(1)

    async def serve(self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self._connection, [listener])
        finally:
            with trio.move_on_after(0.5):
                await listener.aclose()
            if os.path.exists(path):
                os.unlink(path)

    async def _connection(self, stream: trio.SocketStream) -> None:
        lock = trio.Lock()
        decoder = Decoder()

        async def reply(obj: dict[str, Any]) -> None:
            async with lock:
                await stream.send_all(encode(obj))

        try:
            async with trio.open_nursery() as nursery:
                while data := await stream.receive_some(1 << 16):
                    for frame in decoder.feed(data):
                        nursery.start_soon(self._request, frame, reply)
                nursery.cancel_scope.cancel()
        except (FrameError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
            log.warning("reftee: connection dropped: %s", err)

    async def _request(self, frame: dict[str, Any], reply: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        rid = frame.get("id")
        if not isinstance(rid, int):
            return
        try:
            answer = await self._answer(rid, frame, reply)
        except BackendError as err:
            log.warning("reftee: bad request %s: %s", rid, err)
            answer = {"code": abi.RETURN_EBADCMD}
        if answer is not None:
            await reply({"id": rid, **answer})

    async def _answer(self, rid: int, frame: dict[str, Any],
                      reply: Callable[[dict[str, Any]], Awaitable[None]]) -> dict[str, Any] | None:
        op, client = frame.get("op"), frame.get("client")
        if op == "hello":
            return {"threads": self.threads, "caps": self.caps, "revision": list(REVISION)}
        if not isinstance(client, int) or isinstance(client, bool):
            return {"code": abi.RETURN_EBADCMD}
        if op == "vm-created":
            log.info("reftee: VM_CREATED client %d", client)
            self.lifecycle.append(("created", client))
            if client == 0 or client in self.clients:
                return {"code": abi.RETURN_ENOTAVAIL}
            self.clients[client] = {}
            return {"code": abi.RETURN_OK}
        if op == "vm-destroyed":
            log.info("reftee: VM_DESTROYED client %d", client)
            self.lifecycle.append(("destroyed", client))
            self.clients.pop(client, None)
            for th in [t for t in self.running.values() if t.client == client]:
                th.answers[0].close()
            return {"code": abi.RETURN_OK}
        if op == "call":
            self.callers.append(client)
            if client not in self.clients:
                return {"code": abi.RETURN_ENOTAVAIL}
            if len(self.running) >= self.threads:
                return {"code": abi.RETURN_ETHREAD_LIMIT}
            th = Thread(next(self._tids), client, rid, reply)
            self.running[th.tid] = th
            try:
                done = await self._run(th, Msg.from_json(frame.get("msg")))
            finally:
                del self.running[th.tid]
            if done is not None:
                await reply({"id": th.rid, **step_to_json(Done(done))})
            return None
        if op == "rpc-return":
            tid = frame.get("thread")
            thread = self.running.get(tid) if isinstance(tid, int) else None
            if thread is None or thread.client != client:
                return step_to_json(Refused(abi.RETURN_ERESUME))
            raw = frame.get("msg")
            try:
                thread.answers[0].send_nowait((rid, None if raw is None else Msg.from_json(raw)))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                return step_to_json(Refused(abi.RETURN_EBUSY))
            return None
        return {"code": abi.RETURN_EBADCMD}

    async def _run(self, th: Thread, msg: Msg) -> Msg | None:
        """One yielding call; None if its client went away mid-RPC."""
        sessions = self.clients[th.client]
        msg.ret, msg.ret_origin = abi.TEEC_SUCCESS, abi.TEEC_ORIGIN_TEE
        try:
            if msg.cmd == abi.CMD_OPEN_SESSION:
                meta = msg.params[:2]
                if len(meta) < 2 or not all(p.attr & abi.ATTR_META for p in meta):
                    raise TaError(abi.TEEC_ERROR_BAD_PARAMETERS, abi.TEEC_ORIGIN_TEE)
                ta = uuid_of(meta[0])
                if ta not in TAS:
                    raise TaError(abi.TEEC_ERROR_ITEM_NOT_FOUND, abi.TEEC_ORIGIN_TEE)
                msg.session = next(self._sessions)
                sessions[msg.session] = ta
            elif msg.cmd == abi.CMD_INVOKE_COMMAND:
                ta = sessions.get(msg.session)  # type: ignore[assignment]
                if ta is None:
                    raise TaError(abi.TEEC_ERROR_BAD_PARAMETERS, abi.TEEC_ORIGIN_TEE)
                await TAS[ta](th, msg.session, msg.func, msg.params)
                msg.ret_origin = abi.TEEC_ORIGIN_TRUSTED_APP
            elif msg.cmd == abi.CMD_CLOSE_SESSION:
                if sessions.pop(msg.session, None) is None:
                    raise TaError(abi.TEEC_ERROR_BAD_PARAMETERS, abi.TEEC_ORIGIN_TEE)
            elif msg.cmd != abi.CMD_CANCEL:
                raise TaError(abi.TEEC_ERROR_NOT_SUPPORTED, abi.TEEC_ORIGIN_TEE)
        except TaError as err:
            msg.ret, msg.ret_origin = err.ret, err.origin
        except trio.EndOfChannel:
            return None  # VM_DESTROYED while the call waited for the normal world
        except Exception:  # a TA bug costs its caller the call, not every client its connection
            log.exception("reftee: TA failed")
            msg.ret, msg.ret_origin = abi.TEEC_ERROR_GENERIC, abi.TEEC_ORIGIN_TEE
        return msg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hvcproxyd-reftee", description="the reference TEE for hvcproxyd's "
                                     "tee-proxy handler, on a UNIX socket")
    parser.add_argument("socket", help="the UNIX socket to listen on: a tee-proxy handler's `socket` option")
    parser.add_argument("--threads", type=int, default=4,
                        help="TEE threads, i.e. how many calls may be in progress at once (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be 1 or more, not {args.threads}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("reference TEE on %s (%d threads) at %s", args.socket, args.threads, time.strftime("%H:%M:%S"))
    try:
        trio.run(RefTee(args.threads).serve, args.socket)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
