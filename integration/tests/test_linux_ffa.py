"""Linux's own FF-A driver (drivers/firmware/arm_ffa) against hvcproxyd's ffa
handler, under the patched QEMU (TCG) with the client kernel
(CONFIG_ARM_FFA_TRANSPORT=y, integration/linux/build-kernel.sh).

The forwarder reports SMCCC 1.2 (its ``smccc-version``), which the driver
needs; config/ffa.yaml forwards the FF-A range and offers two partitions.
The driver negotiates (it speaks 1.1, we offer 1.2 and it downgrades), maps
its RX/TX pair, enumerates the partitions (count first, then the 24-byte
records in RX, then RX_RELEASE) and registers one FF-A bus device per
partition; sysfs shows each one's UUID and ID.

Notifications need their interrupt (the NPI), which Linux maps only as an SGI
of a GICv3 in the device tree.  The first test runs on -M virt's default
GICv2: the forwarder offers no INTERRUPT frame without a GICv3, so FEATURES
does not offer the NPI and the driver goes on without notifications.  The
second runs on a GICv3, where the forwarder makes SGI 8 pending when the
daemon asks (QEMU patch 0008/0009).

init-clients then loads ``ffa_echo_test.ko`` (integration/linux/ffa-echo-test/),
an FF-A bus driver for the echo partition's UUID: its probe sends one 64-bit
direct request (the partition is AArch64, so the driver uses
FFA_MSG_SEND_DIRECT_REQ64) with five recognizable words, which echo answers
unchanged, and tries DIRECT_REQ2, which the driver refuses itself at FF-A 1.1
(FEATURES does not offer it below 1.2).  Then it requests notification 4
from echo (NOTIFICATION_BIND) and has echo raise it with its NOTIFY command
word: the daemon sends INTERRUPT for SGI 8 to the calling vCPU, the driver's
NPI handler fetches the bits with NOTIFICATION_GET and calls the module back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from linux_clients import Console, client_kernel, ffa_config  # noqa: F401  (client_kernel is a fixture)
from qemu_harness import Daemon, Qemu

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 240
SMP = 2
MEMORY = "512M"


def _boot(kernel: Path, daemon: Daemon, start_qemu: Callable[..., Qemu],
          machine: str = "virt") -> tuple[Qemu, Console]:
    q = start_qemu("-kernel", str(kernel / "Image"), "-initrd", str(kernel / "initramfs.cpio.gz"),
                   "-append", "console=ttyAMA0 rdinit=/init panic=-1",
                   forwarder=daemon.socket, smp=SMP, memory=MEMORY, machine=machine,
                   forwarder_opts=",vm-name=linux,smccc-version=1.2")
    return q, Console(q)


def test_linux_ffa_driver_finds_the_partitions(qemu_bin: Path, client_kernel: Path,  # noqa: F811
                                               start_daemon: Callable[..., Daemon],
                                               start_qemu: Callable[..., Qemu], workdir: Path) -> None:
    config, vm_id, offered = ffa_config(workdir)
    daemon = start_daemon(config=config)
    q, con = _boot(client_kernel, daemon, start_qemu)
    try:
        con.wait(r"^HVCTEST: ready", BOOT_TIMEOUT)
        out = q.output()
        assert "SMC Calling Convention v1.2" in out, out
        assert "ARM FF-A: Driver version 1.1" in out, out
        assert "ARM FF-A: Firmware version 1.2 found" in out, out
        assert "ARM FF-A: Firmware version higher than driver version, downgrading" in out, out
        assert "failed to setup partitions" not in out and "No partitions found" not in out, out
        _, lines = con.run("sh grep -H . /sys/bus/arm_ffa/devices/*/uuid /sys/bus/arm_ffa/devices/*/partition_id")
        found: dict[str, dict[str, str]] = {}
        for line in lines:
            m = re.match(r"out /sys/bus/arm_ffa/devices/([^/]+)/(uuid|partition_id):(\S+)$", line)
            if m:
                found.setdefault(m[1], {})[m[2]] = m[3]
        got = {(int(attrs["partition_id"], 0), attrs["uuid"]) for attrs in found.values()}
        # One device per offered partition, plus the one the driver registers for
        # itself (the host: our endpoint ID, the null UUID; ffa_setup_partitions()).
        host = (vm_id, "00000000-0000-0000-0000-000000000000")
        assert got == {*offered.values(), host}, (lines, offered)
        # A GICv2: no interrupt to deliver, so FEATURES offers no SRI/NPI and the driver goes on without.
        assert "ARM FF-A: Notification setup failed -95, not enabled" in out, out
        assert "HVCTEST: klog ffa-echo-test: notifications unavailable (-95)" in out, out
        # The driver's calls reached the daemon, in the order the probe makes them.
        log = daemon.log
        order = [log.find(name) for name in ("FFA_VERSION", "FFA_ID_GET", "FFA_RXTX_MAP64", "FFA_PARTITION_INFO_GET",
                                             "FFA_RX_RELEASE")]
        assert all(i >= 0 for i in order) and order == sorted(order), log[-4000:]
    finally:
        q.send("poweroff\n")
        assert q.wait(60) == 0


# What ffa_echo_test.c sends: ECHO_WORD(i) for data0..data4 (w3..w7 / x3..x7).
ECHO_WORDS = [0xEC40FFA0D0D0E0E0 | i for i in range(5)]


def test_linux_ffa_echo_partition_round_trip(qemu_bin: Path, client_kernel: Path,  # noqa: F811
                                             start_daemon: Callable[..., Daemon],
                                             start_qemu: Callable[..., Qemu], workdir: Path) -> None:
    config, vm_id, offered = ffa_config(workdir)
    echo_id, echo_uuid = offered["echo"]
    daemon = start_daemon(config=config)
    q, con = _boot(client_kernel, daemon, start_qemu, machine="virt,gic-version=3")
    try:
        con.wait(r"^HVCTEST: ready", BOOT_TIMEOUT)
        out = q.output()
        assert "Notification setup failed" not in out, out
        lines = [m[1] for m in re.finditer(r"^HVCTEST: klog ffa-echo-test: (.*?)\r?$", out, re.MULTILINE)]
        words = " ".join(f"data{i}={w:#x}" for i, w in enumerate(ECHO_WORDS))
        # The module bound to the echo partition only (the storage partition has another UUID).
        assert lines == [f"probe partition {echo_id:#x} uuid {echo_uuid} version 1.1 mode 64-bit",
                         f"request {words}",
                         f"reply {words} ok",
                         "req2 unsupported (-95)",
                         "notification 4 requested",
                         "notification 4 raised by echo status 0",
                         lines[-1]], out
        assert re.fullmatch(r"notification 4 received on cpu [0-9]+", lines[-1]), out
        # The module's driver holds the echo device, and only it.
        _, bound = con.run("sh cat /sys/bus/arm_ffa/drivers/ffa-echo-test/arm-ffa-*/partition_id")
        assert [int(b.split()[1], 0) for b in bound if b.startswith("out ")] == [echo_id], bound
        # The daemon logged the request (its per-call DEBUG line), from our endpoint
        # to echo's, with the five words (the call view names them w3..w7 for both widths),
        # and the ffa handler answered DIRECT_RESP64; no REQ2 reached it.
        log = daemon.log
        m = re.search(r"FFA_MSG_SEND_DIRECT_REQ64\(([^)]*)\) -> ffa: (\S+)", log)
        assert m, log[-4000:]
        args = dict(kv.split("=") for kv in m[1].split(", "))
        assert int(args["endpoints"], 0) == vm_id << 16 | echo_id, m[0]
        assert [int(args[f"w{i + 3}"], 0) for i in range(5)] == ECHO_WORDS, m[0]
        assert m[2] == "0xc4000070", m[0]  # FFA_MSG_SEND_DIRECT_RESP64
        assert "FFA_MSG_SEND_DIRECT_REQ2" not in log, log[-4000:]
        # The notification: bound, raised by echo inside a direct request, fetched
        # by the driver's NPI handler (SP senders and SPM framework: flags 0x5).
        order = [log.find(name) for name in ("FFA_NOTIFICATION_BITMAP_CREATE", "FFA_NOTIFICATION_BIND",
                                             "FFA_NOTIFICATION_GET")]
        assert all(i >= 0 for i in order) and order == sorted(order), log[-4000:]
    finally:
        q.send("poweroff\n")
        assert q.wait(60) == 0
