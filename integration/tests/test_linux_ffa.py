"""Linux's own FF-A driver (drivers/firmware/arm_ffa) against hvcproxyd's ffa
handler, under the patched QEMU (TCG) with the client kernel
(CONFIG_ARM_FFA_TRANSPORT=y, integration/linux/build-kernel.sh).

The forwarder reports SMCCC 1.2 (its ``smccc-version``), which the driver
needs; config/ffa.yaml forwards the FF-A range and offers two partitions.
The driver negotiates (it speaks 1.1, we offer 1.2 and it downgrades), maps
its RX/TX pair, enumerates the partitions (count first, then the 24-byte
records in RX, then RX_RELEASE) and registers one FF-A bus device per
partition; sysfs shows each one's UUID and ID.  Notifications stay off: no
VMM delivers their interrupt, so FEATURES does not offer the SRI/NPI IDs and
the driver says so.
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


def test_linux_ffa_driver_finds_the_partitions(qemu_bin: Path, client_kernel: Path,  # noqa: F811
                                               start_daemon: Callable[..., Daemon],
                                               start_qemu: Callable[..., Qemu], workdir: Path) -> None:
    config, vm_id, offered = ffa_config(workdir)
    daemon = start_daemon(config=config)
    q = start_qemu("-kernel", str(client_kernel / "Image"), "-initrd", str(client_kernel / "initramfs.cpio.gz"),
                   "-append", "console=ttyAMA0 rdinit=/init panic=-1",
                   forwarder=daemon.socket, smp=SMP, memory=MEMORY,
                   forwarder_opts=",vm-name=linux,smccc-version=1.2")
    con = Console(q)
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
        # Without an interrupt to deliver, FEATURES offers no SRI/NPI and the driver goes on without.
        assert "ARM FF-A: Notification setup failed -95, not enabled" in out, out
        # The driver's calls reached the daemon, in the order the probe makes them.
        log = daemon.log
        order = [log.find(name) for name in ("FFA_VERSION", "FFA_ID_GET", "FFA_RXTX_MAP64", "FFA_PARTITION_INFO_GET",
                                             "FFA_RX_RELEASE")]
        assert all(i >= 0 for i in order) and order == sorted(order), log[-4000:]
    finally:
        q.send("poweroff\n")
        assert q.wait(60) == 0
