"""pKVM memshare: the guest side of KVM's vendor-hypervisor range (owner 6) as a
protected guest sees it, keeping a ledger of the memory it shares with the host.

A protected guest makes memory visible to the host (virtio rings, swiotlb
bounce buffers) with MEM_SHARE and takes it back with MEM_UNSHARE.  This
handler answers those calls as pKVM does and records every transition in a
:class:`~.ledger.Ledger`, so a VMM or device backend can check that it
touches only what the guest shared.  Each transition leaves as a note; the
daemon's memshare sidecar (:mod:`hvcproxyd.sidecars.memshare`) serves the
subscriber stream and runs in-process subscribers from those notes, so this
module has no socket, task or clock.

IDs and conventions follow Linux: include/linux/arm-smccc.h (function numbers,
KVM's UID, the FEATURES bitmap in w0..w3), drivers/firmware/smccc/kvm_guest.c
(the UID check and FEATURES read), drivers/virt/coco/pkvm-guest/arm-pkvm-guest.c
(HYP_MEMINFO <= PAGE_SIZE, one MEM_SHARE/UNSHARE per granule with x2 = x3 = 0),
and the pKVM hypervisor's arch/arm64/kvm/hyp/nvhe/pkvm.c for the errors.  The
``range`` ABI is the Android common kernel's: x2 = page count (0 meaning 1),
x1 returns the count done, HYP_MEMINFO sets KVM_FUNC_HAS_RANGE in x1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...config.diagnostics import Section
from ...config.settings import DEFAULT_RUNTIME_DIR
from ...smccc import (
    CALL_COUNT_FN,
    CALL_UID_FN,
    FUNC_NUM_MASK,
    REVISION_FN,
    SMC64,
    SVE_HINT,
    Owner,
    SmcccResult,
    func_id,
    uuid_to_regs,
)
from ...smccc.results import register_words
from ...wire import CALL_AARCH32, Call, EventKind, VmEvent
from .. import NOT_SUPPORTED, Handler, Notes, Result, VmContext
from .ledger import GRANULES, Change, Ledger, LedgerFull, RangeSet

# Function numbers in the vendor-hyp range (include/linux/arm-smccc.h).
KVM_FUNC_FEATURES = 0
KVM_FUNC_PTP = 1
#: KVM's PTP clock, ARM_SMCCC_VENDOR_HYP_KVM_PTP_FUNC_ID (SMC32 only).
PTP_ID = 0x8600_0000 | KVM_FUNC_PTP
KVM_FUNC_HYP_MEMINFO = 2
KVM_FUNC_MEM_SHARE = 3
KVM_FUNC_MEM_UNSHARE = 4
KVM_FUNC_MMIO_GUARD = 7
#: FEATURES answers a 128-bit bitmap (w0..w3); kvm_arm_hyp_service_available() ignores higher numbers.
KVM_NUM_FUNCS = 128
#: HYP_MEMINFO x1 flag: MEM_SHARE/UNSHARE take a page count (Android common kernel).
KVM_FUNC_HAS_RANGE = 1 << 0

_VH = Owner.VENDOR_HYP
FEATURES_ID = func_id(_VH, KVM_FUNC_FEATURES)                   # 0x86000000, SMC32
HYP_MEMINFO_ID = func_id(_VH, KVM_FUNC_HYP_MEMINFO, smc64=True)  # 0xC6000002
MEM_SHARE_ID = func_id(_VH, KVM_FUNC_MEM_SHARE, smc64=True)      # 0xC6000003
MEM_UNSHARE_ID = func_id(_VH, KVM_FUNC_MEM_UNSHARE, smc64=True)  # 0xC6000004
MMIO_GUARD_ID = func_id(_VH, KVM_FUNC_MMIO_GUARD, smc64=True)    # 0xC6000007
CALL_COUNT_ID = func_id(_VH, CALL_COUNT_FN)                     # 0x8600FF00
CALL_UID_ID = func_id(_VH, CALL_UID_FN)                         # 0x8600FF01
REVISION_ID = func_id(_VH, REVISION_FN)                         # 0x8600FF03

KVM_UID = "28b46fb6-2ec5-11e9-a9ca-4b564d003a74"
ABIS = ("mainline", "range")
#: Distinct guarded MMIO ranges a guest may create.  MMIO lies outside RAM, so
#: unlike shares nothing else bounds it; pKVM is bounded by its page-table memcache.
MAX_GUARD_RANGES = 4096
#: Default bound on the ledger's ranges: 4 GiB of alternate 4 KiB pages, about
#: 16 MiB of ledger.  Sharing in long runs (what guests do) needs a handful.
DEFAULT_MAX_RANGES = 1 << 20

SUCCESS = Result.of(SmcccResult.SUCCESS)
INVALID = Result.of(SmcccResult.INVALID_PARAMETER)

# trace and status say what HYP_MEMINFO answered.
register_words((HYP_MEMINFO_ID,), lambda value: f"granule {value}" if value > 0 else None)


def default_socket(vm_name: str) -> Path:
    """Where a VM's subscriber stream listens unless its config says otherwise."""
    return DEFAULT_RUNTIME_DIR / f"{vm_name}.memshare.sock"


