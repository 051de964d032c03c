"""A Linux pKVM guest's hvcproxyd state moves with the VM (issue 16): live
migration between two patched QEMUs, savevm/loadvm, and a migration the
destination refuses.

The guest is the client kernel with -smp 4 and 3 CPUs on; its memshare test
module has pages shared.  QEMU's forwarder saves the daemon's state document in
its own vmstate section (protocol v2, STATE_SAVE) and hands it to the
destination's daemon before the destination's vCPUs run.  Without it the
destination's daemon would say CPU 1 and 2 are OFF and hold an empty ledger, so
the guest's re-share of a shared page would succeed and its unshare fail: the
guest's own calls are the assertion, beside the daemons' views.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from linux_clients import (
    Console,
    LinuxVm,
    client_kernel,  # noqa: F401  (a fixture)
)
from qemu.qmp import QMPError
from qemu_harness import Qemu, StartDaemon, StartQemu

from tests.waiting import poll

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 240
MIGRATE_TIMEOUT = 180


def migrate(src: Qemu, uri: str) -> dict[str, Any]:
    """`migrate` on the source, then query-migrate until it ends; its last answer."""
    mon = src.monitor()
    try:
        mon.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        mon.cmd("migrate", uri=uri)
        status: list[dict[str, Any]] = []

        def ended() -> bool:
            status[:] = [mon.cmd("query-migrate")]  # type: ignore[list-item]
            return status[0].get("status") in ("completed", "failed", "cancelled")
        poll(ended, "the migration to end", timeout=MIGRATE_TIMEOUT, log=src.err_path)
        return status[0]
    finally:
        mon.close()


def prepare_guest(con: Console) -> None:
    """3 of 4 CPUs on, 4 pages shared by the test module."""
    con.run("insmod")
    con.run("share 4")
    con.run("sh echo 0 > /sys/devices/system/cpu/cpu3/online")
    _, lines = con.run("sh cat /sys/devices/system/cpu/online")
    assert "out 0-2" in lines, lines


def assert_guest_sees_the_same_machine(con: Console, vm: LinuxVm, power: dict[str, str], pages: set[int]) -> None:
    assert vm.power() == power
    assert vm.pages() == pages
    rc, _ = con.run("reshare", ok=False)
    assert rc != 0, "the destination let the guest share a page twice: its ledger did not arrive"
    con.run("unshare")  # refused if the destination's ledger were empty
    assert vm.pages() < pages and len(pages - vm.pages()) == 4
    con.run("sh echo 1 > /sys/devices/system/cpu/cpu3/online")  # CPU_ON of the one CPU that is off
    _, lines = con.run("sh cat /sys/devices/system/cpu/online")
    assert "out 0-3" in lines, lines
    assert vm.power() == {"0": "on", "1": "on", "2": "on", "3": "on"}


def test_live_migration_carries_power_states_and_the_ledger(client_kernel: Path, start_daemon: StartDaemon,  # noqa: F811
                                                            start_qemu: StartQemu, workdir: Path) -> None:
    src, dst = LinuxVm("src", start_daemon, workdir), LinuxVm("dst", start_daemon, workdir)
    q = src.boot(start_qemu, client_kernel)
    con = Console(q)
    con.wait(r"^HVCTEST: ready", BOOT_TIMEOUT)
    prepare_guest(con)
    power, pages = src.power(), src.pages()
    assert power == {"0": "on", "1": "on", "2": "on", "3": "off"}
    incoming = workdir / "migrate.sock"
    q2 = dst.boot(start_qemu, client_kernel, "-incoming", f"unix:{incoming}")
    q2.wait_qmp()
    poll(incoming.is_socket, "the destination's incoming socket", timeout=30, log=q2.err_path)
    status = migrate(q, f"unix:{incoming}")
    assert status["status"] == "completed", (status, q.messages()[-3000:], q2.messages()[-3000:])
    src.daemon.wait_log(r"state saved for the VMM")
    dst.daemon.wait_log(r"state loaded from the VMM")
    q.stop()  # the source stays paused after a migration; the guest lives on in q2
    assert_guest_sees_the_same_machine(Console(q2), dst, power, pages)


def test_savevm_and_loadvm_carry_the_state(client_kernel: Path, start_daemon: StartDaemon, start_qemu: StartQemu,  # noqa: F811
                                           workdir: Path) -> None:
    vm = LinuxVm("vm", start_daemon, workdir)
    snapshots = workdir / "snap.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(snapshots), "16M"], check=True, timeout=60)
    q = vm.boot(start_qemu, client_kernel, "-drive", f"if=none,id=snap,format=qcow2,file={snapshots}")
    con = Console(q)
    con.wait(r"^HVCTEST: ready", BOOT_TIMEOUT)
    prepare_guest(con)
    power, pages = vm.power(), vm.pages()
    mon = q.monitor()
    try:
        mon.cmd("human-monitor-command", **{"command-line": "savevm before"})
        # Change what the daemon holds: the guest unshares its region and brings CPU 3 up.
        con.run("unshare")
        con.run("sh echo 1 > /sys/devices/system/cpu/cpu3/online")
        assert vm.power()["3"] == "on" and vm.pages() != pages
        out = mon.cmd("human-monitor-command", **{"command-line": "loadvm before"})
        assert not out, out  # HMP prints nothing on success
    finally:
        mon.close()
    vm.daemon.wait_log(r"state loaded from the VMM")
    assert_guest_sees_the_same_machine(con, vm, power, pages)


def test_a_destination_that_pins_another_psci_version_refuses(client_kernel: Path, start_daemon: StartDaemon,  # noqa: F811
                                                              start_qemu: StartQemu, workdir: Path) -> None:
    src, dst = LinuxVm("src", start_daemon, workdir), LinuxVm("dst", start_daemon, workdir, psci="1.0")
    q = src.boot(start_qemu, client_kernel)
    con = Console(q)
    con.wait(r"^HVCTEST: ready", BOOT_TIMEOUT)
    incoming = workdir / "migrate.sock"
    q2 = dst.boot(start_qemu, client_kernel, "-incoming", f"unix:{incoming}")
    poll(incoming.is_socket, "the destination's incoming socket", timeout=30, log=q2.err_path)
    status = migrate(q, f"unix:{incoming}")
    assert status["status"] == "failed", (status, q2.messages(), dst.daemon.log[-3000:])
    why = "handler 'psci': version is '1.1' in the state, '1.0' here"
    dst.daemon.wait_log(re.escape(why))
    q2.wait_output(re.escape(why), stderr=True)  # the destination QEMU says why, as its daemon does
    q2.wait(timeout=60)  # and gives up on the incoming migration
    # The source runs on (a failed migration resumes it), its guest and its daemon's state untouched.
    mon = q.monitor()
    try:
        poll(lambda: mon.cmd("query-status")["status"] == "running",  # type: ignore[index]
             "the source to run again", timeout=30, log=q.err_path)
    finally:
        mon.close()
    _, lines = con.run("sh cat /sys/devices/system/cpu/online")
    assert "out 0-3" in lines, lines
    assert src.power() == {"0": "on", "1": "on", "2": "on", "3": "on"}


def test_state_that_cannot_move_blocks_migrate_and_savevm(client_kernel: Path, start_daemon: StartDaemon,  # noqa: F811
                                                         start_qemu: StartQemu, workdir: Path) -> None:
    why = "held: its sessions live in a backend"
    vm = LinuxVm("vm", start_daemon, workdir, blocker=why)
    snapshots = workdir / "snap.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(snapshots), "16M"], check=True, timeout=60)
    q = vm.boot(start_qemu, client_kernel, "-drive", f"if=none,id=snap,format=qcow2,file={snapshots}")
    Console(q).wait(r"^HVCTEST: ready", BOOT_TIMEOUT)
    mon = q.monitor()
    try:
        with pytest.raises(QMPError) as refused:
            mon.cmd("migrate", uri=f"unix:{workdir / 'nobody.sock'}")
        assert f"hvc-forwarder: {why}" in str(refused.value), refused.value
        out = mon.cmd("human-monitor-command", **{"command-line": "savevm blocked"})
        assert f"hvc-forwarder: {why}" in str(out), out
        assert mon.cmd("query-status")["status"] == "running"  # type: ignore[index]
    finally:
        mon.close()
    assert "state saved" not in vm.daemon.log  # the daemon was never asked

