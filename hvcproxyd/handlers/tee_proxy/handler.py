"""The tee-proxy handler: OP-TEE's SMC ABI toward the guest, mediated in the
manner of Xen's ``xen/arch/arm/tee/optee.c``, in front of a pluggable backend.

What the mediator guarantees, whatever the guest sends:

- the TEE knows the VM only by its configured client ID (w7 is never read);
  the guest cannot issue VM_CREATED/VM_DESTROYED, the handler does (lifecycle);
- every ``optee_msg_arg`` is read once into a shadow, inside one page of guest
  RAM, with num_params bounded; every memref is resolved and checked against
  RAM and the VM's limits before a byte moves (:mod:`.translate`);
- the guest gets only what the ABI allows back, and errors as OPTEE_SMC_RETURN_*
  codes or TEEC results: a dead or hung backend ends the call with
  TEEC_ERROR_COMMUNICATION, never a hang (a slow one lets the guest take its
  interrupts: RPC FOREIGN_INTR every ``slice_ms``).

The RPC flow is OP-TEE's without the SHM cache: the first RPC command of a call
makes the guest allocate an argument buffer (RPC_FUNC_ALLOC), each command is
written there and announced with RPC_FUNC_CMD, and the buffer is freed
(RPC_FUNC_FREE) before the call's result is returned.  Which backend RPCs
reach the guest, and how their shared memory is accounted, is in
docs/handlers/tee-proxy.md.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from ...config.diagnostics import Section
from ...core.guestmem import GuestMemory, GuestMemoryError
from ...smccc import MASK32, SMC64, routing_id
from ...wire import Call, EventKind, VmEvent
from .. import Handler, Notes, Result, VmContext
from . import abi
from .backend import Backend, BackendError, BackendInfo, BParam, Done, ForeignIntr, Msg, Pending, Refused, RpcCmd, Step
from .msgarg import MsgArg, MsgError, Param, fail, num_params_at, pack, parse
from .options import TeeOptions, make_backend, parse_options
from .shm import PAGE_MASK, Account, Buffer, contiguous, walk_pagelist
from .translate import Translated, from_backend, to_backend

#: Parameters of an RPC command (OP-TEE's THREAD_RPC_MAX_NUM_PARAMS).
RPC_PARAMS = 4
RPC_ARG_SIZE = abi.arg_size(RPC_PARAMS)
#: The functions answered here (what CALLS_COUNT counts).
OFFERED = (abi.CALLS_COUNT, abi.CALLS_UID, abi.CALLS_REVISION, abi.GET_OS_UUID, abi.GET_OS_REVISION,
            abi.GET_SHM_CONFIG, abi.EXCHANGE_CAPABILITIES, abi.DISABLE_SHM_CACHE, abi.ENABLE_SHM_CACHE,
            abi.GET_THREAD_COUNT, abi.CALL_WITH_ARG, abi.RETURN_FROM_RPC)
UNKNOWN = Result.of(abi.RETURN_UNKNOWN_FUNCTION)


class Wake:
    """The note that tells the lifecycle sidecar there is VM_CREATED/VM_DESTROYED to send."""


WAKE = Wake()


def _rpc(func: int, a1: int, a2: int, tid: int) -> Result:
    return Result.of(abi.rpc(func), a1, a2, tid)


def _split(v: int) -> tuple[int, int]:
    return (v >> 32) & MASK32, v & MASK32


@dataclass(slots=True)
class Job:
    """One yielding call between CALL_WITH_ARG and its final answer."""

    tid: int
    gpa: int
    shadow: MsgArg
    tr: Translated
    deadline: float
    thread: int = 0                      # the backend's thread, for rpc_return
    phase: tuple[Any, ...] = ("new",)
    rpc_arg: tuple[int, int] | None = None  # (gpa, cookie) of the guest's RPC argument buffer
    rpc_msg: Msg | None = None           # the backend RPC being carried out by the guest
    final: Msg | None = None
    busy: bool = False
    started: bool = False

    @property
    def arg_page(self) -> int:
        return self.gpa & ~PAGE_MASK


class TeeProxyHandler(Handler):
    """Owns the trusted-OS ranges of OP-TEE (owners 50 and 63, ``match: optee``)."""

    ANSWERS_DISCOVERY: ClassVar[bool] = True
    SIDECARS: ClassVar[tuple[str, ...]] = ("tee-lifecycle",)

    def __init__(self, name: str, options: TeeOptions, vm: VmContext) -> None:
        super().__init__(name, options, vm)
        self.opts = options
        self.client = options.client_id
        self.backend: Backend = make_backend(options)
        self.account = Account(options.limits)
        self.registered: dict[int, Buffer] = {}
        self.rpc_shm: dict[int, Buffer] = {}
        self.sessions: set[int] = set()
        self.jobs: dict[int, Job] = {}
        self._tids = itertools.count(1)
        #: VM_CREATED / VM_DESTROYED still to send, oldest first.
        self.pending: list[str] = []
        self.created = False
        self.refused = False
        self._settle_lock = trio.Lock()
        #: Calls past the thread-limit check whose buffers are still being read.
        self._starting = 0
        #: Bumped at every reset, so work begun before it does not charge the new account.
        self._epoch = 0
        #: The backend failed and nothing has worked since (warnings once per outage).
        self._down = False

    @classmethod
    def parse_options(cls, section: Section) -> TeeOptions:
        return parse_options(section)

    def failure(self, call: Call) -> Result:
        return Result.of(abi.RETURN_ENOTAVAIL)

    # -- lifecycle: the guest never sends these; the handler does, through the sidecar or the next call
    def attach(self, reconnect: bool) -> Notes:
        if not reconnect:
            self._reset()
            if self.created:
                self.pending.append("destroyed")
            self.pending.append("created")
        elif not self.created and "created" not in self.pending:
            # A daemon that restarted under a running VM: the TEE may still hold the client, and this
            # daemon cannot know its sessions, so the client starts afresh.
            self.pending += ["destroyed", "created"]
        return (WAKE,)

    def event(self, event: VmEvent) -> Notes:
        if event.kind is EventKind.VM_RESET:
            self._reset()
            self.pending += ["destroyed", "created"]
            return (WAKE,)
        if event.kind is EventKind.VM_SHUTDOWN:
            self._reset()
            self.pending.append("destroyed")
            return (WAKE,)
        return ()

    def _reset(self) -> None:
        """Forget everything the guest built: the TEE forgets it too at VM_DESTROYED."""
        self.jobs.clear()
        self.registered.clear()
        self.rpc_shm.clear()
        self.sessions.clear()
        self.account = Account(self.opts.limits)
        self._epoch += 1
        self.backend.forget(self.client)

    async def settle(self) -> None:
        """Send what lifecycle is pending, in order; a backend that cannot be
        reached leaves it pending for the next try."""
        budget = self.opts.backend_timeout_ms / 1000
        async with self._settle_lock:
            while self.pending:
                what = self.pending[0]
                try:
                    if what == "created":
                        code = await self.backend.vm_created(self.client, budget)
                        self.created = code == abi.RETURN_OK
                        self.refused = not self.created
                        if self.refused:
                            self.log.warning("the TEE refused VM_CREATED for client %d (%#x): calls get ENOTAVAIL",
                                             self.client, code)
                    else:
                        await self.backend.vm_destroyed(self.client, budget)
                        self.created = self.refused = False
                except BackendError as err:
                    self._backend_trouble(f"cannot tell the TEE VM_{what.upper()} for client {self.client} yet: {err}")
                    return
                self.pending.pop(0)

    async def _info(self) -> BackendInfo | None:
        try:
            info = await self.backend.open()
        except BackendError as err:
            self._backend_trouble(f"TEE backend unavailable: {err}")
            return None
        if self._down:
            self._down = False
            self.log.warning("TEE backend reachable again")
        return info

    def _backend_trouble(self, why: str) -> None:
        """Warn once per outage, not once per guest call (debug after that)."""
        (self.log.debug if self._down else self.log.warning)("%s", why)
        self._down = True

    def max_calls(self, info: BackendInfo) -> int:
        limit = self.opts.limits.max_calls
        return info.threads if limit is None else min(limit, info.threads)

    # -- the guest-facing dispatcher
    async def handle(self, call: Call) -> Result:
        fid = routing_id(call.func_id)  # the SVE hint (bit 16) is not part of the function
        if fid & SMC64:
            return UNKNOWN  # every OP-TEE function is SMC32
        a = [x & MASK32 for x in call.args[:7]]  # SMC32: w1..w7; w7 (client ID) is never used
        if fid in (abi.CALLS_UID, abi.fast(0xFF01)):
            return Result.of(*abi.API_UID)
        if fid in (abi.CALLS_REVISION, abi.fast(0xFF03)):
            return Result.of(*abi.API_REVISION)
        if fid in (abi.CALLS_COUNT, abi.fast(0xFF00)):
            return Result.of(len(OFFERED))
        if fid == abi.GET_OS_UUID:
            return Result.of(*abi.OS_UUID)
        if fid in (abi.VM_CREATED, abi.VM_DESTROYED):
            return Result.of(abi.RETURN_ENOTAVAIL)  # only the hypervisor (client 0) may; never passed on
        if fid == abi.GET_SHM_CONFIG:
            return Result.of(abi.RETURN_ENOTAVAIL)  # no reserved SHM for guests (Xen does the same)
        if fid == abi.ENABLE_SHM_CACHE:
            return Result.of(abi.RETURN_OK)  # nothing is cached: RPC buffers are freed at the end of each call
        if fid == abi.DISABLE_SHM_CACHE:
            return Result.of(abi.RETURN_ENOTAVAIL)  # the cache is empty
        if fid in (abi.ENABLE_ASYNC_NOTIF, abi.GET_ASYNC_NOTIF_VALUE):
            return Result.of(abi.RETURN_ENOTAVAIL)
        if fid == abi.GET_OS_REVISION:
            info = await self._info()
            rev = info.revision if info else (0, 0)
            return Result.of(rev[0], rev[1], 0)
        if fid == abi.EXCHANGE_CAPABILITIES:
            return await self._exchange_capabilities()
        if fid == abi.GET_THREAD_COUNT:
            info = await self._info()
            return Result.of(abi.RETURN_OK, self.max_calls(info)) if info else Result.of(abi.RETURN_ENOTAVAIL)
        if fid == abi.CALL_WITH_ARG:
            return await self._call_with_arg((a[0] << 32) | a[1])
        if fid == abi.RETURN_FROM_RPC:
            return await self._return_from_rpc(a)
        return UNKNOWN

    async def _exchange_capabilities(self) -> Result:
        await self.settle()
        info = await self._info()
        if info is None or self.refused or not info.sec_caps & abi.SEC_CAP_DYNAMIC_SHM:
            # Without dynamic SHM a guest could only use reserved SHM, which is never offered.
            return Result.of(abi.RETURN_ENOTAVAIL, 0)
        return Result.of(abi.RETURN_OK, info.sec_caps & abi.GUEST_SEC_CAPS, 0, 0)

    # -- CALL_WITH_ARG
    async def _call_with_arg(self, gpa: int) -> Result:
        memory = self.vm.memory
        if memory is None:
            return Result.of(abi.RETURN_ENOTAVAIL)
        await self.settle()
        if not self.created:
            return Result.of(abi.RETURN_ENOTAVAIL)
        try:
            shadow = await self._read_arg(memory, gpa)
        except MsgError as err:
            self.log.debug("CALL_WITH_ARG at %#x refused: %s", gpa, err)
            return Result.of(err.code)
        cmd = shadow.cmd
        if cmd == abi.CMD_REGISTER_SHM:
            return await self._answer(memory, gpa, await self._register(memory, gpa, shadow))
        if cmd == abi.CMD_UNREGISTER_SHM:
            return await self._answer(memory, gpa, self._unregister(shadow))
        if cmd not in (abi.CMD_OPEN_SESSION, abi.CMD_INVOKE_COMMAND, abi.CMD_CLOSE_SESSION, abi.CMD_CANCEL):
            return Result.of(abi.RETURN_EBADCMD)
        if cmd in (abi.CMD_INVOKE_COMMAND, abi.CMD_CLOSE_SESSION) and shadow.session not in self.sessions:
            # Defence in depth: the TEE keys sessions by client too.
            return await self._answer(memory, gpa, fail(shadow, abi.TEEC_ERROR_BAD_PARAMETERS, abi.TEEC_ORIGIN_TEE))
        info = await self._info()
        if info is None:
            return await self._answer(memory, gpa, fail(shadow, abi.TEEC_ERROR_COMMUNICATION))
        if len(self.jobs) + self._starting >= self.max_calls(info):
            return Result.of(abi.RETURN_ETHREAD_LIMIT)
        epoch = self._epoch
        self._starting += 1  # holds the slot while the memrefs are read (other vCPUs run meanwhile)
        try:
            tr = await to_backend(memory, shadow, gpa & ~PAGE_MASK, self.registered, self.account,
                                  self.opts.limits, self.opts.max_call_bytes)
        except MsgError as err:
            self.log.debug("CALL_WITH_ARG at %#x refused: %s", gpa, err)
            return Result.of(err.code)
        finally:
            self._starting -= 1
        if epoch != self._epoch:  # the VM reset while its buffers were read
            return Result.of(abi.RETURN_ENOTAVAIL)
        job = Job(self._new_tid(), gpa, shadow, tr, trio.current_time() + self.opts.call_timeout_ms / 1000,
                  busy=True)
        self.jobs[job.tid] = job
        msg = Msg(shadow.cmd, shadow.func, shadow.session, shadow.cancel_id, params=tr.params)
        return await self._drive(job, memory, lambda budget: self.backend.call(self.client, msg, budget))

    def _new_tid(self) -> int:
        """A thread ID for a3, unique among this VM's calls and never 0."""
        while True:
            tid = next(self._tids) & MASK32
            if tid and tid not in self.jobs:
                return tid

    async def _read_arg(self, memory: GuestMemory, gpa: int) -> MsgArg:
        off = gpa & PAGE_MASK
        if off + abi.ARG_HEADER_SIZE > abi.PAGE_SIZE or not memory.contains(gpa, abi.ARG_HEADER_SIZE):
            raise MsgError(abi.RETURN_EBADADDR, f"{gpa:#x} cannot hold an optee_msg_arg")
        try:
            n = num_params_at(await memory.read(gpa, abi.ARG_HEADER_SIZE))
            if n > abi.MAX_PARAMS_PER_PAGE:
                raise MsgError(abi.RETURN_EBADCMD, f"num_params {n} is over {abi.MAX_PARAMS_PER_PAGE}")
            size = abi.arg_size(n)
            if off + size > abi.PAGE_SIZE:
                raise MsgError(abi.RETURN_EBADADDR, f"{n} parameters at {gpa:#x} cross the argument's page")
            return parse(await memory.read(gpa, size), n)
        except GuestMemoryError as err:
            raise MsgError(abi.RETURN_EBADADDR, str(err)) from err

    async def _answer(self, memory: GuestMemory, gpa: int, arg: MsgArg) -> Result:
        try:
            await memory.write(gpa, pack(arg))
        except GuestMemoryError as err:
            self.log.debug("cannot write the answer at %#x: %s", gpa, err)
            return Result.of(abi.RETURN_EBADADDR)
        return Result.of(abi.RETURN_OK)

    # -- shared memory the guest registers: kept here, never shown to the TEE as addresses
    async def _register(self, memory: GuestMemory, gpa: int, arg: MsgArg) -> MsgArg:
        p = arg.params[0] if len(arg.params) == 1 else None
        if p is None or p.type not in abi.TMEM_TYPES or not p.attr & abi.ATTR_NONCONTIG or not p.a:
            return fail(arg, abi.TEEC_ERROR_BAD_PARAMETERS)
        if p.c in self.registered or p.c == 0:
            return fail(arg, abi.TEEC_ERROR_BAD_PARAMETERS)
        epoch = self._epoch
        try:
            buf = await walk_pagelist(memory, p.a, p.b, self.opts.limits, gpa & ~PAGE_MASK)
            if p.c in self.registered or epoch != self._epoch:  # raced by another vCPU, or a reset
                return fail(arg, abi.TEEC_ERROR_BAD_PARAMETERS)
            self.account.take(len(buf.pages), True)
        except MsgError as err:
            self.log.debug("REGISTER_SHM %#x refused: %s", p.c, err)
            return fail(arg, abi.TEEC_ERROR_OUT_OF_MEMORY if err.code == abi.RETURN_ENOMEM
                        else abi.TEEC_ERROR_BAD_PARAMETERS)
        self.registered[p.c] = buf
        return fail(arg, abi.TEEC_SUCCESS, abi.TEEC_ORIGIN_TEE)

    def _unregister(self, arg: MsgArg) -> MsgArg:
        p = arg.params[0] if len(arg.params) == 1 else None
        buf = self.registered.pop(p.c, None) if p is not None and p.type in abi.RMEM_TYPES else None
        if buf is None:
            return fail(arg, abi.TEEC_ERROR_BAD_PARAMETERS)
        self.account.give(len(buf.pages), True)
        return fail(arg, abi.TEEC_SUCCESS, abi.TEEC_ORIGIN_TEE)

    # -- the call engine
    async def _drive(self, job: Job, memory: GuestMemory, op: Any) -> Result:
        """Run one backend operation for ``job`` and turn its outcome into what
        the guest sees next.  Whatever happens (a bad guest buffer, a backend
        error, cancellation), the job ends cleanly or stays resumable."""
        job.busy = True
        try:
            step = await self._bounded(job, op)
            while True:
                if isinstance(step, Refused):
                    if not job.started:
                        self._end(job)
                        return Result.of(step.code)
                    return await self._fail_job(job, memory)
                job.started = True
                if isinstance(step, Pending):
                    job.phase = ("wait", step.ticket)
                    return _rpc(abi.RPC_FUNC_FOREIGN_INTR, 0, 0, job.tid)
                if isinstance(step, ForeignIntr):
                    job.thread, job.phase = step.thread, ("intr",)
                    return _rpc(abi.RPC_FUNC_FOREIGN_INTR, 0, 0, job.tid)
                if isinstance(step, Done):
                    job.final = step.msg
                    if job.rpc_arg is not None:
                        job.phase = ("free",)
                        return _rpc(abi.RPC_FUNC_FREE, *_split(job.rpc_arg[1]), job.tid)
                    return await self._finish(job, memory)
                assert isinstance(step, RpcCmd)
                job.thread = step.thread
                local = self._rpc_locally(step.msg)
                if local is not None:
                    step = await self._bounded(job, lambda b, m=local: self.backend.rpc_return(
                        self.client, job.thread, m, b))
                    continue
                job.rpc_msg = step.msg
                if job.rpc_arg is None:
                    job.phase = ("alloc",)
                    return _rpc(abi.RPC_FUNC_ALLOC, RPC_ARG_SIZE, 0, job.tid)
                try:
                    return await self._send_rpc(job, memory)
                except (GuestMemoryError, MsgError) as err:
                    self.log.debug("cannot pass an RPC to the guest: %s", err)
                    failed = self._rpc_failed(job, abi.TEEC_ERROR_BAD_PARAMETERS)
                    step = await self._bounded(job, lambda b, m=failed: self.backend.rpc_return(
                        self.client, job.thread, m, b))
        except BackendError as err:
            self._backend_trouble(f"TEE backend failed during a call: {err}")
            return await self._fail_job(job, memory)
        except BaseException:
            self._end(job)  # cancelled (the handler's timeout) or a bug: the job cannot be resumed
            raise
        finally:
            job.busy = False

    async def _bounded(self, job: Job, op: Any) -> Step:
        left = job.deadline - trio.current_time()
        if left <= 0:
            raise BackendError(f"no answer within call_timeout_ms ({self.opts.call_timeout_ms})")
        result: Step = await op(min(left, self.opts.slice_ms / 1000))
        return result

    def _rpc_locally(self, msg: Msg) -> Msg | None:
        """An answer to a backend RPC the guest must not or need not see, or None
        to pass it on.  A memref must lie inside shared memory the guest handed
        this VM's TEE (an earlier SHM_ALLOC), and SHM_FREE must name such memory:
        the TEE cannot make the guest touch or free anything else."""
        def refuse(ret: int) -> Msg:
            return Msg(msg.cmd, ret=ret, ret_origin=abi.TEEC_ORIGIN_COMMS, params=msg.params)

        if len(msg.params) > RPC_PARAMS:
            return refuse(abi.TEEC_ERROR_NOT_SUPPORTED)
        for p in msg.params:
            if p.is_memref:
                buf = self.rpc_shm.get(p.shm)
                if buf is None or p.data is None:
                    return refuse(abi.TEEC_ERROR_NOT_SUPPORTED)
                if p.a + p.size > buf.size or len(p.data) > p.size:
                    return refuse(abi.TEEC_ERROR_BAD_PARAMETERS)
            elif p.type not in abi.VALUE_TYPES and p.type != abi.ATTR_TYPE_NONE:
                return refuse(abi.TEEC_ERROR_NOT_SUPPORTED)
        if msg.cmd == abi.RPC_CMD_SHM_FREE and (not msg.params or msg.params[0].b not in self.rpc_shm):
            return refuse(abi.TEEC_ERROR_BAD_PARAMETERS)
        return None

    async def _send_rpc(self, job: Job, memory: GuestMemory) -> Result:
        """Write the backend's RPC command into the guest's RPC argument: values as
        they are, memrefs as RMEM into the shared memory they name, their input
        bytes copied there first."""
        assert job.rpc_arg is not None and job.rpc_msg is not None
        m = job.rpc_msg
        params = []
        for p in m.params:
            if p.is_memref:
                buf = self.rpc_shm.get(p.shm)
                if buf is None:  # freed by another of the VM's calls since the TEE named it
                    raise MsgError(abi.RETURN_EBADADDR, f"shared memory {p.shm:#x} is gone")
                if p.type in abi.INPUT_TYPES and p.data:
                    await buf.write(memory, p.a, p.data)
                params.append(Param(abi.ATTR_TYPE_RMEM_INPUT + (p.type & 0x3) - 1, p.a, p.size, p.shm))
            else:
                params.append(Param(p.attr, p.a, p.b, p.c))
        arg = MsgArg(m.cmd, m.func, m.session, m.cancel_id, 0, 0, params)
        await memory.write(job.rpc_arg[0], pack(arg))
        job.phase = ("cmd",)
        return _rpc(abi.RPC_FUNC_CMD, *_split(job.rpc_arg[1]), job.tid)

    async def _finish(self, job: Job, memory: GuestMemory) -> Result:
        assert job.final is not None
        try:
            out = await from_backend(memory, job.shadow, job.tr, job.final)
        except (GuestMemoryError, MsgError) as err:
            self.log.debug("cannot copy a result back: %s", err)
            self._end(job)
            return Result.of(abi.RETURN_EBADADDR)
        if job.shadow.cmd == abi.CMD_OPEN_SESSION and out.ret == abi.TEEC_SUCCESS:
            self.sessions.add(out.session)
        elif job.shadow.cmd == abi.CMD_CLOSE_SESSION:
            self.sessions.discard(job.shadow.session)
        self._end(job)
        return await self._answer(memory, job.gpa, out)

    async def _fail_job(self, job: Job, memory: GuestMemory) -> Result:
        """The backend is gone or out of time: the call ends with a communication
        error (an RPC buffer the guest holds is freed first)."""
        job.final = Msg(job.shadow.cmd, ret=abi.TEEC_ERROR_COMMUNICATION, ret_origin=abi.TEEC_ORIGIN_COMMS,
                        params=job.tr.params)
        job.tr.buffers = [None] * len(job.tr.buffers)  # nothing to copy back
        if job.rpc_arg is not None:
            job.phase = ("free",)
            return _rpc(abi.RPC_FUNC_FREE, *_split(job.rpc_arg[1]), job.tid)
        return await self._finish(job, memory)

    def _end(self, job: Job) -> None:
        if self.jobs.pop(job.tid, None) is not None:
            self.account.give(job.tr.temp_pages, False)
            self.account.release(job.tr.moved)

    # -- RETURN_FROM_RPC
    async def _return_from_rpc(self, a: list[int]) -> Result:
        memory = self.vm.memory
        job = self.jobs.get(a[2])
        if memory is None or job is None:
            return Result.of(abi.RETURN_ERESUME)
        if job.busy:
            return Result.of(abi.RETURN_EBUSY)  # another vCPU is in this very call
        job.busy = True
        try:
            return await self._resume(job, memory, a)
        finally:
            job.busy = False

    async def _resume(self, job: Job, memory: GuestMemory, a: list[int]) -> Result:
        phase = job.phase[0]
        if phase == "free":
            job.rpc_arg = None
            return await self._finish(job, memory)
        if phase == "wait":
            ticket = job.phase[1]
            return await self._drive(job, memory, lambda b: self.backend.wait(self.client, ticket, b))
        if phase == "intr":
            return await self._drive(job, memory, lambda b: self.backend.rpc_return(self.client, job.thread, None, b))
        if phase == "alloc":
            answer = self._rpc_arg_allocated(job, memory, (a[0] << 32) | a[1], (a[3] << 32) | a[4])
            if answer is None:
                try:
                    return await self._send_rpc(job, memory)
                except (GuestMemoryError, MsgError):
                    answer = self._rpc_failed(job, abi.TEEC_ERROR_BAD_PARAMETERS)
        else:  # "cmd"
            answer = await self._rpc_answered(job, memory)
        return await self._drive(job, memory, lambda b: self.backend.rpc_return(self.client, job.thread, answer, b))

    def _rpc_failed(self, job: Job, ret: int) -> Msg:
        m = job.rpc_msg
        assert m is not None
        return Msg(m.cmd, ret=ret, ret_origin=abi.TEEC_ORIGIN_COMMS, params=m.params)

    def _rpc_arg_allocated(self, job: Job, memory: GuestMemory, gpa: int, cookie: int) -> Msg | None:
        """The guest's answer to RPC_FUNC_ALLOC; None if the buffer is usable."""
        if gpa == 0:
            return self._rpc_failed(job, abi.TEEC_ERROR_OUT_OF_MEMORY)
        job.rpc_arg = (gpa, cookie)  # freed at the end of the call whatever it is
        if ((gpa & PAGE_MASK) + RPC_ARG_SIZE > abi.PAGE_SIZE or not memory.contains(gpa, RPC_ARG_SIZE)
                or gpa & ~PAGE_MASK == job.arg_page):
            self.log.debug("RPC argument buffer at %#x refused", gpa)
            return self._rpc_failed(job, abi.TEEC_ERROR_BAD_PARAMETERS)
        return None

    async def _rpc_answered(self, job: Job, memory: GuestMemory) -> Msg:
        """Read the guest's answer to an RPC command back and turn it into the
        backend's, taking on shared memory the guest allocated."""
        sent = job.rpc_msg
        assert sent is not None and job.rpc_arg is not None
        try:
            got = parse(await memory.read(job.rpc_arg[0], abi.arg_size(len(sent.params))), len(sent.params))
        except (GuestMemoryError, MsgError):
            return self._rpc_failed(job, abi.TEEC_ERROR_BAD_PARAMETERS)
        if len(got.params) != len(sent.params):
            return self._rpc_failed(job, abi.TEEC_ERROR_BAD_PARAMETERS)
        params = []
        for s, g in zip(sent.params, got.params, strict=True):
            if s.type not in abi.OUTPUT_TYPES:
                params.append(s)
            elif not s.is_memref:
                params.append(BParam(s.attr, g.a, g.b, g.c))
            else:  # the guest's new size; its bytes, up to what the TEE gave room for
                buf = self.rpc_shm.get(s.shm)
                if buf is None:  # freed by another call meanwhile
                    return self._rpc_failed(job, abi.TEEC_ERROR_BAD_PARAMETERS)
                try:
                    data = await buf.read(memory, s.a, min(g.b, s.size))
                except (GuestMemoryError, MsgError):
                    return self._rpc_failed(job, abi.TEEC_ERROR_BAD_PARAMETERS)
                params.append(BParam(s.attr, s.a, size=g.b, data=data, shm=s.shm))
        answer = Msg(sent.cmd, ret=got.ret, ret_origin=got.ret_origin, params=params)
        if got.ret != abi.TEEC_SUCCESS:
            return answer
        if sent.cmd == abi.RPC_CMD_SHM_ALLOC:
            return await self._shm_allocated(job, memory, sent, got.params[0] if got.params else None)
        if sent.cmd == abi.RPC_CMD_SHM_FREE:
            buf = self.rpc_shm.pop(sent.params[0].b, None)
            if buf is not None:
                self.account.give(len(buf.pages), True)
        return answer

    async def _shm_allocated(self, job: Job, memory: GuestMemory, sent: Msg, p: Param | None) -> Msg:
        if p is None or p.type != abi.ATTR_TYPE_TMEM_OUTPUT or not p.a or not p.c or p.c in self.rpc_shm:
            return Msg(sent.cmd, ret=abi.TEEC_ERROR_BAD_PARAMETERS, ret_origin=abi.TEEC_ORIGIN_COMMS,
                       params=sent.params)
        try:
            if p.attr & abi.ATTR_NONCONTIG:
                buf = await walk_pagelist(memory, p.a, p.b, self.opts.limits, job.arg_page)
            else:
                buf = contiguous(memory, p.a, p.b, self.opts.limits, job.arg_page)
            if p.c in self.rpc_shm or self.jobs.get(job.tid) is not job:  # raced, or the VM reset meanwhile
                raise MsgError(abi.RETURN_EBADADDR, f"cookie {p.c:#x} is taken or the call is gone")
            self.account.take(len(buf.pages), True)
        except MsgError as err:
            # The guest keeps this allocation until it resets: the TEE never learns of it to free it.
            self.log.debug("RPC SHM_ALLOC answer refused: %s", err)
            return Msg(sent.cmd, ret=abi.TEEC_ERROR_OUT_OF_MEMORY, ret_origin=abi.TEEC_ORIGIN_COMMS,
                       params=sent.params)
        self.rpc_shm[p.c] = buf
        return Msg(sent.cmd, ret=abi.TEEC_SUCCESS, ret_origin=abi.TEEC_ORIGIN_COMMS,
                   params=[BParam(abi.ATTR_TYPE_TMEM_OUTPUT, size=p.b, shm=p.c), *sent.params[1:]])

    # -- state for status, reloads
    def migration_blocker(self) -> str | None:
        return (f"tee-proxy handler {self.name!r}: its client, sessions and shared memory are registered "
                f"with the {self.opts.backend} TEE backend, which cannot move with the VM")

    def report(self) -> dict[str, Any]:
        return {"client_id": self.client, "created": self.created, "refused": self.refused,
                "sessions": len(self.sessions), "calls": len(self.jobs), "shared_pages": self.account.pages,
                "buffers": self.account.buffers, "inflight_bytes": self.account.inflight}

    def snapshot(self) -> dict[str, Any]:
        return {"client_id": self.client, "created": self.created, "sessions": sorted(self.sessions),
                "registered": {str(k): [list(b.pages), b.offset, b.size] for k, b in self.registered.items()},
                "rpc_shm": {str(k): [list(b.pages), b.offset, b.size] for k, b in self.rpc_shm.items()}}

    def restore(self, data: dict[str, Any]) -> Notes:
        """Sessions and shared memory survive a reload; calls in flight do not (the
        guest's RETURN_FROM_RPC then gets ERESUME)."""
        if data.get("client_id") != self.client:
            return ()
        self.created = bool(data.get("created"))
        self.sessions = {s for s in data.get("sessions", []) if isinstance(s, int)}
        for key, table in (("registered", self.registered), ("rpc_shm", self.rpc_shm)):
            for cookie, (pages, offset, size) in dict(data.get(key, {})).items():
                table[int(cookie)] = Buffer(tuple(pages), offset, size)
                self.account.take(len(pages), True)
        return ()


__all__ = ["RPC_ARG_SIZE", "WAKE", "TeeProxyHandler", "Wake"]
