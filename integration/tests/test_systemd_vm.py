"""The systemd-vm tier: the Debian package and its unit under a real systemd (PID 1
of a Debian 12 VM under TCG, integration/systemd-vm/), with the patched QEMU as
an unprivileged user in its own unit, serving a bare-metal arm64 guest.

The tests run in file order on one boot and build on each other: install, start,
reload, journal, a missing config, then QEMU and a daemon restart under it, and
last the same guest through Debian's libvirt (define, start, save, restore).
Needs root (the image build), the patched QEMU and the cross toolchain
(integration/setup.sh), PyPI for a cold .deb build.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_harness import _run_build, build_deb, scratch_dir
from systemd_vm import Result, SystemdVm, link_or_copy

VMDIR = Path(__file__).resolve().parents[1] / "systemd-vm"
SHARE = "/mnt/share"
UNIT = "hvcproxyd@vm1"
QEMU_UNIT = "qemu-test@vm1"
SERIAL = "/var/lib/qemu/vm1.serial"
DOMAIN = "vm1"  # libvirt-vm1.xml's <name>
LIBVIRT_SERIAL = "/var/log/libvirt/qemu/vm1.serial"  # its <serial type='file'>
LIBVIRT_LOG = "/var/log/libvirt/qemu/vm1.log"  # libvirt's log of the domain (QEMU's command line and stderr)
SAVE_FILE = "/var/lib/libvirt/qemu/save/vm1.save"
#: The beat guest's answer: the config's regs [0, 0xa1], and 0xb2 after the good reload.
X1_FIRST, X1_RELOADED = 0xA1, 0xB2
BEAT = re.compile(r"^BEAT n=0x([0-9a-f]{16}) x0=0x([0-9a-f]{16}) x1=0x([0-9a-f]{16})$", re.MULTILINE)


@pytest.fixture(scope="module")
def vm(qemu_bin: Path) -> Iterator[SystemdVm]:
    """The booted VM with the share mounted at /mnt/share: the .deb, the patched QEMU,
    the beat guest and the files of integration/systemd-vm."""
    if os.geteuid() != 0:
        pytest.fail("the systemd-vm tier needs root (debootstrap in build-image.sh)")
    image = _run_build("systemd-vm/build-image.sh", timeout=1800)
    deb = build_deb()
    with scratch_dir("hvcsvm-") as work:
        share = work / "share"
        share.mkdir()
        make = subprocess.run(["make", "-s", "-C", str(VMDIR), "-f", "Makefile.beat", f"O={work / 'beat'}"],
                              capture_output=True, text=True, timeout=120)
        assert make.returncode == 0, f"building beat.elf failed:\n{make.stdout}{make.stderr}"
        link_or_copy(work / "beat" / "beat.elf", share / "beat.elf")
        link_or_copy(deb, share / "hvcproxyd.deb")
        link_or_copy(qemu_bin, share / "qemu-system-aarch64")
        for name in ("vm1.yaml", "qemu-test@.service", "libvirt-vm1.xml"):
            link_or_copy(VMDIR / name, share / name)
        machine = SystemdVm(image, share, work)
        try:
            machine.boot()
            machine.run(f"modprobe 9pnet_virtio && mkdir -p {SHARE} && "
                        f"mount -t 9p -o trans=virtio,version=9p2000.L,ro share {SHARE}")
            yield machine
        finally:
            machine.stop()


def show(vm: SystemdVm, unit: str, *props: str) -> dict[str, str]:
    out = vm.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props)).out
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status(vm: SystemdVm) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(vm.run("hvcproxyd status vm1 --json").out)
    return data


def journal(vm: SystemdVm, unit: str, *matches: str) -> list[dict[str, Any]]:
    """The records the unit's own processes wrote (_SYSTEMD_UNIT, not systemd's about it), as JSON objects."""
    out = vm.run(f"journalctl _SYSTEMD_UNIT={unit}.service -o json --no-pager {' '.join(matches)}").out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def beats(vm: SystemdVm, serial: str = SERIAL) -> list[tuple[int, int, int]]:
    """The beat guest's answers so far, (n, x0, x1) a line, from its serial log."""
    text = vm.run(f"cat {serial}").out
    return [(int(n, 16), int(x0, 16), int(x1, 16)) for n, x0, x1 in BEAT.findall(text)]