# ----------------------------------------------------------------- options

@dataclass(frozen=True, slots=True)
class MemshareOptions:
    abi: str = "mainline"
    granule: int = 4096
    max_pages_per_call: int = 512
    mmio_guard: bool = False
    uid: tuple[int, int, int, int] = uuid_to_regs(KVM_UID)
    call_count: int | None = None
    revision: tuple[int, int] = (1, 0)
    delegate: Mapping[int, str] = field(default_factory=dict)
    stream: bool = True
    socket: Path | None = None
    subscriber_queue: int = 1024
    subscriber_flush_ms: int = 1
    max_subscribers: int = 16
    max_ranges: int = DEFAULT_MAX_RANGES
    #: In-process subscriber plugins by name; the sidecar loads them.
    subscribers: tuple[str, ...] = ()

    def own_functions(self) -> tuple[int, ...]:
        own = (KVM_FUNC_FEATURES, KVM_FUNC_HYP_MEMINFO, KVM_FUNC_MEM_SHARE, KVM_FUNC_MEM_UNSHARE)
        return (*own, KVM_FUNC_MMIO_GUARD) if self.mmio_guard else own

    def features(self) -> int:
        """The FEATURES bitmap: exactly what a guest can call here, delegated functions included."""
        bits = 0
        for fn in (*self.own_functions(), *self.delegate):
            if fn < KVM_NUM_FUNCS:
                bits |= 1 << fn
        return bits


OPTION_KEYS = ("abi", "granule", "max_pages_per_call", "mmio_guard", "uid", "call_count", "revision", "delegate",
               "stream", "socket", "subscriber_queue", "subscriber_flush_ms", "max_subscribers", "subscribers",
               "max_ranges")


