"""pkvm-memshare without sockets: every function and error, both ABIs, and the
answers Linux's pKVM guest driver checks."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hvcproxyd.config import ConfigError
from hvcproxyd.core.guestmem import GuestMemory
from hvcproxyd.core.service import VmService
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.pkvm_memshare.handler import MAX_GUARD_RANGES, MemshareHandler
from hvcproxyd.handlers.pkvm_memshare.ledger import Ledger
from hvcproxyd.sidecars.eventstream import Subscriber
from hvcproxyd.sidecars.memshare import MemshareSidecar
from hvcproxyd.wire import CALL_AARCH32, N_ARGS, Call, EventKind, RamRegion, VmEvent
from tests import memshare_plugins

RAM, RAM_SIZE = 0x4000_0000, 1 << 20
MMIO = 0x0900_0000
INVALID = (1 << 64) - 3  # INVALID_PARAMETER as x0 carries it
NOT_SUPPORTED = (1 << 64) - 1


def call_val(fast: int, smc64: int, owner: int, fn: int) -> int:
    """ARM_SMCCC_CALL_VAL from include/linux/arm-smccc.h, spelled out independently."""
    return (fast << 31) | (smc64 << 30) | (owner << 24) | fn


# The IDs the Linux guest uses (include/linux/arm-smccc.h, ARM_SMCCC_OWNER_VENDOR_HYP = 6).
UID_ID = call_val(1, 0, 6, 0xFF01)
COUNT_ID = call_val(1, 0, 6, 0xFF00)
REVISION_ID = call_val(1, 0, 6, 0xFF03)
FEATURES_ID = call_val(1, 0, 6, 0)  # ARM_SMCCC_VENDOR_HYP_KVM_FEATURES_FUNC_ID
PTP_ID = call_val(1, 0, 6, 1)
MEMINFO_ID = call_val(1, 1, 6, 2)  # ..._HYP_MEMINFO_FUNC_ID
SHARE_ID = call_val(1, 1, 6, 3)  # ..._MEM_SHARE_FUNC_ID
UNSHARE_ID = call_val(1, 1, 6, 4)  # ..._MEM_UNSHARE_FUNC_ID
MMIO_GUARD_ID = call_val(1, 1, 6, 7)  # ..._MMIO_GUARD_FUNC_ID
# ARM_SMCCC_VENDOR_HYP_UID_KVM_REG_0..3: KVM's UID 28b46fb6-2ec5-11e9-a9ca-4b564d003a74.
KVM_UID_REGS = (0xB66FB428, 0xE911C52E, 0x564BCAA9, 0x743A004D)

CallFn = Callable[..., Awaitable[tuple[int, ...]]]


def make_service(make_config: Callable[[str], VmConfig], tmp_path: Path, options: str = "",
                 handlers: str = "", top: str = "", rule: str = "") -> VmService:
    """A VmService with ``ms`` (pkvm-memshare) owning the vendor-hyp range and 1 MiB of RAM
    at RAM; ``options`` from :func:`opts`, ``handlers``, ``top`` and more of the rule
    (``rule``) as YAML lines."""
    config = make_config("\n".join([
        "vm: t", top, "handlers:", "  ms:", "    type: pkvm-memshare", "    options:",
        f"      socket: {tmp_path / 'ms.sock'}", options, handlers,
        "rules:", "  - match: kvm-vendor", "    action: ms", rule, ""]))
    svc = VmService(config)
    svc.facts.memory = GuestMemory((RamRegion(RAM, RAM_SIZE),), 40)
    return svc


def caller(svc: VmService) -> CallFn:
    seq = itertools.count(1)

    async def call(fid: int, *args: int, vcpu: int = 0, flags: int = 0) -> tuple[int, ...]:
        padded = tuple(args) + (0,) * (N_ARGS - len(args))
        reply = await svc.dispatch(Call(next(seq), vcpu, fid, padded, flags))
        return reply.regs
    return call


def opts(**kv: object) -> str:
    """Option lines at the indentation make_service's template expects."""
    return "\n".join(f"      {k}: {v}" for k, v in kv.items())