@pytest.fixture(scope="module")
def installed(vm: SystemdVm) -> Result:
    return vm.run(f"DEBIAN_FRONTEND=noninteractive dpkg -i {SHARE}/hvcproxyd.deb", timeout=600, check=False)


def test_dpkg_install(vm: SystemdVm, installed: Result) -> None:
    assert installed.rc == 0, f"dpkg -i failed: {installed}\n{vm.console_tail()}"
    state = vm.run("dpkg-query -W -f='${Status}' hvcproxyd").out
    assert state == "install ok installed", state
    # postinst's sysusers made the unit's user; PID 1 reads the installed template.
    assert vm.run("getent passwd hvcproxyd").out.split(":")[5] == "/var/lib/hvcproxyd"
    fragment = vm.run(f"readlink -f $(systemctl show -P FragmentPath {UNIT})").out.strip()
    assert fragment == "/usr/lib/systemd/system/hvcproxyd@.service", fragment  # /lib is /usr/lib's link


@pytest.fixture(scope="module")
def started(vm: SystemdVm, installed: Result) -> list[tuple[str, str]]:
    """Start hvcproxyd@vm1 without waiting and sample (ActiveState, whether the VMM
    socket exists) until the unit is active: what systemd saw before READY=1."""
    assert installed.rc == 0, f"dpkg -i failed: {installed}"
    vm.run(f"install -m644 {SHARE}/vm1.yaml /etc/hvcproxyd/vm1.yaml")
    out = vm.run(f"systemctl start --no-block {UNIT}; for i in $(seq 1200); do "
                 f"s=$(systemctl show -P ActiveState {UNIT}); "
                 "if [ -S /run/hvcproxyd/vm1.sock ] && [ -S /run/hvcproxyd/vm1.ctl ]; then k=yes; else k=no; fi; "
                 'echo "$s $k"; case $s in active|failed) break;; esac; sleep 0.05; done', timeout=300).out
    return [(s, k) for s, k in (line.split() for line in out.splitlines())]


def test_start_is_active_only_after_ready(vm: SystemdVm, started: list[tuple[str, str]]) -> None:
    assert started and started[-1][0] == "active", f"{UNIT} never became active: {started[-10:]}\n" + \
        vm.run(f"journalctl -u {UNIT} --no-pager -n 30", check=False).out
    # Type=notify: systemd held it in "activating" while the daemon set up its sockets,
    # and it was "active" only once they listened (READY=1 comes after that).
    assert started[0][0] == "activating", f"the first sample was already {started[0]}: nothing shows the wait"
    assert all(k == "yes" for s, k in started if s == "active"), started
    props = show(vm, UNIT, "ActiveState", "SubState", "StatusText", "Type", "NRestarts")
    assert props["Type"] == "notify" and props["SubState"] == "running", props
    assert props["StatusText"] == "vm1: waiting for the VMM on /run/hvcproxyd/vm1.sock (2 rules)", props
    assert props["NRestarts"] == "0", props
    # The VMM socket went to QEMU's group (vmm.gid: kvm), 0660.
    assert vm.run("stat -c '%a %G' /run/hvcproxyd/vm1.sock").out.split() == ["660", "kvm"]


def test_reload_applies_good_refuses_bad(vm: SystemdVm, started: list[tuple[str, str]]) -> None:
    pid = show(vm, UNIT, "MainPID")["MainPID"]
    cfg = "/etc/hvcproxyd/vm1.yaml"
    vm.run(f"sed -i 's/regs: \\[0, {X1_FIRST:#x}\\]/regs: [0, {X1_RELOADED:#x}]/' {cfg} && "
           f"grep -q 'regs: \\[0, {X1_RELOADED:#x}\\]' {cfg} && systemctl reload {UNIT}")
    vm.wait_for("hvcproxyd status vm1 --json | grep -q '\"applied\": 1'", "the good reload to be applied")
    st = status(vm)
    assert st["reloads"]["applied"] == 1 and st["reloads"]["refused"] == 0, st["reloads"]
    # A bad config: refused, with its reason, and the running config stays.
    vm.run(f"cp {cfg} /root/good.yaml && echo 'colour: red' >> {cfg} && systemctl reload {UNIT}")
    vm.wait_for("hvcproxyd status vm1 --json | grep -q '\"refused\": 1'", "the bad reload to be refused")
    text = vm.run("hvcproxyd status vm1").out
    assert "REFUSED, running config kept" in text and "colour" in text, text
    st = status(vm)
    assert st["reloads"]["applied"] == 1 and st["config"]["rules"] == 2, st
    props = show(vm, UNIT, "ActiveState", "MainPID", "NRestarts")
    assert props == {"ActiveState": "active", "MainPID": pid, "NRestarts": "0"}, props
    # The good config back in the file, for the restart below (the beat guest sees 0xb2 either way).
    vm.run(f"cp /root/good.yaml {cfg}")


