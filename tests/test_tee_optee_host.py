"""The optee-host backend against a fake of the Linux TEE ioctl surface.

This machine has no OP-TEE (no /dev/tee0): the fake below stands in for the
kernel's TEE subsystem at exactly the system calls the backend makes
(open/close/flock/ioctl/mmap, include/uapi/linux/tee.h structures decoded
from the bytes the backend passes), with an echo TA behind it."""

from __future__ import annotations

import ctypes
import itertools
import struct
import uuid
from pathlib import Path

import pytest

from hvcproxyd.handlers.tee_proxy import abi
from hvcproxyd.handlers.tee_proxy.backend import BackendError, BParam, Done, Msg, Refused
from hvcproxyd.handlers.tee_proxy.optee_host import (
    TEE_IOC_CLOSE_SESSION,
    TEE_IOC_INVOKE,
    TEE_IOC_OPEN_SESSION,
    TEE_IOC_SHM_ALLOC,
    TEE_IOC_VERSION,
    TEE_MEMREF_NULL,
    OpteeHostBackend,
)
from hvcproxyd.handlers.tee_proxy.reftee import uuid_params

TA = uuid.UUID("11111111-2222-3333-4444-555555555555")


class FakeMap(bytearray):
    closed = False

    def close(self) -> None:
        self.closed = True


class FakeTeeDevice:
    """The kernel side: one context per open fd, sessions per context."""

    def __init__(self, impl: int = 1) -> None:
        self.impl = impl
        self.fds = itertools.count(10)
        self.open_fds: set[int] = set()
        self.locks: dict[int, bool] = {}
        self.shm: dict[int, FakeMap] = {}
        self.shm_fd: dict[int, int] = {}
        self.sessions: dict[int, set[int]] = {}
        self.ids = itertools.count(1)

    def open(self, path: str) -> int:
        fd = next(self.fds)
        self.open_fds.add(fd)
        self.sessions[fd] = set()
        return fd

    def close(self, fd: int) -> None:
        self.open_fds.discard(fd)
        self.locks.pop(fd, None)
        self.sessions.pop(fd, None)

    def flock(self, fd: int, exclusive: bool) -> bool:
        if any(ex or exclusive for other, ex in self.locks.items() if other != fd):
            return False
        self.locks[fd] = exclusive
        return True

    def map(self, fd: int, size: int) -> FakeMap:
        m = FakeMap(size)
        self.shm[self.shm_fd[fd]] = m
        return m

    def ioctl(self, fd: int, request: int, buf: bytearray) -> int:
        assert fd in self.open_fds
        if request == TEE_IOC_VERSION:
            buf[:] = struct.pack("<III", self.impl, 1, 1 << 3)
            return 0
        if request == TEE_IOC_SHM_ALLOC:
            size, flags, _ = struct.unpack("<QIi", buf)
            shm_id = next(self.ids)
            buf[:] = struct.pack("<QIi", size, flags, shm_id)
            shm_fd = next(self.fds)
            self.open_fds.add(shm_fd)
            self.shm_fd[shm_fd] = shm_id
            return shm_fd
        if request == TEE_IOC_CLOSE_SESSION:
            self.sessions[fd].discard(struct.unpack("<I", buf)[0])
            return 0
        addr, length = struct.unpack("<QQ", buf)
        body = (ctypes.c_char * length).from_address(addr)
        if request == TEE_IOC_OPEN_SESSION:
            ta, _clnt, login, _cancel, _s, _r, _o, n = struct.unpack_from("<16s16sIIIIII", body)
            assert login == 0  # always PUBLIC: a guest's claimed login is not the host's to grant
            ok = uuid.UUID(bytes=ta) == TA
            session = next(self.ids) if ok else 0
            if ok:
                self.sessions[fd].add(session)
            struct.pack_into("<III", body, 40, session, 0 if ok else abi.TEEC_ERROR_ITEM_NOT_FOUND, 3)
            return 0
        assert request == TEE_IOC_INVOKE
        _func, session, _c, _r, _o, n = struct.unpack_from("<6I", body)
        if session not in self.sessions[fd]:
            struct.pack_into("<II", body, 12, abi.TEEC_ERROR_BAD_PARAMETERS, 3)
            return 0
        params = [list(struct.unpack_from("<4Q", body, 24 + 32 * i)) for i in range(n)]
        # echo: memref 0 (input) into memref 1 (output); value 2 gets a+1
        src, dst = params[0], params[1]
        data = bytes(self.shm[src[3]][:src[2]])
        if dst[3] == TEE_MEMREF_NULL or dst[2] < len(data):
            dst[2] = len(data)
            ret = abi.TEEC_ERROR_SHORT_BUFFER
        else:
            self.shm[dst[3]][:len(data)] = data
            dst[2], ret = len(data), 0
        if n > 2:
            params[2][3] = params[2][2] + 1
        for i, p in enumerate(params):
            struct.pack_into("<4Q", body, 24 + 32 * i, *p)
        struct.pack_into("<II", body, 12, ret, 4)
        return 0


