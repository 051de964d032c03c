"""FF-A for the guest: an FF-A 1.2 endpoint (Arm DEN0077) with the partitions
the VM's config offers.

The shape follows KVM's hypercall handlers: one flat dispatch on the function
number, 32-bit variants narrowed to w-registers before they share the 64-bit
logic, and one exit that turns an :class:`~.defs.FfaError` into FFA_ERROR.
The state and each call's logic live in :class:`~.endpoint.Endpoint`; this
module is the plugin face (options, lifecycle, the table).  Where the spec
leaves a choice, the answer is pKVM's or Xen's, cited where it is made.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, ClassVar

from ...config.diagnostics import Section
from ...smccc import MASK32, SMC64, SVE_HINT
from ...wire import Call, EventKind, VmEvent
from .. import Handler, Notes, Result, VmContext
from .defs import ERROR, SINCE, V1_0, V1_1, V1_2, Err, FfaError, Fn
from .endpoint import Endpoint, Regs
from .options import FfaOptions, parse_ffa_options

#: The vCPU whose call the running task serves (a sidecar's task has none): where
#: an NPI goes when a call raised it.  Per task, as calls of vCPUs interleave.
_CALLER: ContextVar[int | None] = ContextVar("ffa_caller", default=None)


class _CallView:
    """The call plus the VM's vCPU count (NOTIFICATION_GET checks its vCPU ID)."""

    __slots__ = ("call", "vcpu_count")

    def __init__(self, call: Call, vcpu_count: int) -> None:
        self.call = call
        self.vcpu_count = vcpu_count


Op = Callable[[Endpoint, tuple[int, ...], bool, _CallView], Regs | Awaitable[Regs]]
_VERSION_NAMES = {V1_0: "1.0", V1_1: "1.1", V1_2: "1.2"}


def _regs(values: Regs, wide: bool) -> Result:
    """FF-A results leave with x0..x7 (x0..x17 for the 64-bit calls that use them), so
    a caller never reads back a stale register the spec says is zero."""
    n = 18 if wide and len(values) > 8 else 8
    padded = tuple(v & ((1 << 64) - 1) for v in values) + (0,) * (n - len(values))
    return Result(padded)


def _error(code: Err) -> Result:
    return _regs((ERROR, 0, code), False)


def _table() -> dict[Fn, Op]:
    """Function number -> operation(endpoint, args x1.., wide, call)."""
    return {
        Fn.FEATURES: lambda e, x, w, c: e.call_features(x[0], x[1]),
        Fn.ID_GET: lambda e, x, w, c: e.call_id_get(),
        Fn.SPM_ID_GET: lambda e, x, w, c: e.call_spm_id_get(),
        Fn.RXTX_MAP: lambda e, x, w, c: e.call_rxtx_map(x[0], x[1], x[2] & MASK32),
        Fn.RXTX_UNMAP: lambda e, x, w, c: e.call_rxtx_unmap(x[0]),
        Fn.RX_RELEASE: lambda e, x, w, c: e.call_rx_release(x[0]),
        Fn.PARTITION_INFO_GET: lambda e, x, w, c: e.call_partition_info_get(x[0:4], x[4]),
        Fn.PARTITION_INFO_GET_REGS: lambda e, x, w, c: e.call_partition_info_get_regs(x[0], x[1], x[2]),
        Fn.MSG_SEND_DIRECT_REQ: lambda e, x, w, c: e.call_direct_req(x[0], x[1], x[2:7], w),
        Fn.MSG_SEND_DIRECT_REQ2: lambda e, x, w, c: e.call_direct_req2(x[0], x[1], x[2], x[3:17]),
        Fn.MSG_SEND2: lambda e, x, w, c: e.call_msg_send2(x[0], x[1]),
        Fn.MSG_WAIT: lambda e, x, w, c: e.call_msg_wait(),
        Fn.MSG_SEND_DIRECT_RESP: lambda e, x, w, c: e.call_direct_resp(x[0], x[1], x[2:7], w),
        Fn.MEM_SHARE: lambda e, x, w, c: e.call_mem_send(Fn.MEM_SHARE, x[0] & MASK32, x[1] & MASK32, x[2], x[3]),
        Fn.MEM_LEND: lambda e, x, w, c: e.call_mem_send(Fn.MEM_LEND, x[0] & MASK32, x[1] & MASK32, x[2], x[3]),
        Fn.MEM_DONATE: lambda e, x, w, c: e.call_mem_send(Fn.MEM_DONATE, x[0] & MASK32, x[1] & MASK32, x[2],
                                                           x[3]),
        Fn.MEM_FRAG_TX: lambda e, x, w, c: e.call_frag_tx(x[0], x[1], x[2], x[3]),
        Fn.MEM_RECLAIM: lambda e, x, w, c: e.call_reclaim(x[0], x[1], x[2]),
        Fn.NOTIFICATION_BITMAP_CREATE: lambda e, x, w, c: e.call_bitmap_create(x[0], x[1]),
        Fn.NOTIFICATION_BITMAP_DESTROY: lambda e, x, w, c: e.call_bitmap_destroy(x[0]),
        Fn.NOTIFICATION_BIND: lambda e, x, w, c: e.call_bind(x[0], x[1], x[3] << 32 | x[2], False),
        Fn.NOTIFICATION_UNBIND: lambda e, x, w, c: e.call_bind(x[0], x[1], x[3] << 32 | x[2], True),
        Fn.NOTIFICATION_SET: lambda e, x, w, c: e.call_set(x[0], x[1], x[3] << 32 | x[2]),
        Fn.NOTIFICATION_GET: lambda e, x, w, c: e.call_get(x[0], x[1], c.vcpu_count),
        Fn.NOTIFICATION_INFO_GET: lambda e, x, w, c: e.call_info_get(w),
    }