def test_journal_has_the_daemon_fields(vm: SystemdVm, started: list[tuple[str, str]]) -> None:
    records = journal(vm, UNIT, "HVC_VM=vm1")
    assert records, "no journal record of hvcproxyd@vm1 carries HVC_VM=vm1"
    messages = [str(r.get("MESSAGE", "")) for r in records]
    assert any("ready" in m for m in messages), messages[-20:]
    refused = [r for r in records if "colour" in str(r.get("MESSAGE", "")) or "refused" in str(r.get("MESSAGE", ""))]
    assert refused and all(int(r["PRIORITY"]) <= 4 for r in refused), refused


def test_missing_config_fails_without_restarts(vm: SystemdVm, installed: Result) -> None:
    assert installed.rc == 0
    start = vm.run("systemctl start hvcproxyd@typo", timeout=120, check=False)
    assert start.rc != 0, f"hvcproxyd@typo started without a config: {start}"
    time.sleep(4)  # RestartSec=1s: a restart loop would have counted by now
    props = show(vm, "hvcproxyd@typo", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert props == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "78", "NRestarts": "0"}, props
    text = vm.run("journalctl -u hvcproxyd@typo --no-pager").out
    assert "/etc/hvcproxyd/typo.yaml" in text, text[-2000:]


@pytest.fixture(scope="module")
def qemu_unit(vm: SystemdVm, started: list[tuple[str, str]]) -> str:
    """qemu-test@vm1 started (the patched QEMU as a dynamic user, the beat guest), its MainPID."""
    vm.run(f"install -m755 {SHARE}/qemu-system-aarch64 /usr/local/bin/ && "
           f"install -D -m644 {SHARE}/beat.elf /usr/local/share/hvc-test/beat.elf && "
           f"install -m644 {SHARE}/qemu-test@.service /etc/systemd/system/ && systemctl daemon-reload && "
           f"systemctl start {QEMU_UNIT}")
    vm.wait_for(f"[ $(grep -c '^BEAT ' {SERIAL} 2>/dev/null || echo 0) -ge 3 ]", "three answered calls of the guest",
                timeout=300, interval=3)
    return show(vm, QEMU_UNIT, "MainPID")["MainPID"]


def test_unprivileged_qemu_is_served(vm: SystemdVm, qemu_unit: str) -> None:
    uid = int(vm.run(f"ps -o uid= -p {qemu_unit}").out)
    assert uid != 0, "QEMU runs as root"
    got = beats(vm)
    # Every answer is the reloaded config's (0xb2), none NOT_SUPPORTED: the daemon, not QEMU, answered.
    assert got and all((x0, x1) == (0, X1_RELOADED) for _, x0, x1 in got), got
    st = status(vm)
    assert st["state"] == "serving" and st["vmm"] is not None, st
    assert st["vmm"]["uid"] == uid and st["vmm"]["pid"] == int(qemu_unit), st["vmm"]
    assert st["vmm"]["memory"] == "memfd", st["vmm"]
    assert st["calls"]["handlers"]["beat"]["calls"] >= len(got) - 1, st["calls"]
    assert show(vm, UNIT, "StatusText")["StatusText"].startswith("serving vm1: 1 vCPUs, 2 rules, ")
    calls = journal(vm, UNIT, "-n", "50", "HVC_HANDLER=beat")
    assert calls, "no per-call journal record for the beat handler"
    assert {(r["HVC_FUNC_ID"], r["HVC_VCPU"], r["HVC_CONDUIT"], r["HVC_RESULT"]) for r in calls} == \
        {("0x82000001", "0", "HVC", "SUCCESS")}, calls[:3]


