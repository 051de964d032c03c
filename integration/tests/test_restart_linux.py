"""Nothing lost, with a real guest (issue 16): Linux's pKVM guest under the patched
QEMU keeps cycling a CPU through sysfs and sharing and unsharing pages with the
memshare test module while its daemon is killed with SIGKILL, again and again,
and restarted on its durable state.

QEMU's forwarder reconnects by itself and re-sends the calls it was waiting on;
the daemon answers them from its journal.  Afterwards the guest has seen no
failure (a CPU that would not come online, a share or unshare refused), and the
daemon's power table and ledger equal what the guest itself reports.
"""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest
from linux_clients import (
    Console,
    LinuxVm,
    client_kernel,  # noqa: F401  (a fixture)
)
from qemu_harness import StartDaemon, StartQemu

from tests.process import DaemonProcess
from tests.waiting import poll

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 240
KILLS = 5
GRANULE = 4096
CTL = "/sys/kernel/debug/hvcproxyd-memshare/ctl"
# Background loops in the guest, stopped by /tmp/stop; their output goes to files the
# test reads at the end (a loop holding the console's pipe would never let the command end).
CPU_LOOP = ("while [ ! -e /tmp/stop ]; do echo 0 > /sys/devices/system/cpu/cpu3/online || echo off-failed;"
            " echo 1 > /sys/devices/system/cpu/cpu3/online || echo on-failed; done")
SHARE_LOOP = (f"while [ ! -e /tmp/stop ]; do echo 'share 2' > {CTL} || echo share-failed;"
              f" echo unshare > {CTL} || echo unshare-failed; done")


def _calls(daemon: DaemonProcess) -> int:
    """Calls the daemon has logged (DEBUG: one line each)."""
    return len(re.findall(r"vcpu\d+ HVC 0x", daemon.log))


def test_linux_keeps_running_through_daemon_kills(client_kernel: Path, start_daemon: StartDaemon,  # noqa: F811
                                                 start_qemu: StartQemu, workdir: Path) -> None:
    vm = LinuxVm("vm", start_daemon, workdir, state={"dir": str(workdir / "state"), "fsync": "batch"})
    config = vm.config
    q = vm.boot(start_qemu, client_kernel)
    con = Console(q)
    con.wait(r"^HVCTEST: ready", BOOT_TIMEOUT)
    con.run("insmod")
    boot_pages = vm.pages()
    con.run(f"sh ( {CPU_LOOP} ) </dev/null >/tmp/cpu.log 2>&1 &")
    con.run(f"sh ( {SHARE_LOOP} ) </dev/null >/tmp/share.log 2>&1 &")
    rng = random.Random()
    daemons = [vm.daemon]
    for _ in range(KILLS):
        current = daemons[-1]
        served = _calls(current)
        poll(lambda d=current, n=served: _calls(d) > n + 20,  # type: ignore[misc]
             "the guest's calls to reach the daemon", timeout=120, log=current.log_path)
        time.sleep(rng.uniform(0.0, 1.5))
        daemons[-1].signal(signal.SIGKILL)
        assert daemons[-1].wait(timeout=30) == -signal.SIGKILL
        # A new daemon on the same config, socket and state: QEMU reconnects by itself.
        daemons.append(start_daemon(config=config, socket=vm.socket, qmp=False))
        daemons[-1].wait_log(r"VMM attached .*reconnect", timeout=60)
    con.run("sh touch /tmp/stop; sleep 3")
    assert len(re.findall(r"reconnected to the handler", q.messages())) == KILLS, q.messages()[-3000:]
    _, lines = con.run("sh cat /tmp/cpu.log /tmp/share.log")
    assert [line for line in lines if line.startswith("out ") and line != "out "] == [], lines
    out = q.output()
    assert "failed to come online" not in out and "psci: failed" not in out, out[-6000:]
    assert not re.search(r"hvcproxyd-memshare: .*(fail|refused|error)", out, re.IGNORECASE), out[-6000:]
    # The daemon's view equals the guest's.
    vm.daemon = daemons[-1]
    _, lines = con.run("sh cat /sys/devices/system/cpu/online")
    cpus_online = next(line for line in lines if line.startswith("out "))
    expected_power = {"0": "on", "1": "on", "2": "on", "3": "on" if cpus_online == "out 0-3" else "off"}
    assert vm.power() == expected_power, (cpus_online, vm.power())
    _, lines = con.run("regions")
    regions: set[int] = set()
    for line in lines:
        m = re.fullmatch(r"region 0x([0-9a-f]+) (\d+)", line)
        if m:
            regions |= {int(m[1], 16) + k * GRANULE for k in range(int(m[2]))}
    assert vm.pages() == boot_pages | regions
    for d in daemons[1:]:
        d.wait_log(r"state restored from .*journal record")  # each restart came up on the durable state