def parse_memshare_options(s: Section) -> MemshareOptions:
    s.allow_keys(OPTION_KEYS)
    d = MemshareOptions()
    granule = s.integer("granule", default=d.granule)
    if granule not in GRANULES:
        s.problem("granule", f"must be one of {', '.join(map(str, GRANULES))}, not {granule!r}")
        granule = d.granule
    mmio_guard = s.flag("mmio_guard", d.mmio_guard)
    revision = s.integers("revision", min_len=2, max_len=2, hi=0xFFFF_FFFF, default=list(d.revision))
    own = MemshareOptions(mmio_guard=mmio_guard).own_functions()
    delegate: dict[int, str] = {}
    ds = s.section("delegate")
    if ds is not None:
        for key in ds.data:
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= FUNC_NUM_MASK:
                ds.problem(str(key), "must be a function number 0..0xFFFF of the vendor-hyp range",
                           mark=ds.data.key_marks[key])
            elif key in own or key in (CALL_COUNT_FN, CALL_UID_FN, REVISION_FN):
                ds.problem(str(key), f"function {key:#x} is answered by this handler itself",
                           mark=ds.data.key_marks[key])
            elif not isinstance(target := ds.data.get(key), str) or not target:
                ds.problem(str(key), f"must name a handler of this VM, not {target!r}",
                           mark=ds.data.value_marks.get(key, ds.data.mark))
            else:
                delegate[key] = target
    names = s.raw("subscribers", [])
    subscribers: tuple[str, ...] = ()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        s.problem("subscribers", "must be a list of subscriber plugin names")
    else:
        subscribers = tuple(names)
    socket = s.string("socket", default=None)
    return MemshareOptions(
        abi=s.string("abi", default=d.abi, choices=ABIS),
        granule=granule,
        max_pages_per_call=s.integer("max_pages_per_call", default=d.max_pages_per_call, lo=1, hi=1 << 20),
        mmio_guard=mmio_guard,
        uid=s.uid("uid") if s.has("uid") else d.uid,
        call_count=s.integer("call_count", default=None, hi=0xFFFF_FFFF),
        revision=(revision[0], revision[1]),
        delegate=delegate,
        stream=s.flag("stream", d.stream),
        socket=Path(socket) if socket else None,
        subscriber_queue=s.integer("subscriber_queue", default=d.subscriber_queue, lo=1, hi=1 << 20),
        subscriber_flush_ms=s.integer("subscriber_flush_ms", default=d.subscriber_flush_ms, lo=0, hi=1000),
        max_subscribers=s.integer("max_subscribers", default=d.max_subscribers, lo=1, hi=1024),
        max_ranges=s.integer("max_ranges", default=d.max_ranges, lo=1, hi=1 << 26),
        subscribers=subscribers,
    )


# ----------------------------------------------------------------- the handler