def test_qemu_survives_daemon_restart(vm: SystemdVm, qemu_unit: str) -> None:
    before = show(vm, UNIT, "MainPID")["MainPID"]
    last = beats(vm)[-1][0]
    vm.run(f"systemctl restart {UNIT}", timeout=300)
    after = show(vm, UNIT, "MainPID", "ActiveState")
    assert after["ActiveState"] == "active" and after["MainPID"] != before, after
    vm.wait_for(f"[ $(grep -c '^BEAT ' {SERIAL}) -ge {last + 5} ]", "the guest's calls after the restart",
                timeout=300, interval=3)
    got = beats(vm)
    assert [n for n, _, _ in got] == list(range(1, len(got) + 1)), "the guest restarted or lost lines"
    assert all((x0, x1) == (0, X1_RELOADED) for _, x0, x1 in got), [b for b in got if b[1:] != (0, X1_RELOADED)]
    # The same QEMU process, never restarted, reconnected to the new daemon.
    q = show(vm, QEMU_UNIT, "ActiveState", "MainPID", "NRestarts")
    assert q == {"ActiveState": "active", "MainPID": qemu_unit, "NRestarts": "0"}, q
    st = status(vm)
    assert st["pid"] == int(after["MainPID"]) and st["vmm"] is not None, st
    assert st["vmm"]["pid"] == int(qemu_unit) and st["vmm"]["reconnect"], st["vmm"]
    assert st["calls"]["handlers"]["beat"]["calls"] >= 4, st["calls"]


def libvirt_tail(vm: SystemdVm) -> str:
    """What a libvirt failure message carries: the domain's log, libvirtd's journal, the guest's serial log."""
    return vm.run(f"echo '--- {LIBVIRT_LOG} ---'; tail -c 3000 {LIBVIRT_LOG}; "
                  "echo '--- journalctl -u libvirtd ---'; journalctl -u libvirtd --no-pager -n 30; "
                  f"echo '--- {LIBVIRT_SERIAL} ---'; tail -n 5 {LIBVIRT_SERIAL}; "
                  f"echo '--- journalctl -u {UNIT} ---'; journalctl -u {UNIT} --no-pager -n 15",
                  check=False).out + "\n" + vm.console_tail(1500)


def virsh(vm: SystemdVm, args: str, timeout: float = 300.0) -> str:
    res = vm.run(f"virsh {args}", timeout=timeout, check=False)
    assert res.rc == 0, f"in the VM: {res}\n{libvirt_tail(vm)}"
    return res.out


def wait_beats(vm: SystemdVm, count: int, what: str) -> list[tuple[int, int, int]]:
    """Wait until the libvirt guest's serial log has ``count`` answers (the libvirt log on failure)."""
    vm.wait_for(f"[ $(grep -c '^BEAT ' {LIBVIRT_SERIAL} 2>/dev/null || echo 0) -ge {count} ] || "
                f"{{ tail -c 1500 {LIBVIRT_LOG}; tail -n 3 {LIBVIRT_SERIAL}; false; }}", what, timeout=300, interval=3)
    return beats(vm, LIBVIRT_SERIAL)


def transfers(vm: SystemdVm, text: str) -> int:
    """How many of the daemon's journal records say ``text`` ("state saved for the VMM", ...)."""
    return sum(text in str(r.get("MESSAGE", "")) for r in journal(vm, UNIT, "HVC_VM=vm1"))


def beat_calls(vm: SystemdVm) -> int:
    calls: int = status(vm)["calls"]["handlers"]["beat"]["calls"]
    return calls


def libvirt_qemu_pid(vm: SystemdVm) -> int:
    return int(vm.run(f"cat /run/libvirt/qemu/{DOMAIN}.pid").out)


