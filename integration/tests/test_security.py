"""The security tier: a real ``hvcproxyd run`` serving a VM, attacked by another
local user (``nobody``) on every socket it has, while the VM keeps calling.

Every socket file is made world-writable first (mode 0666): the worst
permission slip an operator could make, so what is tested is the daemon's own
defence (peer credentials, caps, idle timeouts, fd hygiene), not the file
mode.  The attacker is integration/security/attack.py, run with the system's
python3 under uid 65534.  Afterwards the VM must still be served, with its
state intact, and the daemon must hold no more file descriptors than before.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from hvcproxyd import wire
from hvcproxyd.handlers.pkvm_memshare import MEM_SHARE_ID, MEM_UNSHARE_ID
from hvcproxyd.ops.control import request_status
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu
from tests.process import DaemonProcess
from tests.waiting import poll

ATTACK = Path(__file__).resolve().parents[1] / "security" / "attack.py"
NOBODY = 65534
CPU_ON, AFFINITY_INFO, PSCI_VERSION = 0xC400_0003, 0xC400_0004, 0x8400_0000
ON, INVALID = 0, (1 << 64) - 3
ENTRY = RAM_BASE + 0x10000  # where vCPU 1 starts: in RAM, 4-byte aligned

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists() or
                                not shutil.which("setpriv"),
                                reason="the security tier runs attacks as another user: needs root, "
                                       "/usr/bin/python3 and setpriv (util-linux)")


@dataclass
class Deployment:
    dir: Path
    daemon: DaemonProcess
    vmm: Path
    control: Path
    stream: Path
    metrics_port: int

    def fds(self) -> int:
        assert self.daemon.proc is not None
        return len(os.listdir(f"/proc/{self.daemon.proc.pid}/fd"))

    def status(self) -> dict[str, Any]:
        return request_status(self.control)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    # Not pytest's tmp_path: root's is mode 0700, and the attacker must reach the sockets.
    top = Path(tempfile.mkdtemp(prefix="hvcproxyd-sec-"))
    top.chmod(0o755)
    port = free_port()
    config = top / "vm.yaml"
    config.write_text("\n".join([
        "vm: sec", f"socket: {top}/sec.sock", f"control_socket: {top}/sec.ctl",
        # The attacker's own primary group opens the VMM socket file: with vmm.uid set,
        # the group must grant nothing more (it used to admit anyone who could `sg` to it).
        "vmm:", "  uid: [0]", f"  gid: {NOBODY}",
        "metrics:", f"  listen: 127.0.0.1:{port}",
        "handlers:", "  psci:", "    type: psci",
        "  ms:", "    type: pkvm-memshare", "    options:", f"      socket: {top}/sec.memshare.sock",
        "rules:", "  - match: psci", "    action: psci", "  - match: kvm-vendor", "    action: ms", ""]))
    daemon = DaemonProcess(config, socket=top / "sec.sock", log_path=top / "daemon.log")
    with daemon:
        daemon.wait_listening()
        dep = Deployment(top, daemon, top / "sec.sock", top / "sec.ctl", top / "sec.memshare.sock", port)
        daemon.wait_ready(dep.control)
        poll(lambda: dep.stream.is_socket(), "the memshare stream socket", log=daemon.log_path)
        for sock in (dep.vmm, dep.control, dep.stream):
            sock.chmod(0o666)
        shutil.copy(ATTACK, top / "attack.py")
        (top / "attack.py").chmod(0o644)
        yield dep
    shutil.rmtree(top, ignore_errors=True)


def attack(dep: Deployment, *args: str, timeout: float = 240) -> dict[str, Any]:
    """attack.py ARGS as nobody, with no groups and a clean environment."""
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--reset-env",
           "/usr/bin/python3", str(dep.dir / "attack.py"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"attack.py {args[0]} failed:\n{done.stderr}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def hello_frame() -> bytes:
    """A well-formed HELLO, as QEMU would send it: what a user posing as QEMU sends."""
    hello = wire.Hello("sec", wire.Accel.TCG, 40, (wire.VcpuInfo(0, 0, True), wire.VcpuInfo(1, 1, False)),
                       (wire.RamRegion(RAM_BASE, 16 << 20),))
    return wire.Connection(wire.Role.VMM).send(hello)


async def serve_vm_through(dep: Deployment, attacks: list[tuple[str, ...]]) -> dict[str, Any]:
    """The VM: vCPU 1 powered on and two pages shared, then PSCI_VERSION in a loop
    while each attack runs in turn; afterwards the state is checked through the guest."""
    seen: dict[str, Any] = {"calls_during": 0, "results": []}
    done = trio.Event()

    async def idle(cpu: SimVcpu, x0: int) -> None:
        await trio.sleep_forever()

    async def guest(cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(CPU_ON, 1, ENTRY, 0))[0] == ON
        for page in (RAM_BASE, RAM_BASE + 0x2000):
            assert (await cpu.call(MEM_SHARE_ID, page))[0] == 0

        async def keep_calling() -> None:
            while not done.is_set():
                assert (await cpu.call(PSCI_VERSION))[0] != INVALID
                seen["calls_during"] += 1
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_calling)
            for args in attacks:
                seen["results"].append(await trio.to_thread.run_sync(functools.partial(attack, dep, *args)))
            done.set()
        # The state the guest built before the attacks, as the guest sees it.
        seen["affinity_1"] = (await cpu.call(AFFINITY_INFO, 1, 0))[0]
        seen["unshare"] = (await cpu.call(MEM_UNSHARE_ID, RAM_BASE + 0x2000))[0]
        seen["unshare_again"] = (await cpu.call(MEM_UNSHARE_ID, RAM_BASE + 0x2000))[0]
        seen["share_shared"] = (await cpu.call(MEM_SHARE_ID, RAM_BASE))[0]

    sim = Simulator(dep.vmm, n_vcpus=2, name="sec", boot=guest, programs={ENTRY: idle})
    try:
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sim.run, 600)
                while "share_shared" not in seen:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    finally:
        sim.close()
    return seen


async def test_another_user_cannot_exhaust_pose_as_the_vmm_or_read_the_daemon(deployment: Deployment) -> None:
    dep = deployment
    before = dep.fds()
    attacks = [
        # fd exhaustion: more connections than the daemon's soft limit used to be, on every socket at once.
        ("flood", "--unix", str(dep.vmm), "--unix", str(dep.control), "--unix", str(dep.stream),
         "--tcp", f"127.0.0.1:{dep.metrics_port}", "--count", "1200", "--hold", "3"),
        # posing as QEMU with a well-formed HELLO, and asking the control socket for status.
        ("request", "--unix", str(dep.vmm), "--hex", hello_frame().hex()),
        ("request", "--unix", str(dep.control), "--hex", b'{"op": "status"}\n'.hex()),
        ("request", "--unix", str(dep.stream), "--hex", ""),
    ]
    seen = await serve_vm_through(dep, attacks)
    flood, pose, control, stream = seen["results"]

    # The VM was served throughout and kept everything it had.
    assert seen["calls_during"] > 0
    assert seen["affinity_1"] == ON
    assert (seen["unshare"], seen["unshare_again"], seen["share_shared"]) == (0, INVALID, INVALID)

    # Every flood connection was refused at once or closed by the daemon: none is kept.
    for target in (str(dep.vmm), str(dep.control), str(dep.stream)):
        stats = flood[target]
        assert stats["connected"] + stats["refused"] == 1200, stats
        assert stats.get("closed_by_daemon", 0) == stats["connected"], (target, stats)
    tcp = flood[f"127.0.0.1:{dep.metrics_port}"]
    assert tcp["connected"] + tcp["refused"] == 1200, tcp  # loopback: readable by design, never exhausting

    # Posing as QEMU gets nothing but a close; the status and the ledger stay private.
    assert pose["closed"]
    welcome = wire.Connection(wire.Role.VMM)
    welcome.state = wire.State.AWAIT_WELCOME
    welcome.receive_data(bytes.fromhex(pose["answer_hex"]))
    assert not isinstance(welcome.next_event(), wire.Welcome)
    assert control == {"answer_hex": "", "closed": True}
    assert stream == {"answer_hex": "", "closed": True}

    status = dep.status()
    assert status["connections"]["refused_peers"] >= 1
    assert dep.daemon.running
    # No descriptor leaked: back to what it held before (the VMM's own link is gone too).
    poll(lambda: dep.fds() <= before, f"the daemon's fds back to {before}", timeout=30, log=dep.daemon.log_path)
    log = dep.daemon.log
    assert "Traceback" not in log, log[-3000:]
    print(json.dumps(seen, indent=1), file=sys.stderr)