@pytest.fixture
def svc(make_config: Callable[[str], VmConfig], tmp_path: Path) -> VmService:
    return make_service(make_config, tmp_path)


def handler(svc: VmService) -> MemshareHandler:
    inst = svc.instances["ms"]
    assert isinstance(inst, MemshareHandler)
    return inst


def sidecar(svc: VmService) -> MemshareSidecar:
    (side,) = svc.sidecars["ms"]
    assert isinstance(side, MemshareSidecar)
    return side


# ----------------------------------------------------------------- what the Linux guest checks

async def linux_pkvm_guest_probe(call: CallFn, page_size: int = 4096) -> dict[str, object] | None:
    """The decisions of kvm_init_hyp_services() and pkvm_init_hyp_services()
    (drivers/firmware/smccc/kvm_guest.c, drivers/virt/coco/pkvm-guest/arm-pkvm-guest.c):
    None when the guest would not use pKVM memory sharing."""
    if (await call(UID_ID))[:4] != KVM_UID_REGS:
        return None
    words = await call(FEATURES_ID)
    bitmap = sum((words[i] & 0xFFFF_FFFF) << (32 * i) for i in range(4))  # bitmap_from_arr32 of lower_32_bits

    def available(fn: int) -> bool:
        return fn < 128 and bool(bitmap >> fn & 1)

    if not all(available(fn) for fn in (2, 3, 4)):  # HYP_MEMINFO, MEM_SHARE, MEM_UNSHARE
        return None
    granule = (await call(MEMINFO_ID, 0, 0, 0))[0]
    if granule > page_size:  # unsigned: "Includes error codes"
        return None
    return {"granule": granule, "mmio_guard": available(7)}


async def linux_share_page(call: CallFn, fid: int, phys: int, granule: int, page_size: int = 4096) -> bool:
    """arm_smccc_do_one_page(): one call per granule of the page, x2 = x3 = 0."""
    for addr in range(phys, phys + page_size, granule):
        if (await call(fid, addr, 0, 0))[0] != 0:
            return False
    return True


async def test_unmodified_linux_guest_binds_and_shares(svc: VmService) -> None:
    call = caller(svc)
    probe = await linux_pkvm_guest_probe(call)
    assert probe == {"granule": 4096, "mmio_guard": False}
    # set_memory_decrypted() of two pages, then set_memory_encrypted() of the first.
    assert await linux_share_page(call, SHARE_ID, RAM, 4096)
    assert await linux_share_page(call, SHARE_ID, RAM + 4096, 4096)
    assert await linux_share_page(call, UNSHARE_ID, RAM, 4096)
    assert handler(svc).ledger.ranges() == [(RAM + 4096, 4096)]
    assert not await linux_share_page(call, UNSHARE_ID, RAM, 4096)  # not shared any more: -EPERM in the guest


async def test_linux_guest_gives_up_on_other_uid_or_large_granule(make_config: Callable[[str], VmConfig],
                                                                    tmp_path: Path) -> None:
    other = make_service(make_config, tmp_path, opts(uid="5f9b0a5e-6f1c-4a8e-9d7e-2b3c4d5e6f70"))
    assert await linux_pkvm_guest_probe(caller(other)) is None
    big = make_service(make_config, tmp_path, opts(granule=16384))
    call_big = caller(big)  # one VMM: its seqs keep increasing (protocol §5)
    assert await linux_pkvm_guest_probe(call_big, page_size=4096) is None
    assert await linux_pkvm_guest_probe(call_big, page_size=16384) == {"granule": 16384, "mmio_guard": False}
    guard = make_service(make_config, tmp_path, opts(mmio_guard="true"))
    assert await linux_pkvm_guest_probe(caller(guard)) == {"granule": 4096, "mmio_guard": True}


# ----------------------------------------------------------------- discovery and FEATURES