class FfaHandler(Handler):
    """Owns the FF-A range (``match: ffa``).  Each partition is a plugin
    (:mod:`.partition`); the handler's own state is the :class:`Endpoint`."""

    SERVICES: ClassVar[dict[str, tuple[str, ...]]] = {"ffa": ("1.0", "1.1", "1.2")}
    SIDECARS: ClassVar[tuple[str, ...]] = ("ffa-peers",)
    _TABLE: ClassVar[dict[Fn, Op]] = _table()

    def __init__(self, name: str, options: FfaOptions, vm: VmContext) -> None:
        super().__init__(name, options, vm)
        self.opts = options
        self.endpoint = Endpoint(options, vm.name, self.log)
        self.endpoint.raise_npi = self._raise_npi

    @classmethod
    def parse_options(cls, section: Section) -> FfaOptions:
        return parse_ffa_options(section)

    @classmethod
    def provided_versions(cls, options: Any, service: str) -> tuple[str, ...]:
        if service != "ffa" or not isinstance(options, FfaOptions):
            return ()
        return tuple(name for v, name in _VERSION_NAMES.items() if v <= options.version)

    def failure(self, call: Call) -> Result:
        # A bug or a missing VMM: the guest sees an FF-A error, not a bare SMCCC -1.
        return _error(Err.ABORTED)

    def _raise_npi(self) -> None:
        """Notifications became pending: the guest's NPI, on the vCPU whose call
        raised them (it takes the interrupt first), else on vCPU 0, as Xen does."""
        npi = self.endpoint.npi
        if npi is not None:
            caller = _CALLER.get()
            self.vm.raise_interrupt(0 if caller is None else caller, npi)

    async def handle(self, call: Call) -> Result:
        token = _CALLER.set(call.vcpu)
        try:
            return await self._handle(call)
        finally:
            _CALLER.reset(token)

    async def _handle(self, call: Call) -> Result:
        ep = self.endpoint
        ep.memory = self.vm.memory
        fid = call.func_id & ~SVE_HINT
        wide = bool(fid & SMC64)
        if wide and call.aarch32:
            return _error(Err.NOT_SUPPORTED)  # SMC64 does not exist for an AArch32 caller
        args = call.args if wide else tuple(a & MASK32 for a in call.args)
        if fid == 0x8400_0000 | Fn.VERSION:
            return _regs(ep.call_version(args[0]), False)
        fn = ep.offered(fid)
        op = self._TABLE.get(fn) if fn is not None else None
        if op is None or fn is None:
            return _error(Err.NOT_SUPPORTED)
        if not ep.version:
            # pKVM's proxy answers any call before FFA_VERSION so (arch/arm64/kvm/hyp/nvhe/ffa.c).
            return _error(Err.INVALID_PARAMETERS)
        if SINCE.get(fn, V1_0) > ep.version:
            return _error(Err.NOT_SUPPORTED)
        try:
            out = op(ep, args, wide, _CallView(call, len(self.vm.vcpus)))
            regs = await out if not isinstance(out, tuple) else out
        except FfaError as err:
            self.log.debug("%s: %s", fn.name, err)
            return _error(err.code)
        try:
            await ep.flush_messages()
        except FfaError as err:
            self.log.warning("could not deliver a queued message into RX: %s", err)
        return _regs(regs, wide)

    # -- what status shows
    def guest_abi(self) -> dict[str, Any]:
        o = self.endpoint.opts
        return {"version": f"{o.version >> 16}.{o.version & 0xFFFF}", "id": o.id, "spm_id": o.spm_id,
                "partitions": [[p.id, [str(u) for u in p.uuids], p.properties, p.exec_contexts]
                               for p in o.partitions]}

    def report(self) -> dict[str, Any]:
        ep = self.endpoint
        return {"version": _VERSION_NAMES.get(ep.version, "none"), "rxtx_mapped": ep.mailbox.mapped,
                "rx_full": ep.mailbox.rx_full, "transactions": len(ep.ledger), "shared_pages": ep.ledger.pages,
                "queued_messages": len(ep.queued), "partitions": len(ep.partitions)}

    # -- lifecycle
    def attach(self, reconnect: bool) -> Notes:
        ep = self.endpoint
        ep.memory = self.vm.memory
        ep.npi = self.opts.notification_interrupt if self.vm.raises_interrupts else None
        if not reconnect:
            ep.reset()  # a fresh boot: the guest negotiates again
        elif ep.notifications.any_pending:
            self._raise_npi()  # one raised while no VMM was attached was lost
        if self.opts.notification_interrupt is not None and ep.npi is None:
            self.log.info("the VMM cannot raise interrupts (its HELLO has no INTERRUPT feature): FFA_FEATURES does "
                          "not offer the notification pending interrupt (INTID %d), so the guest's driver runs "
                          "without notifications", self.opts.notification_interrupt)
        return ()

    def event(self, event: VmEvent) -> Notes:
        if event.kind is EventKind.VM_RESET:
            self.endpoint.reset()
        return ()

    def snapshot(self) -> dict[str, Any]:
        return self.endpoint.snapshot()

    def restore(self, data: dict[str, Any]) -> Notes:
        self.endpoint.restore(data)
        return ()