class MemshareHandler(Handler):
    """Owns the vendor-hyp range: discovery, FEATURES, HYP_MEMINFO, MEM_SHARE,
    MEM_UNSHARE, optionally MMIO_GUARD; other functions are delegated or
    NOT_SUPPORTED.  Every ledger transition is returned as a note (a
    :class:`~.ledger.Change`), which the memshare sidecar publishes."""

    ANSWERS_DISCOVERY: ClassVar[bool] = True
    JOURNAL_DELTAS: ClassVar[bool] = True
    SIDECARS: ClassVar[tuple[str, ...]] = ("memshare-stream",)

    def __init__(self, name: str, options: MemshareOptions, vm: VmContext) -> None:
        super().__init__(name, options, vm)
        self.opts = options
        #: The ledger and RAM-map checks never wait; a delegated function may.
        self.inline = not options.delegate
        self.ledger = Ledger(options.granule, max_ranges=options.max_ranges)
        #: MMIO pages the guest registered with MMIO_GUARD (guest-visible state, so snapshotted too).
        self.guarded = RangeSet()
        self.range_abi = options.abi == "range"
        self._complained: set[int] = set()
        #: Changes since the journal last asked (take_delta): ["s"|"u", ipa, size, vcpu],
        #: ["g", lo, hi], ["r"], or ["S", snapshot] for a whole new state (restore, adopt).
        self._delta: list[list[Any]] = []
        self._fixed: dict[int, Result] = self._discovery(kvm_ptp=False)
        self._calls: dict[int, Callable[[Call], Result]] = {
            HYP_MEMINFO_ID: self._meminfo, MEM_SHARE_ID: self._share, MEM_UNSHARE_ID: self._unshare}
        if options.mmio_guard:
            self._calls[MMIO_GUARD_ID] = self._mmio_guard

    def _discovery(self, *, kvm_ptp: bool) -> dict[int, Result]:
        """The owner's discovery answers.  ``kvm_ptp``: the config leaves KVM's PTP
        clock to the kernel (``except: kvm-ptp``) under KVM, so FEATURES lists it, as
        KVM's own FEATURES does, and ptp_kvm keeps working in the guest."""
        options = self.opts
        features = options.features() | (1 << KVM_FUNC_PTP if kvm_ptp else 0)
        words = [(features >> (32 * i)) & 0xFFFF_FFFF for i in range(4)]
        count = options.call_count
        if count is None:
            count = features.bit_count() + sum(1 for fn in options.delegate if fn >= KVM_NUM_FUNCS)
        return {
            CALL_COUNT_ID: Result.of(count),
            CALL_UID_ID: Result.of(*options.uid),
            REVISION_ID: Result.of(*options.revision),
            FEATURES_ID: Result.of(*words),
        }

    @classmethod
    def parse_options(cls, section: Section) -> MemshareOptions:
        return parse_memshare_options(section)

    @classmethod
    def provided_versions(cls, options: Any, service: str) -> tuple[str, ...]:
        if service != "kvm-vendor" or not isinstance(options, MemshareOptions):
            return ()
        return (f"{options.revision[0]}.{options.revision[1]}",)

    # -- the call path
    async def handle(self, call: Call) -> Result:
        fid = call.func_id & ~SVE_HINT
        fixed = self._fixed.get(fid)
        if fixed is not None:
            return fixed
        method = self._calls.get(fid)
        if method is not None:
            # SMC64 functions do not exist for an AArch32 caller (DEN0028 §2.5).
            return NOT_SUPPORTED if call.flags & CALL_AARCH32 and fid & SMC64 else method(call)
        target = self.opts.delegate.get(fid & FUNC_NUM_MASK)
        if target is not None:
            return await self._delegate(target, call)
        return NOT_SUPPORTED

    def _meminfo(self, call: Call) -> Result:
        # pKVM refuses any argument: x1..x3 must be zero.
        if call.args[0] or call.args[1] or call.args[2]:
            return INVALID
        return Result.of(self.ledger.granule, KVM_FUNC_HAS_RANGE if self.range_abi else 0)

    def _extent(self, call: Call) -> tuple[int, int] | None:
        """(ipa, granules) of a MEM_SHARE/UNSHARE/MMIO_GUARD request, or None when
        the arguments alone make it invalid."""
        ipa, x2, x3 = call.args[0], call.args[1], call.args[2]
        if self.range_abi:
            if x3:
                return None
            # 0 is the mainline guest's "one granule"; a longer run is cut to what
            # one call may do, and x1 tells the guest how far it got.
            n = min(x2 or 1, self.opts.max_pages_per_call)
        else:
            if x2 or x3:
                return None
            n = 1
        if ipa & (self.ledger.granule - 1):
            return None
        return ipa, n

    def _share(self, call: Call) -> Result:
        return self._transition(call, self.ledger.share)

    def _unshare(self, call: Call) -> Result:
        return self._transition(call, self.ledger.unshare)

    def _transition(self, call: Call, apply: Callable[..., Change | None]) -> Result:
        extent = self._extent(call)
        if extent is None:
            return INVALID
        ipa, n = extent
        size = n * self.ledger.granule
        memory = self.vm.memory
        if memory is None or not memory.contains(ipa, size):
            return INVALID
        try:
            change = apply(ipa, size, vcpu=call.vcpu)
        except LedgerFull as full:
            self._warn_full(full)
            return INVALID
        if change is None:  # already shared / not shared: pKVM refuses and changes nothing
            return INVALID
        self._delta.append([change.op[0], ipa, size, call.vcpu])
        if self.range_abi:
            return Result.of(SmcccResult.SUCCESS, n, notes=(change,))
        return Result(SUCCESS.regs, notes=(change,))

    def _warn_full(self, full: LedgerFull) -> None:
        # The first refusal and then each power of two: loud enough to be seen, never a flood.
        n = self.ledger.counters.full
        if n & (n - 1) == 0:
            self.log.warning("memshare ledger full (%s): VM %s's call refused with INVALID_PARAMETER "
                             "(%d so far); raise max_ranges if the guest is legitimately this fragmented",
                             full, self.vm.name, n)

    def _mmio_guard(self, call: Call) -> Result:
        extent = self._extent(call)
        memory = self.vm.memory
        if extent is None or memory is None:
            return INVALID
        ipa, n = extent
        end = ipa + n * self.ledger.granule
        if end > memory.limit or any(r.gpa < end and ipa < r.end for r in memory.regions):
            return INVALID  # beyond the IPA space, or RAM, which is never MMIO
        # Guarding again what is already guarded succeeds, as in pKVM.
        if len(self.guarded) >= MAX_GUARD_RANGES and not self.guarded.intersects(ipa - 1, end + 1):
            return INVALID
        if not self.guarded.covers(ipa, end):
            self.guarded.add(ipa, end)
            self._delta.append(["g", ipa, end])
        return Result.of(SmcccResult.SUCCESS, n) if self.range_abi else SUCCESS

    async def _delegate(self, name: str, call: Call) -> Result:
        target = self.vm.peer(name)
        if target is None or isinstance(target, MemshareHandler):
            fn = call.func_id & FUNC_NUM_MASK
            if fn not in self._complained:
                self._complained.add(fn)
                self.log.error("function %#x is delegated to %r, which is %s", fn, name,
                               "not a handler of this VM" if target is None else "another memshare handler")
            return NOT_SUPPORTED
        return await target.handle(call)

    # -- what other handlers and the daemon may read
    def interfaces(self) -> Mapping[type, object]:
        """The ledger, for another handler or backend that must check "did the guest
        share this?" before touching guest memory (``vm.interface(Ledger)``)."""
        return {Ledger: self.ledger}

    def guest_abi(self) -> dict[str, Any]:
        o = self.opts
        return {"abi": o.abi, "granule": o.granule, "mmio_guard": o.mmio_guard, "uid": list(o.uid),
                "revision": list(o.revision), "max_pages_per_call": o.max_pages_per_call}

    def report(self) -> dict[str, Any]:
        c = self.ledger.counters
        return {"shared_bytes": self.ledger.shared_bytes, "ranges": len(self.ledger.shared), "seq": self.ledger.seq,
                "granule": self.ledger.granule, "shares": c.shares, "unshares": c.unshares, "refused": c.refused,
                "refused_full": c.full, "max_ranges": self.opts.max_ranges,
                "peak_bytes": c.peak_bytes, "resets": c.resets, "mmio_guard_ranges": len(self.guarded)}

    # -- lifecycle
    def attach(self, reconnect: bool) -> Notes:
        self._fixed.update(self._discovery(kvm_ptp=self.vm.accel == "kvm" and self.vm.left_to_kvm(PTP_ID)))
        for fn, name in self.opts.delegate.items():
            target = self.vm.peer(name)
            if target is None or isinstance(target, MemshareHandler):
                self.log.error("delegate: function %#x names %r, which is not a non-memshare handler of VM %s; "
                               "the guest will get NOT_SUPPORTED for it", fn, name, self.vm.name)
        # A fresh VM process starts with nothing shared; a restored ledger (daemon
        # restart, migration) stands only for the VM that has run (HELLO's RECONNECT)
        # or, live, for the VMM already attached.
        if not reconnect and (self.ledger.shared_bytes or self.guarded):
            return self._reset()
        return ()

    def event(self, event: VmEvent) -> Notes:
        if event.kind is EventKind.VM_RESET:
            return self._reset()
        return ()

    def _reset(self) -> Notes:
        if self.ledger.granule != self.opts.granule:
            # A reload changed the granule; it takes effect now that the guest starts over.
            resets = self.ledger.counters.resets
            self.ledger = Ledger(self.opts.granule, max_ranges=self.opts.max_ranges)
            self.ledger.counters.resets = resets
        self.guarded.clear()
        self._delta.append(["r"])
        return (self.ledger.reset(),)

    def snapshot(self) -> dict[str, Any]:
        return self.frozen_snapshot()()

    def frozen_snapshot(self) -> Callable[[], dict[str, Any]]:
        # Copy-on-write copies (O(blocks)); the walk of millions of ranges into
        # JSON-able lists (seconds, bench/ledger_bench.py) runs when called.
        ledger, guarded = self.ledger.copy(max_ranges=None), self.guarded.copy()
        return lambda: {"ledger": ledger.to_dict(), "mmio_guard": [[lo, hi - lo] for lo, hi in guarded.ranges()]}

    def restore(self, data: dict[str, Any]) -> Notes:
        """Raises ValueError, leaving the state as it was, if ``data`` is not a snapshot."""
        if not isinstance(data, dict) or not isinstance(data.get("ledger"), dict):
            raise ValueError(f"not a memshare snapshot: {type(data).__name__} without a 'ledger' mapping")
        ledger = Ledger.from_dict(data["ledger"], max_ranges=self.opts.max_ranges)
        guarded = data.get("mmio_guard", [])
        if not (isinstance(guarded, list) and all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and v >= 0 for v in r)
                and not (r[0] | r[1]) & (ledger.granule - 1) for r in guarded)):
            raise ValueError(f"not a list of granule-aligned [ipa, size] MMIO ranges: {guarded!r}")
        return self._take(ledger, RangeSet((lo, lo + size) for lo, size in guarded))

    def adopt(self, previous: Handler) -> Notes:
        # A reload: copy the blocks, not the ranges, so a ledger of millions of
        # ranges changes hands without a walk on the event loop.  The content is
        # the same, so the journal goes on from it with no whole-ledger record.
        assert isinstance(previous, MemshareHandler)
        return self._take(previous.ledger.copy(max_ranges=self.opts.max_ranges), previous.guarded.copy(),
                          delta=list(previous._delta))

    def _take(self, ledger: Ledger, guarded: RangeSet, delta: list[list[Any]] | None = None) -> Notes:
        """Make ``ledger`` this handler's; ``delta``: what the journal still needs to
        hear (by default the whole new ledger, which replaces the old)."""
        if ledger.granule != self.opts.granule:
            self.log.warning("restored ledger uses granule %d, config says %d; keeping %d until the VM resets",
                             ledger.granule, self.opts.granule, ledger.granule)
        self.ledger = ledger
        self.guarded = guarded
        self._delta = [["S", self.snapshot()]] if delta is None else delta
        return (ledger,)  # subscribers start again from the restored ledger

    # -- the journal: one small record per change, never the ledger itself
    def take_delta(self) -> Any:
        if not self._delta:
            return None
        delta, self._delta = self._delta, []
        return delta

    def apply_delta(self, delta: Any) -> Notes:
        """Redo the changes of one :meth:`take_delta` record; a change the ledger
        refuses means the journal does not follow from this state (ValueError)."""
        if not isinstance(delta, list):
            raise ValueError(f"not a memshare delta: {type(delta).__name__}")
        notes: list[object] = []
        for op in delta:
            match op:
                case ["s" | "u" as kind, int(ipa), int(size), int(vcpu)]:
                    apply = self.ledger.share if kind == "s" else self.ledger.unshare
                    try:
                        change = apply(ipa, size, vcpu=vcpu)
                    except LedgerFull as full:
                        raise ValueError(f"replaying {op!r}: ledger full ({full})") from full
                    if change is None:
                        raise ValueError(f"replaying {op!r}: the ledger refuses it, so the journal does not "
                                         "follow from this state")
                    notes.append(change)
                case ["g", int(lo), int(hi)] if 0 <= lo < hi:
                    self.guarded.add(lo, hi)
                case ["r"]:
                    notes.extend(self._reset())
                case ["S", dict(data)]:
                    notes.extend(self.restore(data))
                case _:
                    raise ValueError(f"not a memshare journal entry: {op!r}")
        self._delta = []
        return tuple(notes)


__all__ = [
    "FEATURES_ID",
    "HYP_MEMINFO_ID",
    "KVM_FUNC_HAS_RANGE",
    "KVM_UID",
    "MEM_SHARE_ID",
    "MEM_UNSHARE_ID",
    "MMIO_GUARD_ID",
    "MemshareHandler",
    "MemshareOptions",
    "default_socket",
]
