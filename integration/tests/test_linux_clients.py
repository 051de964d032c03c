"""Real Linux clients of hvcproxyd's services under the patched QEMU (TCG).

The client kernel (integration/linux/build-kernel.sh: Debian's 6.12 source,
allnoconfig + kernel.config, with the pKVM guest, FF-A and OP-TEE drivers)
boots with a DTB from linux_dt.build_dtb: QEMU's own tree plus a
restricted-dma-pool attached to the virtio-mmio transport of a virtio-blk
disk, the way a pKVM guest gets its bounce buffers.

- Linux's pKVM guest driver probes against the pkvm-memshare handler
  (KVM UID, FEATURES, HYP_MEMINFO granule from the kernel log).
- Attaching the pool decrypts it: one MEM_SHARE per page.  The ledger then holds
  exactly the pool plus Linux's atomic DMA pools (kernel/dma/pool.c decrypts
  those at postcore_initcall on any guest with memory encryption ops, which is
  what pKVM guests do too; their sizes are in the kernel log).  Disk I/O
  bounces through the pool and still returns the right data.
- The memshare test module shares, refuses a double share of, and unshares pages.
- A subscriber (``hvcproxyd memshare watch``) sees the same changes live; a
  guest reboot empties the ledger with the VM reset.
- FF-A probes and fails cleanly without an FF-A handler; OP-TEE's DT node is found.
- Debian's stock kernel runs against the same config (it has no pKVM driver).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from linux_clients import (  # noqa: F401  (client_kernel is a fixture)
    PKVM_GUEST_CONFIG,
    VENDOR_ONLY_CONFIG,
    Console,
    Watcher,
    client_kernel,
    memshare_ls,
    memshare_ls_text,
    ranges_to_pages,
    replay,
    write_config,
)
from linux_dt import RestrictedPool, build_dtb, decompile, dump_dtb, first_device_transport, optee_node
from qemu_harness import Daemon, Qemu, StartDaemon, StartQemu

from tests.waiting import poll

pytestmark = pytest.mark.integration


BOOT_TIMEOUT = 240
SMP = 2
MEMORY = "512M"
MACHINE = ["-M", "virt", "-cpu", "max", "-smp", str(SMP), "-m", MEMORY]
GRANULE = 4096
# The last 16 MiB of the 512 MiB of RAM at 0x40000000, clear of the kernel, initrd and DTB.
POOL = 0x5F00_0000
POOL_SIZE = 1 << 20
POOL_PAGES = {POOL + off for off in range(0, POOL_SIZE, GRANULE)}
DISK_SIZE = 1 << 20
# kvm_init_hyp_services() prints FEATURES as w3 w2 w1 w0: FEATURES, HYP_MEMINFO, MEM_SHARE, MEM_UNSHARE.
KVM_SERVICES = "smccc: KVM: hypervisor services detected (0x00000000 0x00000000 0x00000000 0x0000001d)"
PKVM_PROBE = f"pkvm-guest: HYP_MEMINFO granule {GRANULE}, memory sharing enabled"


def _pool_dtb(qemu_bin: Path, workdir: Path) -> tuple[Path, RestrictedPool]:
    dts = decompile(dump_dtb(qemu_bin, MACHINE, workdir / "probe.dtb"))
    pool = RestrictedPool(POOL, POOL_SIZE, (first_device_transport(dts),))
    dtb, final = build_dtb(qemu_bin, MACHINE, workdir, [pool.dts()], name="pool")
    assert 'compatible = "restricted-dma-pool"' in final
    return dtb, pool


def _disk(workdir: Path) -> tuple[Path, str]:
    data = hashlib.shake_256(b"hvcproxyd linux clients").digest(DISK_SIZE)
    disk = workdir / "disk.img"
    disk.write_bytes(data)
    return disk, hashlib.md5(data).hexdigest()


def _boot(start_qemu: StartQemu, kernel: Path, daemon: Daemon, dtb: Path | None, disk: Path | None = None,
          cmdline: str = "") -> Qemu:
    args = ["-kernel", str(kernel / "Image"), "-initrd", str(kernel / "initramfs.cpio.gz"),
            "-append", f"console=ttyAMA0 rdinit=/init panic=-1 {cmdline}".strip()]
    if dtb is not None:
        args += ["-dtb", str(dtb)]
    if disk is not None:
        # Modern virtio-mmio, so that VIRTIO_F_ACCESS_PLATFORM (bit 33) can be
        # offered: with it the driver uses the DMA API, which bounces through the pool.
        args += ["-global", "virtio-mmio.force-legacy=false",
                 "-drive", f"file={disk},if=none,format=raw,id=d0",
                 "-device", "virtio-blk-device,drive=d0,iommu_platform=on"]
    return start_qemu(*args, forwarder=daemon.socket, smp=SMP, memory=MEMORY, forwarder_opts=",vm-name=linux")


def _start(start_daemon: StartDaemon, workdir: Path, template: Path = PKVM_GUEST_CONFIG,
           **memshare_options: object) -> tuple[Daemon, Path]:
    ms_sock = workdir / "memshare.sock"
    daemon = start_daemon(config=write_config(template, workdir, ms_sock, memshare_options))
    poll(ms_sock.exists, f"the memshare stream {ms_sock}", timeout=20, log=daemon.log_path)
    return daemon, ms_sock


def _assert_probe(out: str) -> None:
    assert "SMC Calling Convention v1.2" in out, out
    assert KVM_SERVICES in out, out
    assert PKVM_PROBE in out, out
    assert f"Reserved memory: created restricted DMA pool at 0x{POOL:016x}, size 1 MiB" in out, out


def _ledger_pages(ms_sock: Path) -> set[int]:
    return ranges_to_pages(memshare_ls(ms_sock)["ranges"])


def _atomic_pool_bytes(out: str) -> int:
    """What kernel/dma/pool.c says it preallocated (and so decrypted) for atomic DMA allocations."""
    sizes = [int(k) * 1024 for k in re.findall(r"DMA: preallocated (\d+) KiB \S+ pool for atomic allocations", out)]
    assert sizes, f"no atomic DMA pool lines in the kernel log:\n{out[-4000:]}"
    return sum(sizes)


def _assert_boot_shares(out: str, pages: set[int]) -> set[int]:
    """The ledger after boot is the restricted pool plus the atomic DMA pools; returns the latter."""
    assert pages.issuperset(POOL_PAGES), f"the pool is not in the ledger: {sorted(POOL_PAGES - pages)[:4]}..."
    atomic = pages - POOL_PAGES
    assert len(atomic) * GRANULE == _atomic_pool_bytes(out), (len(atomic), _atomic_pool_bytes(out))
    return atomic


@dataclass
class BootedGuest:
    daemon: Daemon
    ms_sock: Path
    watcher: Watcher
    q: Qemu
    con: Console
    pool: RestrictedPool
    disk: Path
    md5: str


@contextmanager
def _booted_with_a_watcher(qemu_bin: Path, kernel: Path, start_daemon: StartDaemon, start_qemu: StartQemu,
                           workdir: Path) -> Iterator[BootedGuest]:
    """The memshare daemon, a subscriber that has its first snapshot, and the client
    kernel booted to its prompt with the restricted DMA pool and a virtio disk; the
    subscriber is stopped on the way out, whatever the test did."""
    daemon, ms_sock = _start(start_daemon, workdir)
    watcher = Watcher(ms_sock, workdir / "watch.log")
    try:
        watcher.wait_for(lambda r: r and r[0]["type"] == "snapshot", 20, "snapshot")
        dtb, pool = _pool_dtb(qemu_bin, workdir)
        disk, md5 = _disk(workdir)
        q = _boot(start_qemu, kernel, daemon, dtb, disk)
        con = Console(q)
        con.wait(r"^HVCTEST: ready", BOOT_TIMEOUT)
        yield BootedGuest(daemon, ms_sock, watcher, q, con, pool, disk, md5)
    finally:
        watcher.stop()


def test_pkvm_guest_shares_its_dma_pool(qemu_bin: Path, client_kernel: Path, start_daemon: StartDaemon,  # noqa: F811
                                        start_qemu: StartQemu, workdir: Path) -> None:
    with _booted_with_a_watcher(qemu_bin, client_kernel, start_daemon, start_qemu, workdir) as g:
        daemon, ms_sock, watcher, q, con = g.daemon, g.ms_sock, g.watcher, g.q, g.con
        pool, disk, md5 = g.pool, g.disk, g.md5
        out = q.output()
        _assert_probe(out)
        assert re.search(r"virtio_blk virtio0: .*\[vda\] 2048 512-byte logical blocks", out), out

        # The pool is shared, page by page, and besides it only the atomic DMA pools.
        snap = memshare_ls(ms_sock)
        boot_pages = ranges_to_pages(snap["ranges"])
        atomic = _assert_boot_shares(out, boot_pages)
        assert snap["shared"] == len(boot_pages) * GRANULE and snap["granule"] == GRANULE, snap
        assert snap["counters"]["shares"] == len(boot_pages), snap  # one call per granule
        assert snap["counters"]["refused"] == 0, snap
        assert f"{POOL:#014x}" in memshare_ls_text(ms_sock)
        recs = watcher.wait_for(lambda r: replay(r) == boot_pages, 20, "the boot's shares")
        shares = [r["ipa"] for r in recs if r["type"] == "share"]
        assert len(shares) == len(boot_pages)
        # Initcall order: the atomic pools (postcore) before the pool (device probe).
        assert set(shares[:len(atomic)]) == atomic and set(shares[len(atomic):]) == POOL_PAGES

        # The disk sits on the transport the pool is attached to.
        _, lines = con.run("sh readlink -f /sys/block/vda")
        transport = pool.devices[0].removeprefix("/virtio_mmio@")
        assert f"/platform/{transport}.virtio_mmio/virtio0/" in lines[0], lines

        # Disk traffic bounces through the shared pool and arrives intact.
        _, lines = con.run(f"blk-md5 vda {DISK_SIZE}")
        assert f"md5 {md5}" in lines, lines
        pool_dir = f"restricted-dma@{POOL:x}"
        # debugfs: swiotlb/<pool> or, probed before swiotlb's late_initcall, <pool> at the top.
        _, lines = con.run(f"sh d=$(find /sys/kernel/debug -maxdepth 2 -name {pool_dir}); "
                           "cat $d/io_tlb_nslabs $d/io_tlb_used_hiwater")
        nslabs, hiwater = (int(line.split()[-1]) for line in lines)
        assert nslabs == POOL_SIZE // 2048 and hiwater > 0, lines
        con.run("blk-write vda HVCPROXYD-LINUX-WAS-HERE")

        # The test module: share 4 pages, a refused second share, unshare.
        con.run("insmod")
        con.run("share 4")
        _, lines = con.run("regions")
        m = re.fullmatch(r"region 0x([0-9a-f]+) 4", lines[0])
        assert m, lines
        region = int(m[1], 16)
        region_pages = {region + off for off in range(0, 4 * GRANULE, GRANULE)}
        assert _ledger_pages(ms_sock) == boot_pages | region_pages
        assert not region_pages & boot_pages
        rc, _ = con.run("reshare", ok=False)
        assert rc != 0  # MEM_SHARE of a shared page: INVALID_PARAMETER, the driver's -EPERM
        assert "Operation not permitted" in q.output(), q.output()[-2000:]
        snap = memshare_ls(ms_sock)
        assert ranges_to_pages(snap["ranges"]) == boot_pages | region_pages
        assert snap["counters"]["refused"] == 1, snap
        con.run("unshare")
        snap = memshare_ls(ms_sock)
        assert ranges_to_pages(snap["ranges"]) == boot_pages, snap
        assert snap["counters"]["unshares"] == 4, snap
        assert f"hvcproxyd-memshare: unshared 4 pages at {region:#x}" in q.output()

        # The subscriber saw the same changes, live, in order.
        recs = watcher.wait_for(lambda r: sum(x["type"] == "unshare" for x in r) == 4, 20, "the unshares")
        assert replay(recs) == boot_pages
        module = [r for r in recs if r["type"] in ("share", "unshare") and r["ipa"] in region_pages]
        assert [r["type"] for r in module] == ["share"] * 4 + ["unshare"] * 4, module
        assert {r["ipa"] for r in module} == region_pages

        q.send("poweroff\n")  # PSCI SYSTEM_OFF: QEMU exits 0

        assert q.wait(60) == 0, q.output()[-3000:]
        assert disk.read_bytes().startswith(b"HVCPROXYD-LINUX-WAS-HERE")
    daemon_log = daemon.log.lower()
    for fid in (0x8600FF01, 0x86000000, 0xC6000002, 0xC6000003, 0xC6000004):  # UID, FEATURES, MEMINFO, SHARE, UNSHARE
        assert f"{fid:#010x}" in daemon_log, f"no {fid:#010x} in the daemon log:\n{daemon.log[-3000:]}"


def test_pkvm_guest_reboot_empties_the_ledger(qemu_bin: Path, client_kernel: Path,  # noqa: F811
                                              start_daemon: StartDaemon, start_qemu: StartQemu,
                                              workdir: Path) -> None:
    with _booted_with_a_watcher(qemu_bin, client_kernel, start_daemon, start_qemu, workdir) as g:
        daemon, ms_sock, watcher, q, con = g.daemon, g.ms_sock, g.watcher, g.q, g.con
        boot_pages = _ledger_pages(ms_sock)
        _assert_boot_shares(q.output(), boot_pages)
        con.run("insmod")
        con.run("share 2")
        assert len(_ledger_pages(ms_sock)) == len(boot_pages) + 2
        first = len(watcher.snapshot())

        q.send("reboot\n")
        daemon.wait_log(r"VMM event VM_RESET", timeout=BOOT_TIMEOUT)
        rebooted = q.output().rindex("HVCTEST: begin reboot")
        con.wait(r"^HVCTEST: ready", BOOT_TIMEOUT, start=rebooted)
        _assert_probe(q.output()[rebooted:])
        assert q.output().count("HVCTEST: init start") == 2

        # The subscriber saw the reset (nothing shared), then the second boot's shares.
        second = q.output()[rebooted:]
        expected = len(POOL_PAGES) + _atomic_pool_bytes(second) // GRANULE

        def rebooted_and_shared(r: list[dict[str, object]]) -> bool:
            resets = [i for i in range(first, len(r)) if r[i]["type"] == "reset"]
            return bool(resets) and len(replay(r)) == expected

        recs = watcher.wait_for(rebooted_and_shared, 30, "the reset and the second boot's shares")
        reset_at = next(i for i in range(first, len(recs)) if recs[i]["type"] == "reset")
        assert recs[reset_at]["shared"] == 0, recs[reset_at]
        assert replay(recs[:reset_at + 1]) == set()
        snap = memshare_ls(ms_sock)
        pages = ranges_to_pages(snap["ranges"])
        _assert_boot_shares(second, pages)
        assert replay(recs) == pages
        assert snap["counters"]["resets"] >= 1, snap
        q.send("poweroff\n")
        assert q.wait(60) == 0


def test_pkvm_guest_mmio_guard(client_kernel: Path, start_daemon: StartDaemon,  # noqa: F811
                               start_qemu: StartQemu, workdir: Path) -> None:
    """With mmio_guard on, FEATURES offers bit 7 and Linux guards every device page it
    ioremaps (the PL011, the GIC, the virtio-mmio transports) with MMIO_GUARD; the
    handler accepts each (a refusal would be a WARN in the kernel log)."""
    daemon, _ = _start(start_daemon, workdir, mmio_guard=True)
    q = _boot(start_qemu, client_kernel, daemon, None, cmdline="hvctest=poweroff")
    assert q.wait(BOOT_TIMEOUT) == 0, q.output()[-4000:]
    out = q.output()
    # FEATURES now also has bit 7 (MMIO_GUARD): 0x9d.
    assert KVM_SERVICES.replace("0x0000001d", "0x0000009d") in out, out
    assert PKVM_PROBE in out and "pkvm-guest: MMIO guard enabled" in out, out
    assert "WARNING:" not in out, out
    guards = [line for line in daemon.log.splitlines() if re.search(r"(?i)\b0xc6000007\b", line)]
    assert guards, daemon.log[-3000:]
    assert not [line for line in guards if "INVALID" in line], guards
    assert any("ipa=0x9000000)" in line and "SUCCESS" in line for line in guards), guards  # the PL011


def test_pkvm_guest_with_only_vendor_hyp_forwarded(qemu_bin: Path, client_kernel: Path,  # noqa: F811
                                                    start_daemon: StartDaemon, start_qemu: StartQemu,
                                                    workdir: Path) -> None:
    """config/memshare.yaml as users write it: PSCI stays QEMU's, owner 6 goes to hvcproxyd.
    Linux asks PSCI_FEATURES(SMCCC_VERSION) before SMCCC_VERSION (psci_init_smccc); QEMU's own
    PSCI does not know it, so the forwarder answers it as KVM does, and SMCCC 1.2 is seen."""
    daemon, ms_sock = _start(start_daemon, workdir, VENDOR_ONLY_CONFIG)
    dtb, _ = _pool_dtb(qemu_bin, workdir)
    disk, md5 = _disk(workdir)
    q = _boot(start_qemu, client_kernel, daemon, dtb, disk)
    con = Console(q)
    con.wait(r"^HVCTEST: ready", BOOT_TIMEOUT)
    out = q.output()
    assert "psci: PSCIv1.1 detected in firmware" in out, out  # QEMU's own PSCI
    _, lines = con.run(f"blk-md5 vda {DISK_SIZE}")
    assert f"md5 {md5}" in lines, lines
    smccc = re.search(r"SMC Calling Convention v(\d+\.\d+)", out)
    try:
        assert smccc and smccc[1] == "1.2", smccc and smccc[0]
        _assert_probe(out)
        _assert_boot_shares(out, _ledger_pages(ms_sock))
    finally:
        q.send("poweroff\n")
        assert q.wait(60) == 0


def test_ffa_and_optee_probe_fail_cleanly_without_handlers(qemu_bin: Path, client_kernel: Path,  # noqa: F811
                                                            start_daemon: StartDaemon, start_qemu: StartQemu,
                                                            workdir: Path) -> None:
    """SMCCC 1.2 reaches the FF-A driver, whose FFA_VERSION goes to hvcproxyd (a `log`
    handler: NOT_SUPPORTED); OP-TEE is found through the DT node and its UID query
    fails. Both give up with a log line and the boot carries on."""
    daemon, _ = _start(start_daemon, workdir)
    dtb, final = build_dtb(qemu_bin, MACHINE, workdir, [optee_node("hvc")], name="optee")
    assert 'compatible = "linaro,optee-tz"' in final
    q = _boot(start_qemu, client_kernel, daemon, dtb, cmdline="hvctest=poweroff")
    assert q.wait(BOOT_TIMEOUT) == 0, q.output()[-4000:]
    out = q.output()
    assert "SMC Calling Convention v1.2" in out, out
    assert "ARM FF-A: FFA_VERSION returned not supported" in out, out
    assert "optee: probing for conduit method." in out, out
    assert "optee: api uid mismatch" in out, out
    assert f"HVCTEST: online=0-{SMP - 1}" in out, out
    daemon.wait_log(r"(?i)0x84000063", timeout=5)  # FFA_VERSION reached the daemon


def test_stock_debian_kernel_against_the_memshare_handler(start_daemon: StartDaemon, start_qemu: StartQemu,
                                                          linux_guest: Path, workdir: Path) -> None:
    """Debian's stock cloud kernel (no CONFIG_ARM_PKVM_GUEST) finds KVM's services
    through the handler, boots with PSCI from the daemon, and shares nothing."""
    daemon, ms_sock = _start(start_daemon, workdir)
    q = start_qemu("-kernel", str(linux_guest / "vmlinuz"), "-initrd", str(linux_guest / "initramfs.cpio.gz"),
                   "-append", "console=ttyAMA0 rdinit=/init panic=-1 hvctest=poweroff",
                   forwarder=daemon.socket, smp=4, memory=MEMORY)
    assert q.wait(BOOT_TIMEOUT) == 0, q.output()[-4000:]
    out = q.output()
    assert "HVCTEST: online=0-3" in out, out
    assert "SMC Calling Convention v1.2" in out, out
    assert KVM_SERVICES in out, out
    assert "pkvm-guest:" not in out
    snap = memshare_ls(ms_sock)
    assert snap["ranges"] == [] and snap["counters"]["shares"] == 0, snap