def test_libvirt_domain_is_served_saved_and_restored(vm: SystemdVm, qemu_unit: str) -> None:
    # hvcproxyd@vm1 serves one VMM: the unit's QEMU makes room for libvirt's.
    vm.run(f"systemctl stop {QEMU_UNIT}", timeout=120)
    vm.wait_for("hvcproxyd status vm1 --json | grep -q '\"vmm\": null'", "the daemon to see QEMU go")
    saved0, loaded0 = transfers(vm, "state saved for the VMM"), transfers(vm, "state loaded from the VMM")
    calls0 = beat_calls(vm)
    # Debian 12's libvirt runs QEMU as libvirt-qemu:libvirt-qemu (kvm only supplementary);
    # vm1.yaml admits by primary gid kvm (qemu-test@vm1 has no fixed uid), so libvirt's QEMU gets group kvm.
    vm.run("printf 'group = \"kvm\"\\n' >> /etc/libvirt/qemu.conf && systemctl restart libvirtd", timeout=300)
    virsh(vm, f"define {SHARE}/libvirt-vm1.xml")
    virsh(vm, f"start {DOMAIN}", timeout=600)
    try:
        got = wait_beats(vm, 3, "three answered calls of the libvirt guest")
        pid = libvirt_qemu_pid(vm)
        user = vm.run(f"ps -o user= -p {pid}").out.strip()
        assert user == "libvirt-qemu", f"libvirt's QEMU runs as {user!r}\n{libvirt_tail(vm)}"
        cmdline = vm.run(f"tr '\\0' ' ' < /proc/{pid}/cmdline").out
        assert "memory-backend-memfd" in cmdline and "hvc-forwarder" in cmdline, cmdline
        # Every answer is the daemon's (the reloaded config's 0xb2), none NOT_SUPPORTED.
        assert got and all((x0, x1) == (0, X1_RELOADED) for _, x0, x1 in got), f"{got}\n{libvirt_tail(vm)}"
        st = status(vm)
        assert st["vmm"] is not None and st["vmm"]["pid"] == pid, f"{st}\n{libvirt_tail(vm)}"
        assert st["vmm"]["uid"] == int(vm.run("id -u libvirt-qemu").out), st["vmm"]
        assert st["vmm"]["memory"] == "memfd", st["vmm"]
        calls1 = beat_calls(vm)
        assert calls1 > calls0, f"the beat handler's calls did not grow: {calls0} -> {calls1}\n{libvirt_tail(vm)}"

        # libvirt's migration to a file: QEMU's migration stream, with the forwarder's section.
        virsh(vm, f"save {DOMAIN} {SAVE_FILE}", timeout=600)
        state = virsh(vm, f"domstate {DOMAIN}").strip()
        assert state == "shut off", f"after virsh save the domain is {state!r}\n{libvirt_tail(vm)}"
        saved = transfers(vm, "state saved for the VMM")
        assert saved == saved0 + 1, f"'state saved for the VMM' {saved0} -> {saved} times\n{libvirt_tail(vm)}"
        before = beats(vm, LIBVIRT_SERIAL)
        assert vm.run(f"test -s {SAVE_FILE}", check=False).rc == 0, f"no {SAVE_FILE}\n{libvirt_tail(vm)}"

        virsh(vm, f"restore {SAVE_FILE}", timeout=600)
        vm.wait_for(f"journalctl _SYSTEMD_UNIT={UNIT}.service HVC_VM=vm1 --no-pager -o cat | "
                    f"[ $(grep -c 'state loaded from the VMM') -ge {loaded0 + 1} ]",
                    "the daemon to load the state from the restored QEMU", timeout=300, interval=3)
        after = wait_beats(vm, len(before) + 5, "the restored guest's calls")
        # The same guest went on where it stopped (its RAM came back): no line lost, none repeated,
        # every answer still the daemon's.
        ns = [n for n, _, _ in after]
        assert ns == list(range(1, len(after) + 1)), f"the guest restarted or lost lines: {ns}\n{libvirt_tail(vm)}"
        bad = [b for b in after if b[1:] != (0, X1_RELOADED)]
        assert not bad, f"wrong answers: {bad}\n{libvirt_tail(vm)}"
        new_pid = libvirt_qemu_pid(vm)
        assert new_pid != pid, "virsh restore did not start a new QEMU"
        st = status(vm)
        assert st["vmm"] is not None and st["vmm"]["pid"] == new_pid, f"{st}\n{libvirt_tail(vm)}"
        assert transfers(vm, "state loaded from the VMM") == loaded0 + 1, libvirt_tail(vm)
        calls2 = beat_calls(vm)
        assert calls2 > calls1, f"no calls after the restore: {calls1} -> {calls2}\n{libvirt_tail(vm)}"
    finally:
        vm.run(f"virsh destroy {DOMAIN}", timeout=300, check=False)
    state = virsh(vm, f"domstate {DOMAIN}").strip()
    assert state == "shut off", f"after virsh destroy the domain is {state!r}\n{libvirt_tail(vm)}"
    vm.wait_for("hvcproxyd status vm1 --json | grep -q '\"vmm\": null'", "the daemon to see libvirt's QEMU go")
    # The domain stays defined: the VM, its overlay and libvirt's records are thrown away with the
    # session (libvirt 9.0 refuses `undefine --managed-save` after a restore from a save file).