async def test_discovery_defaults(svc: VmService) -> None:
    call = caller(svc)
    assert await call(UID_ID) == KVM_UID_REGS
    assert await call(FEATURES_ID) == (0b11101, 0, 0, 0)  # FEATURES, HYP_MEMINFO, MEM_SHARE, MEM_UNSHARE
    assert await call(COUNT_ID) == (4, 0, 0, 0)
    assert await call(REVISION_ID) == (1, 0, 0, 0)
    # The 64-bit forms of SMC32 discovery/FEATURES do not exist.
    for fid in (UID_ID | 1 << 30, FEATURES_ID | 1 << 30):
        assert (await call(fid))[0] == NOT_SUPPORTED


@pytest.mark.parametrize(("accel", "left", "ptp_bit"), [("kvm", True, True), ("tcg", True, False),
                                                      ("kvm", False, False)])
async def test_features_lists_kvms_ptp_clock_when_left_to_kvm(make_config: Callable[[str], VmConfig], tmp_path: Path,
                                                              accel: str, left: bool, ptp_bit: bool) -> None:
    """``except: kvm-ptp`` leaves PTP to KVM: under KVM, FEATURES says so (bit 1), as
    KVM's own FEATURES does, so ptp_kvm keeps working; under TCG nothing answers it."""
    svc = make_service(make_config, tmp_path, rule="    except: kvm-ptp" if left else "")
    assert svc.ctx.left_to_kvm(PTP_ID) is left
    svc.facts.accel = accel
    handler(svc).attach(reconnect=False)
    call = caller(svc)
    assert (await call(FEATURES_ID))[0] == 0b11101 | (0b10 if ptp_bit else 0)
    assert (await call(COUNT_ID))[0] == 4 + ptp_bit


