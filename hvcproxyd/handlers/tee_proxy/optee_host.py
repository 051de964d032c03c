"""The ``optee-host`` backend: the host's own OP-TEE, through the Linux TEE
subsystem (``/dev/tee*``, include/uapi/linux/tee.h).

Through ``/dev/tee0`` the host kernel is the TEE's only client: OP-TEE cannot
tell one VM from another, and the host kernel answers the TEE's RPCs itself
(its own shared memory, tee-supplicant).  So each VM gets its own device
context, opened at VM_CREATED and closed at VM_DESTROYED (which closes every
session the VM left open), and memrefs travel through host shared memory
(TEE_IOC_SHM_ALLOC) the backend copies in and out.  Two VMs on one host TEE
would share one client identity and one set of TA storage, so the device is
locked exclusively (``flock``) unless ``allow_shared_host_tee`` says the host's
OP-TEE is built with virtualization support (CFG_NS_VIRTUALIZATION) and its
TAs keep their clients apart.

The ioctls block, so each runs in a worker thread; one that outlasts its
budget becomes :class:`Pending` and is collected by ``wait``.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import mmap
import os
import struct
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from . import abi
from .backend import Backend, BackendError, BackendInfo, BParam, Done, Msg, Pending, Refused, Step

# -- include/uapi/linux/tee.h
TEE_IOC_MAGIC = 0xA4


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (TEE_IOC_MAGIC << 8) | nr


_READ, _WRITE = 2, 1
TEE_IOC_VERSION = _ioc(_READ, 0, 12)
TEE_IOC_SHM_ALLOC = _ioc(_READ | _WRITE, 1, 16)
TEE_IOC_OPEN_SESSION = _ioc(_READ, 2, 16)
TEE_IOC_INVOKE = _ioc(_READ, 3, 16)
TEE_IOC_CANCEL = _ioc(_READ, 4, 8)
TEE_IOC_CLOSE_SESSION = _ioc(_READ, 5, 4)
TEE_IMPL_ID_OPTEE = 1
TEE_GEN_CAP_MEMREF_NULL = 1 << 3
TEE_MEMREF_NULL = (1 << 64) - 1
TEE_IOCTL_LOGIN_PUBLIC = 0
#: The ioctl parameter types are OPTEE_MSG's value types, memrefs 5..7 (like RMEM).
_MEMREF_BASE = 5
_BUF_DATA = struct.Struct("<QQ")
_VERSION = struct.Struct("<III")
_SHM_ALLOC = struct.Struct("<QIi")
_OPEN = struct.Struct("<16s16sIIIIII")
_INVOKE = struct.Struct("<IIIIII")
_PARAM = struct.Struct("<4Q")
#: Host threads the backend occupies at once (each ioctl blocks one).
THREADS = 8
#: Opening the device and TEE_IOC_VERSION, which have no budget of their own.
OPEN_TIMEOUT = 2.0
T = TypeVar("T")


class TeeDevice(Protocol):
    """The system calls this backend makes, so a test can stand in for the kernel
    (tests/tee_fake_device.py): exactly these and nothing else."""

    def open(self, path: str) -> int: ...
    def close(self, fd: int) -> None: ...
    def flock(self, fd: int, exclusive: bool) -> bool: ...
    def ioctl(self, fd: int, request: int, buf: bytearray) -> int: ...
    def map(self, fd: int, size: int) -> Any: ...


class LinuxTee:
    """The real thing: os.open, fcntl.ioctl, flock(LOCK_EX|LOCK_NB), mmap."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def flock(self, fd: int, exclusive: bool) -> bool:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def ioctl(self, fd: int, request: int, buf: bytearray) -> int:
        return int(fcntl.ioctl(fd, request, buf, True))

    def map(self, fd: int, size: int) -> Any:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


@dataclass(slots=True)
class _Ctx:
    fd: int
    sessions: set[int]