def open_msg() -> Msg:
    a, b = uuid_params(TA)
    return Msg(abi.CMD_OPEN_SESSION, params=[BParam(abi.ATTR_TYPE_VALUE_INPUT | abi.ATTR_META, a, b),
                                             BParam(abi.ATTR_TYPE_VALUE_INPUT | abi.ATTR_META)])


async def test_open_invoke_close_through_ioctls() -> None:
    dev = FakeTeeDevice()
    be = OpteeHostBackend("/dev/tee0", system=dev)
    info = await be.open()
    assert info.sec_caps == abi.SEC_CAP_DYNAMIC_SHM | abi.SEC_CAP_MEMREF_NULL
    assert await be.vm_created(3, 1) == abi.RETURN_OK
    step = await be.call(3, open_msg(), 1)
    assert isinstance(step, Done) and step.msg.ret == 0
    session = step.msg.session
    msg = Msg(abi.CMD_INVOKE_COMMAND, 0, session, params=[
        BParam(abi.ATTR_TYPE_TMEM_INPUT, size=5, data=b"hello"), BParam(abi.ATTR_TYPE_TMEM_OUTPUT, size=8, data=b""),
        BParam(abi.ATTR_TYPE_VALUE_INOUT, 0, 41)])
    step = await be.call(3, msg, 1)
    assert isinstance(step, Done) and step.msg.ret == 0
    assert step.msg.params[1].data == b"hello" and step.msg.params[1].size == 5 and step.msg.params[2].c == 42
    assert all(m.closed for m in dev.shm.values())  # host shared memory released after each call
    null = Msg(abi.CMD_INVOKE_COMMAND, 0, session, params=[
        BParam(abi.ATTR_TYPE_TMEM_INPUT, size=3, data=b"abc"), BParam(abi.ATTR_TYPE_TMEM_OUTPUT, size=0, data=None)])
    step = await be.call(3, null, 1)
    assert isinstance(step, Done) and (step.msg.ret, step.msg.params[1].size) == (abi.TEEC_ERROR_SHORT_BUFFER, 3)
    step = await be.call(3, Msg(abi.CMD_CLOSE_SESSION, session=session), 1)
    assert isinstance(step, Done)
    step = await be.call(3, Msg(abi.CMD_INVOKE_COMMAND, 0, session), 1)
    assert isinstance(step, Done) and step.msg.ret == abi.TEEC_ERROR_BAD_PARAMETERS
    assert await be.vm_destroyed(3, 1) == abi.RETURN_OK
    assert dev.open_fds == set()  # every fd closed: the context's and each shared buffer's