async def test_discovery_and_features_follow_options(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    svc = make_service(make_config, tmp_path,
                       opts(uid="[1, 2, 3, 4]", call_count=9, revision="[2, 5]", mmio_guard="true",
                            delegate="{1: ptp, 100: probe, 0x200: probe}"),
                       handlers="  ptp: {type: static, options: {regs: [0, 7]}}\n  probe: {type: deny}")
    call = caller(svc)
    assert await call(UID_ID) == (1, 2, 3, 4)
    assert await call(COUNT_ID) == (9, 0, 0, 0)
    assert await call(REVISION_ID) == (2, 5, 0, 0)
    # Bits 0-4 and 7 in w0, function 100 in w3 (bit 4); 0x200 is beyond the 128-bit bitmap.
    assert await call(FEATURES_ID) == (0b10011111, 0, 0, 1 << 4)


async def test_default_call_count_counts_delegates(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    svc = make_service(make_config, tmp_path, opts(delegate="{1: d, 0x300: d}"), handlers="  d: {type: deny}")
    assert (await caller(svc)(COUNT_ID))[0] == 6


async def test_delegation(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    svc = make_service(make_config, tmp_path, opts(delegate="{1: ptp, 5: nobody, 6: ms}"),
                       handlers="  ptp: {type: static, options: {regs: [0, 0x1234, 0x5678]}}")
    call = caller(svc)
    assert await call(PTP_ID, 0) == (0, 0x1234, 0x5678, 0)
    assert (await call(call_val(1, 1, 6, 5)))[0] == NOT_SUPPORTED  # names no handler of this VM
    assert (await call(call_val(1, 1, 6, 6)))[0] == NOT_SUPPORTED  # would loop back into memshare


async def test_other_functions_are_not_supported(svc: VmService) -> None:
    call = caller(svc)
    for fid in (PTP_ID, MMIO_GUARD_ID, call_val(1, 1, 6, 5), call_val(1, 1, 6, 0x7F), call_val(1, 0, 6, 0xFF02),
                call_val(1, 0, 6, 3), call_val(1, 0, 6, 2)):  # SMC32 forms of MEM_SHARE and HYP_MEMINFO
        assert await call(fid, RAM) == (NOT_SUPPORTED, 0, 0, 0), hex(fid)
    assert handler(svc).ledger.seq == 0


async def test_aarch32_caller_cannot_use_smc64_functions(svc: VmService) -> None:
    call = caller(svc)
    assert (await call(SHARE_ID, RAM, flags=CALL_AARCH32))[0] == NOT_SUPPORTED
    assert await call(UID_ID, flags=CALL_AARCH32) == KVM_UID_REGS
    assert handler(svc).ledger.seq == 0


async def test_sve_hint_is_ignored(svc: VmService) -> None:
    assert await caller(svc)(SHARE_ID | 1 << 16, RAM) == (0, 0, 0, 0)
    assert handler(svc).ledger.ranges() == [(RAM, 4096)]


# ----------------------------------------------------------------- HYP_MEMINFO

@pytest.mark.parametrize(("abi", "flags"), [("mainline", 0), ("range", 1)])
async def test_meminfo(make_config: Callable[[str], VmConfig], tmp_path: Path, abi: str, flags: int) -> None:
    call = caller(make_service(make_config, tmp_path, opts(abi=abi)))
    assert await call(MEMINFO_ID) == (4096, flags, 0, 0)  # KVM_FUNC_HAS_RANGE advertises the range ABI
    for args in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        assert await call(MEMINFO_ID, *args) == (INVALID, 0, 0, 0)


# ----------------------------------------------------------------- MEM_SHARE / MEM_UNSHARE, mainline

@pytest.mark.parametrize("fid", [SHARE_ID, UNSHARE_ID])
@pytest.mark.parametrize("args", [
    (RAM, 1, 0),  # mainline: x2 must be 0
    (RAM, 0, 1),  # x3 must be 0
    (RAM + 1, 0, 0),  # not granule-aligned
    (RAM + 0x800, 0, 0),
    (RAM - 4096, 0, 0),  # below RAM
    (RAM + RAM_SIZE, 0, 0),  # just past it
    (MMIO, 0, 0),
    ((1 << 40) - 4096, 0, 0),  # top of the IPA space, not RAM
    ((1 << 64) - 4096, 0, 0),  # beyond the IPA space
    (0, 0, 0),
])
async def test_mainline_bad_arguments(svc: VmService, fid: int, args: tuple[int, int, int]) -> None:
    call = caller(svc)
    if fid == UNSHARE_ID and args[0] == RAM:
        assert await call(SHARE_ID, RAM) == (0, 0, 0, 0)  # so that only the argument is wrong
    before = handler(svc).ledger.to_dict()
    assert await call(fid, *args) == (INVALID, 0, 0, 0)
    assert handler(svc).ledger.to_dict() == before


async def test_mainline_state_errors_leave_the_ledger_alone(svc: VmService) -> None:
    call, ledger = caller(svc), handler(svc).ledger
    last = RAM + RAM_SIZE - 4096
    assert await call(SHARE_ID, last) == (0, 0, 0, 0)  # the last granule of RAM is fine
    assert await call(SHARE_ID, last) == (INVALID, 0, 0, 0)  # already shared
    assert await call(UNSHARE_ID, RAM) == (INVALID, 0, 0, 0)  # never shared
    assert ledger.ranges() == [(last, 4096)] and ledger.counters.refused == 2
    assert await call(UNSHARE_ID, last) == (0, 0, 0, 0)
    assert await call(UNSHARE_ID, last) == (INVALID, 0, 0, 0)  # not any more
    assert ledger.ranges() == [] and ledger.seq == 2


async def test_changes_reach_stream_subscribers_with_vcpu(svc: VmService) -> None:
    stream = sidecar(svc).stream
    assert stream is not None
    sub = Subscriber()
    stream.subscribers.append(sub)
    await caller(svc)(SHARE_ID, RAM + 0x3000, vcpu=3)
    assert len(sub.queue) == 1 and isinstance(sub.queue[0], bytes)  # a change is one whole line
    rec = json.loads(sub.queue[0])
    assert {k: rec[k] for k in ("type", "seq", "vcpu", "ipa", "size", "shared")} == {
        "type": "share", "seq": 1, "vcpu": 3, "ipa": RAM + 0x3000, "size": 4096, "shared": 4096}


# ----------------------------------------------------------------- the range ABI

@pytest.fixture
def rsvc(make_config: Callable[[str], VmConfig], tmp_path: Path) -> VmService:
    return make_service(make_config, tmp_path, opts(abi="range", max_pages_per_call=8))


async def test_range_abi_counts(rsvc: VmService) -> None:
    call, ledger = caller(rsvc), handler(rsvc).ledger
    assert await call(SHARE_ID, RAM, 0) == (0, 1, 0, 0)  # 0 is a mainline guest's one granule
    assert await call(SHARE_ID, RAM + 0x1000, 3) == (0, 3, 0, 0)
    assert await call(SHARE_ID, RAM + 0x10000, 20) == (0, 8, 0, 0)  # cut to max_pages_per_call
    assert await call(SHARE_ID, RAM + 0x18000, (1 << 64) - 1) == (0, 8, 0, 0)
    assert ledger.ranges() == [(RAM, 0x4000), (RAM + 0x10000, 0x10000)]
    assert await call(UNSHARE_ID, RAM + 0x1000, 2) == (0, 2, 0, 0)
    assert ledger.ranges() == [(RAM, 0x1000), (RAM + 0x3000, 0x1000), (RAM + 0x10000, 0x10000)]


async def test_range_abi_errors_are_all_or_nothing(rsvc: VmService) -> None:
    call, ledger = caller(rsvc), handler(rsvc).ledger
    assert await call(SHARE_ID, RAM + 0x4000) == (0, 1, 0, 0)
    before = ledger.to_dict()
    for fid, args in ((SHARE_ID, (RAM, 8)),  # its fifth page is shared already
                      (UNSHARE_ID, (RAM + 0x3000, 2)),  # its first page is not shared
                      (SHARE_ID, (RAM, 1, 1)),  # x3 must be 0
                      (SHARE_ID, (RAM + 0x10, 1)),
                      (SHARE_ID, (RAM + RAM_SIZE - 0x2000, 3)),  # runs off the end of RAM
                      (SHARE_ID, ((1 << 64) - 0x1000, 2))):  # would wrap around
        assert await call(fid, *args) == (INVALID, 0, 0, 0), (hex(fid), args)
    assert ledger.to_dict()["ranges"] == before["ranges"]


# ----------------------------------------------------------------- MMIO_GUARD

async def test_mmio_guard(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    svc = make_service(make_config, tmp_path, opts(mmio_guard="true"))
    call, h = caller(svc), handler(svc)
    assert await call(MMIO_GUARD_ID, MMIO) == (0, 0, 0, 0)
    assert await call(MMIO_GUARD_ID, MMIO) == (0, 0, 0, 0)  # again: fine, as in pKVM
    for args in ((RAM,), (RAM + RAM_SIZE - 4096,), (MMIO + 1,), (MMIO, 1), (MMIO, 0, 1), (1 << 40,),
                 ((1 << 64) - 4096,)):
        assert await call(MMIO_GUARD_ID, *args) == (INVALID, 0, 0, 0), args
    assert h.guarded.ranges() == [(MMIO, MMIO + 4096)]
    assert h.ledger.seq == 0  # MMIO is not shared memory


async def test_mmio_guard_ranges_are_bounded(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    svc = make_service(make_config, tmp_path, opts(mmio_guard="true"))
    call = caller(svc)
    for i in range(MAX_GUARD_RANGES):  # every other page: no two merge
        assert (await call(MMIO_GUARD_ID, 2 * i * 4096))[0] == 0
    assert (await call(MMIO_GUARD_ID, 2 * MAX_GUARD_RANGES * 4096))[0] == INVALID
    assert (await call(MMIO_GUARD_ID, 4096))[0] == 0  # fills a hole: one range fewer, so allowed
    assert len(handler(svc).guarded) == MAX_GUARD_RANGES - 1


async def test_ledger_bound_gives_the_guest_invalid_parameter(make_config: Callable[[str], VmConfig],
                                                               tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    svc = make_service(make_config, tmp_path, opts(max_ranges=3))
    call, h = caller(svc), handler(svc)
    for i in range(3):  # every other page: no two merge
        assert (await call(SHARE_ID, RAM + 2 * i * 4096))[0] == 0
    for _ in range(3):
        assert (await call(SHARE_ID, RAM + 6 * 4096))[0] == INVALID
    assert (await call(UNSHARE_ID, RAM))[0] == 0  # shrinking is always allowed
    assert (await call(SHARE_ID, RAM + 6 * 4096))[0] == 0
    report = h.report()
    assert (report["ranges"], report["refused_full"], report["max_ranges"], report["refused"]) == (3, 3, 3, 0)
    full = [r for r in caplog.records if "ledger full" in r.getMessage()]
    assert len(full) == 2  # the first refusal and the second (powers of two), not the third
    assert "raise max_ranges" in full[0].getMessage()


# ----------------------------------------------------------------- lifecycle, queries, plugins

async def test_vm_reset_clears_the_ledger(svc: VmService) -> None:
    call, h = caller(svc), handler(svc)
    await call(SHARE_ID, RAM)
    svc.event(VmEvent(EventKind.VM_RESET))
    assert h.ledger.ranges() == [] and h.ledger.counters.resets == 1
    assert (await call(SHARE_ID, RAM))[0] == 0  # shareable again


async def test_snapshot_restore_and_attach(make_config: Callable[[str], VmConfig], tmp_path: Path,
                                           svc: VmService) -> None:
    call, h = caller(svc), handler(svc)
    await call(SHARE_ID, RAM)
    await call(SHARE_ID, RAM + 0x2000)
    data = svc.snapshot()
    other = make_service(make_config, tmp_path)
    h2 = handler(other)
    h2.restore(data["ms"])
    h2.attach(reconnect=True)  # the VM that has run (a daemon restart): the restored state stands
    assert h2.ledger.shared == h.ledger.shared and h2.ledger.seq == h.ledger.seq
    h2.attach(reconnect=False)  # a fresh VM process: starts with nothing shared
    assert h2.ledger.ranges() == []


async def test_restore_refuses_corrupt_state(make_config: Callable[[str], VmConfig], tmp_path: Path,
                                             svc: VmService) -> None:
    good = handler(svc).snapshot()
    h = handler(make_service(make_config, tmp_path, opts(mmio_guard="true")))
    for bad in ({**good, "mmio_guard": [[0x9000000, 5]]}, {**good, "mmio_guard": "x"},
                {**good, "ledger": {**good["ledger"], "ranges": [[RAM + 1, 4096]]}}):
        with pytest.raises(ValueError):
            h.restore(bad)
    h.restore({**good, "mmio_guard": [[MMIO, 8192]]})
    assert h.guarded.ranges() == [(MMIO, MMIO + 8192)]


async def test_reload_keeps_the_ledger_and_the_sidecar(svc: VmService) -> None:
    await caller(svc)(SHARE_ID, RAM)
    before = sidecar(svc)
    change = svc.reload(svc.config)
    assert handler(svc).ledger.ranges() == [(RAM, 4096)]
    # Same options: the running sidecar (and its subscribers) follows the new instance.
    assert change.started == [] and change.stopped == [] and sidecar(svc) is before
    assert before.handler is handler(svc)


async def test_reload_with_new_options_replaces_the_sidecar(make_config: Callable[[str], VmConfig],
                                                             tmp_path: Path, svc: VmService) -> None:
    await caller(svc)(SHARE_ID, RAM)
    before = sidecar(svc)
    changed = make_service(make_config, tmp_path, opts(subscriber_queue=7)).config
    change = svc.reload(changed)
    after = sidecar(svc)
    # Other options: the old sidecar is stopped, a new one serves the new instance, state carried over.
    assert change.stopped == [before] and change.started == [after] and after is not before
    assert after.handler is handler(svc) and after.stream is not None and after.stream.queue_limit == 7
    assert handler(svc).ledger.ranges() == [(RAM, 4096)]


async def test_query_api_for_other_handlers(svc: VmService) -> None:
    await caller(svc)(SHARE_ID, RAM + 0x1000)
    ledger = svc.ctx.interface(Ledger)
    assert ledger is handler(svc).ledger
    assert ledger.is_shared(RAM + 0x1800, 0x800)
    assert not ledger.is_shared(RAM + 0x1800, 0x801)


async def test_in_process_subscribers(make_config: Callable[[str], VmConfig], tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    svc = make_service(make_config, tmp_path,
                       opts(subscribers="[log, 'tests.memshare_plugins:Exploder', 'tests.memshare_plugins:Recorder']"))
    recorder = memshare_plugins.RECORDERS[-1]
    call = caller(svc)
    with caplog.at_level(logging.INFO):
        assert await call(SHARE_ID, RAM) == (0, 0, 0, 0)  # the exploding plugin does not reach the guest
        assert await call(UNSHARE_ID, RAM) == (0, 0, 0, 0)
    assert [(c.op, c.ipa) for c in recorder.changes] == [("share", RAM), ("unshare", RAM)]
    assert recorder.snapshots == [[]]
    assert any("share vcpu 0 ipa 0x40000000" in r.getMessage() for r in caplog.records)  # the log entry point
    assert sum("subscriber Exploder failed" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize(("options", "message"), [
    (opts(granule=8192), "granule: must be one of 4096, 16384, 65536"),
    (opts(abi="android"), "'android' is not valid; one of: mainline, range"),
    (opts(delegate="{3: x}"), "function 0x3 is answered by this handler itself"),
    (opts(delegate="{0xff01: x}"), "answered by this handler itself"),
    (opts(delegate="{0x10000: x}"), "must be a function number"),
    (opts(delegate="{1: 5}"), "must name a handler"),
    (opts(subscribers="[nope]"), "no memshare subscriber 'nope'; installed: log"),
    (opts(subscribers="['tests.memshare_plugins:NotASubscriber']"), "is not a LedgerSubscriber subclass"),
    (opts(subscribers="['tests.nowhere:X']"), "cannot load"),
    (opts(subscribers="log"), "must be a list"),
    (opts(max_pages_per_call=0), "max_pages_per_call"),
    (opts(max_ranges=0), "max_ranges"),
    (opts(colour="blue"), "unknown key"),
])
def test_option_problems(make_config: Callable[[str], VmConfig], tmp_path: Path, options: str,
                         message: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_service(make_config, tmp_path, options)
    assert message in str(err.value)


def test_version_pin(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    make_service(make_config, tmp_path, opts(revision="[1, 2]"), top='versions: {kvm-vendor: "1.2"}')
    with pytest.raises(ConfigError, match="cannot provide"):
        make_service(make_config, tmp_path, top='versions: {kvm-vendor: "2.0"}')


async def test_a_frozen_snapshot_is_the_state_when_it_was_taken(svc: VmService) -> None:
    """What a compaction or a state save builds in a thread is the ledger at the
    moment it was frozen, whatever calls changed after."""
    call, h = caller(svc), handler(svc)
    await call(SHARE_ID, RAM)
    want = h.snapshot()
    build = h.frozen_snapshot()
    await call(SHARE_ID, RAM + 0x2000)
    await call(UNSHARE_ID, RAM)
    assert build() == want
    assert h.ledger.ranges() == [(RAM + 0x2000, 4096)]


async def test_a_reload_journals_no_whole_ledger(svc: VmService) -> None:
    """adopt() hands over the same content: the journal needs only the changes the
    old instance had not given it yet, never a whole-ledger record (a walk of
    millions of ranges on the loop)."""
    await caller(svc)(SHARE_ID, RAM)  # its change was taken after the call
    svc.reload(svc.config)
    assert handler(svc).take_delta() is None  # before: [["S", <the whole ledger>]]
    assert handler(svc).ledger.ranges() == [(RAM, 4096)]