class OpteeHostBackend(Backend):
    SHAREABLE = False

    def __init__(self, device: str, *, allow_shared: bool = False, system: TeeDevice | None = None) -> None:
        self.device = device
        self.allow_shared = allow_shared
        self.sys: TeeDevice = system or LinuxTee()
        self.ctx: dict[int, _Ctx] = {}
        self.info: BackendInfo | None = None
        self._futures: dict[int, Future[Step]] = {}
        self._tickets = itertools.count(1)

    async def _off_loop(self, fn: Callable[[], T], budget: float, what: str) -> T:
        """A blocking system call in a worker thread, so the daemon's loop never
        waits on the kernel; past ``budget`` it is left to finish on its own."""
        with trio.move_on_after(budget):
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        raise BackendError(f"{what} on {self.device} did not return within {budget:.1f}s")

    async def open(self) -> BackendInfo:
        if self.info is not None:
            return self.info
        try:
            impl, gen_caps = await self._off_loop(self._probe, OPEN_TIMEOUT, "TEE_IOC_VERSION")
        except OSError as err:
            raise BackendError(f"cannot query {self.device}: {err}") from err
        if impl != TEE_IMPL_ID_OPTEE:
            raise BackendError(f"{self.device} is not OP-TEE (implementation {impl})")
        caps = abi.SEC_CAP_DYNAMIC_SHM | (abi.SEC_CAP_MEMREF_NULL if gen_caps & TEE_GEN_CAP_MEMREF_NULL else 0)
        self.info = BackendInfo(THREADS, caps, (0, 0))
        return self.info

    def _probe(self) -> tuple[int, int]:
        fd = self.sys.open(self.device)
        try:
            buf = bytearray(_VERSION.size)
            self.sys.ioctl(fd, TEE_IOC_VERSION, buf)
        finally:
            self.sys.close(fd)
        impl, _impl_caps, gen_caps = _VERSION.unpack(buf)
        return impl, gen_caps

    async def close(self) -> None:
        for client in list(self.ctx):
            await self.vm_destroyed(client, OPEN_TIMEOUT)
        self.info = None

    async def vm_created(self, client: int, budget: float) -> int:
        await self.open()
        if client in self.ctx:
            return abi.RETURN_ENOTAVAIL
        try:
            fd = await self._off_loop(self._claim, budget, "open")
        except OSError:
            return abi.RETURN_ENOTAVAIL
        if fd is None:
            return abi.RETURN_ENOTAVAIL  # another VM holds this host TEE and it cannot keep VMs apart
        self.ctx[client] = _Ctx(fd, set())
        return abi.RETURN_OK

    def _claim(self) -> int | None:
        """A context of the VM's own, locked exclusively unless the host TEE may be shared."""
        fd = self.sys.open(self.device)
        if not self.sys.flock(fd, exclusive=not self.allow_shared):
            self.sys.close(fd)
            return None
        return fd

    async def vm_destroyed(self, client: int, budget: float) -> int:
        ctx = self.ctx.pop(client, None)
        if ctx is not None:
            # Closing the context makes the kernel close its sessions in the TEE, and drops the lock.
            await self._off_loop(lambda: self.sys.close(ctx.fd), budget, "close")
        return abi.RETURN_OK

    async def call(self, client: int, msg: Msg, budget: float) -> Step:
        ctx = self.ctx.get(client)
        if ctx is None:
            return Refused(abi.RETURN_ENOTAVAIL)
        future: Future[Step] = Future()

        def run() -> None:
            try:
                future.set_result(self._blocking_call(ctx, msg))
            except BaseException as err:  # handed to the waiter, who raises it in trio
                future.set_exception(err)

        threading.Thread(target=run, name="optee-host ioctl", daemon=True).start()
        ticket = next(self._tickets)
        self._futures[ticket] = future
        return await self.wait(client, ticket, budget)

    async def wait(self, client: int, ticket: int, budget: float) -> Step:
        future = self._futures.get(ticket)
        if future is None:
            raise BackendError(f"no call {ticket} in progress")
        with trio.move_on_after(budget):
            while not future.done():
                await trio.sleep(0.002)
        if not future.done():
            return Pending(ticket)
        del self._futures[ticket]
        try:
            return future.result()
        except OSError as err:
            raise BackendError(f"{self.device}: {err}") from err

    async def rpc_return(self, client: int, thread: int, msg: Msg | None, budget: float) -> Step:
        raise BackendError("the host kernel answers the host TEE's RPCs; none reach the mediator")

    def forget(self, client: int) -> None:
        self._futures.clear()

    # -- the ioctls, in a worker thread
    def _blocking_call(self, ctx: _Ctx, msg: Msg) -> Step:
        out = Msg(msg.cmd, msg.func, msg.session, msg.cancel_id, params=[BParam(p.attr, p.a, p.b, p.c, p.size,
                                                                                 p.data, p.shm) for p in msg.params])
        if msg.cmd == abi.CMD_CLOSE_SESSION:
            self.sys.ioctl(ctx.fd, TEE_IOC_CLOSE_SESSION, bytearray(struct.pack("<I", msg.session)))
            ctx.sessions.discard(msg.session)
            out.ret, out.ret_origin = abi.TEEC_SUCCESS, abi.TEEC_ORIGIN_TEE
            return Done(out)
        if msg.cmd == abi.CMD_CANCEL:
            self.sys.ioctl(ctx.fd, TEE_IOC_CANCEL, bytearray(struct.pack("<II", msg.cancel_id, msg.session)))
            return Done(out)
        if msg.cmd == abi.CMD_OPEN_SESSION:
            meta, params = out.params[:2], out.params[2:]
            if len(meta) < 2 or not all(p.attr & abi.ATTR_META for p in meta):
                out.ret, out.ret_origin = abi.TEEC_ERROR_BAD_PARAMETERS, abi.TEEC_ORIGIN_COMMS
                return Done(out)
            ta = uuid.UUID(bytes=meta[0].a.to_bytes(8, "little") + meta[0].b.to_bytes(8, "little"))
            head = _OPEN.pack(ta.bytes, b"\0" * 16, TEE_IOCTL_LOGIN_PUBLIC, msg.cancel_id, 0, 0, 0, len(params))
        elif msg.cmd == abi.CMD_INVOKE_COMMAND:
            if msg.session not in ctx.sessions:
                out.ret, out.ret_origin = abi.TEEC_ERROR_BAD_PARAMETERS, abi.TEEC_ORIGIN_COMMS
                return Done(out)
            params = out.params
            head = _INVOKE.pack(msg.func, msg.session, msg.cancel_id, 0, 0, len(params))
        else:
            out.ret, out.ret_origin = abi.TEEC_ERROR_NOT_SUPPORTED, abi.TEEC_ORIGIN_COMMS
            return Done(out)
        shms: list[tuple[int, Any] | None] = []
        try:
            body = bytearray(head)
            for p in params:
                body += self._param(ctx, p, shms)
            req = TEE_IOC_OPEN_SESSION if msg.cmd == abi.CMD_OPEN_SESSION else TEE_IOC_INVOKE
            self.sys.ioctl(ctx.fd, req, _buf_data(body))
            if msg.cmd == abi.CMD_OPEN_SESSION:
                *_, session, ret, origin, _n = _OPEN.unpack_from(body)
                out.session = session
                if ret == abi.TEEC_SUCCESS:
                    ctx.sessions.add(session)
                base = _OPEN.size
            else:
                _f, _s, _c, ret, origin, _n = _INVOKE.unpack_from(body)
                base = _INVOKE.size
            out.ret, out.ret_origin = ret, origin
            for i, p in enumerate(params):
                _attr, a, b, c = _PARAM.unpack_from(body, base + i * _PARAM.size)
                if p.is_memref:
                    p.size = b
                    shm = shms[i]
                    if shm is not None and p.type != abi.ATTR_TYPE_TMEM_INPUT:
                        p.data = bytes(shm[1][:min(b, len(shm[1]))])
                else:
                    p.a, p.b, p.c = a, b, c
        finally:
            for shm in shms:
                if shm is not None:
                    shm[1].close()
                    self.sys.close(shm[0])
        return Done(out)

    def _param(self, ctx: _Ctx, p: BParam, shms: list[tuple[int, Any] | None]) -> bytes:
        if not p.is_memref:
            shms.append(None)
            return _PARAM.pack(p.type, p.a, p.b, p.c)
        kind = _MEMREF_BASE + (p.type & 0x3) - 1
        if p.data is None:
            shms.append(None)
            return _PARAM.pack(kind, 0, p.size, TEE_MEMREF_NULL)
        req = bytearray(_SHM_ALLOC.pack(max(p.size, 1), 0, 0))
        fd = self.sys.ioctl(ctx.fd, TEE_IOC_SHM_ALLOC, req)
        _size, _flags, shm_id = _SHM_ALLOC.unpack(req)
        m = self.sys.map(fd, max(p.size, 1))
        m[:len(p.data)] = p.data
        shms.append((fd, m))
        return _PARAM.pack(kind, 0, p.size, shm_id)


def _buf_data(body: bytearray) -> bytearray:
    """struct tee_ioctl_buf_data naming ``body`` (kept alive by the caller)."""
    holder = (ctypes.c_char * len(body)).from_buffer(body)
    return bytearray(_BUF_DATA.pack(ctypes.addressof(holder), len(body)))


__all__ = ["LinuxTee", "OpteeHostBackend", "TeeDevice"]