async def test_refuses_a_second_vm_without_virtualization() -> None:
    dev = FakeTeeDevice()
    first, second = OpteeHostBackend("/dev/tee0", system=dev), OpteeHostBackend("/dev/tee0", system=dev)
    assert await first.vm_created(1, 1) == abi.RETURN_OK
    assert await second.vm_created(2, 1) == abi.RETURN_ENOTAVAIL
    assert isinstance(await second.call(2, open_msg(), 1), Refused)
    await first.vm_destroyed(1, 1)
    assert await second.vm_created(2, 1) == abi.RETURN_OK  # the lock went with the first VM
    shared = [OpteeHostBackend("/dev/tee0", system=(d := FakeTeeDevice()), allow_shared=True) for _ in range(2)]
    shared[1].sys = d
    assert [await b.vm_created(i + 1, 1) for i, b in enumerate(shared)] == [abi.RETURN_OK] * 2


async def test_not_optee() -> None:
    with pytest.raises(BackendError):
        await OpteeHostBackend("/dev/tee0", system=FakeTeeDevice(impl=2)).open()


async def test_a_blocking_ioctl_never_blocks_the_loop() -> None:
    import threading

    import trio

    from hvcproxyd.handlers.tee_proxy.backend import Pending

    release, closing = threading.Event(), threading.Event()

    class SlowDevice(FakeTeeDevice):
        def ioctl(self, fd: int, request: int, buf: bytearray) -> int:
            if request == TEE_IOC_INVOKE:
                release.wait(10)  # OP-TEE busy in a TA
            return super().ioctl(fd, request, buf)

        def close(self, fd: int) -> None:
            if self.sessions.get(fd):
                closing.wait(10)  # closing sessions in the TEE takes its time too
            super().close(fd)

    dev = SlowDevice()
    be = OpteeHostBackend("/dev/tee0", system=dev)
    assert await be.vm_created(1, 1) == abi.RETURN_OK
    step = await be.call(1, open_msg(), 1)
    assert isinstance(step, Done)
    msg = Msg(abi.CMD_INVOKE_COMMAND, 0, step.msg.session, params=[
        BParam(abi.ATTR_TYPE_TMEM_INPUT, size=1, data=b"x"), BParam(abi.ATTR_TYPE_TMEM_OUTPUT, size=1, data=b"")])
    with trio.fail_after(2):
        step = await be.call(1, msg, 0.05)
        assert isinstance(step, Pending)  # the guest gets a foreign interrupt meanwhile
        with pytest.raises(BackendError):
            await be.vm_destroyed(1, 0.05)  # bounded, though the kernel is still closing
    release.set()
    step = await be.wait(1, step.ticket, 2)
    assert isinstance(step, Done) and step.msg.params[1].data == b"x"
    closing.set()


async def test_through_the_mediator() -> None:
    """A guest's calls, shadowed and translated, reach the host TEE's ioctls."""
    from hvcproxyd.handlers.tee_proxy.msgarg import MsgArg

    from .tee_guest import GuestRam, GuestTee, memref, open_session_arg
    from .tee_support import RAM, RAM_SIZE, Rig, make_handler
    from .tee_support import options as tee_options

    ram = bytearray(RAM_SIZE)
    opts = tee_options(Path("/nonexistent"), backend="optee-host")
    handler = make_handler(opts, ram)
    assert isinstance(handler.backend, OpteeHostBackend)
    handler.backend.sys = FakeTeeDevice()
    r = Rig(handler, None, ram, None, Path("/nonexistent"))  # type: ignore[arg-type]
    r.guest = GuestTee(GuestRam(ram, RAM), r.smc)
    a0, out = await r.guest.call(open_session_arg(TA))
    assert (a0, out.ret) == (abi.RETURN_OK, 0)
    src, n = r.guest.ram.buffer(b"through the host")
    dst, cap = r.guest.ram.buffer(b"", capacity=64)
    a0, res = await r.guest.call(MsgArg(abi.CMD_INVOKE_COMMAND, 0, out.session, params=[
        memref(abi.ATTR_TYPE_TMEM_INPUT, src, n), memref(abi.ATTR_TYPE_TMEM_OUTPUT, dst, cap)]))
    assert (a0, res.ret, res.params[1].b) == (abi.RETURN_OK, 0, n)
    assert r.guest.ram.read_buffer(dst, n) == b"through the host"
