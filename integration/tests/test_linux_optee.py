"""Linux's own OP-TEE driver against hvcproxyd's tee-proxy, under the patched QEMU (TCG).

The client kernel (integration/linux/build-kernel.sh, CONFIG_TEE=y CONFIG_OPTEE=y)
boots with QEMU's own device tree plus a ``linaro,optee-tz`` node with
``method = "hvc"`` (linux_dt.optee_node).  hvcproxyd forwards the whole OP-TEE
range to the tee-proxy handler, whose backend is the reference TEE, run here as
its own process (``python -m hvcproxyd.handlers.tee_proxy.reftee``).

- The driver probes: API UID and revision, capabilities (dynamic SHM), the
  device-enumeration pseudo-TA (a size query with a null memref, then a
  registered buffer): the echo TA appears on the TEE bus.
- ``/dev/tee0`` and ``/dev/teepriv0`` appear.
- /bin/tee-test, a static arm64 program, opens sessions through the TEE ioctls,
  echoes, reverses and adds through the echo TA, sees the configured client ID,
  and makes the rpc TA allocate kernel shared memory and ask the time through
  RPCs the kernel answers.
- A reboot is a VM reset: the TEE hears VM_DESTROYED and VM_CREATED for the
  client, the driver probes again and the client works again; the power-off
  ends with VM_DESTROYED.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from linux_clients import Console, client_kernel  # noqa: F401  (client_kernel is a fixture)
from linux_dt import build_dtb, optee_node
from qemu_harness import REPO, StartDaemon, StartQemu
from test_linux_clients import BOOT_TIMEOUT, MACHINE, MEMORY, SMP

from tests.waiting import poll

pytestmark = pytest.mark.integration

CLIENT_ID = 42
ECHO_TA = "5e1f0c2a-7d4b-4c8e-9a61-0e2f4b6d8a10"


@pytest.fixture
def reftee(workdir: Path) -> Iterator[Path]:
    """The reference TEE on a socket in the work directory."""
    sock = workdir / "tee.sock"
    log = (workdir / "reftee.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "hvcproxyd.handlers.tee_proxy.reftee", str(sock)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        poll(sock.is_socket, f"the reference TEE's socket {sock}", timeout=20, log=workdir / "reftee.log")
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _config(workdir: Path, tee_sock: Path) -> Path:
    cfg = workdir / "tee.yaml"
    cfg.write_text(f"""
vm: linux-tee
handler_timeout_ms: 1000
handlers:
  tee:
    type: tee-proxy
    options: {{client_id: {CLIENT_ID}, socket: {tee_sock}}}
rules:
  - match: optee
    action: tee
""")
    return cfg


def test_linux_optee_driver_and_a_tee_client(qemu_bin: Path, client_kernel: Path,  # noqa: F811
                                             start_daemon: StartDaemon, start_qemu: StartQemu,
                                             workdir: Path, reftee: Path) -> None:
    daemon = start_daemon(config=_config(workdir, reftee))
    dtb, final = build_dtb(qemu_bin, MACHINE, workdir, [optee_node("hvc")], name="optee")
    assert 'compatible = "linaro,optee-tz"' in final and 'method = "hvc"' in final
    q = start_qemu("-kernel", str(client_kernel / "Image"), "-initrd", str(client_kernel / "initramfs.cpio.gz"),
                   "-append", "console=ttyAMA0 rdinit=/init panic=-1", "-dtb", str(dtb),
                   forwarder=daemon.socket, smp=SMP, memory=MEMORY, forwarder_opts=",vm-name=linux-tee")
    console = Console(q)
    console.wait(r"^HVCTEST: ready\r?$", BOOT_TIMEOUT)
    try:
        out = q.output()
        assert "optee: probing for conduit method." in out, out
        assert "optee: api uid mismatch" not in out, out
        assert re.search(r"optee: revision 4\.0", out), out
        assert "optee: dynamic shared memory is enabled" in out, out
        assert "optee: initialized driver" in out, out
        _, lines = console.run("sh ls /dev/tee0 /dev/teepriv0 /sys/bus/tee/devices")
        assert "out /dev/tee0" in lines and "out /dev/teepriv0" in lines, lines
        assert f"out optee-ta-{ECHO_TA}" in lines, lines  # listed by the device-enumeration pseudo-TA
        rc, lines = console.run("tee-test", timeout=120, ok=False)
        assert rc == 0, "\n".join(lines) + "\n" + q.output()[-4000:]
        assert "tee echo 'hello from the normal world'" in lines, lines
        assert "tee reverse ok" in lines and "tee add 42" in lines, lines
        assert f"tee client {CLIENT_ID}" in lines, lines  # the TEE saw the configured client ID
        assert "tee rpc-shm 12288 freed=1" in lines, lines
        assert any(line.startswith("tee rpc-time ") for line in lines), lines
        assert "tee passed (0 failures)" in lines, lines
        _, lines = console.run("dmesg optee|tee:")
        assert not [line for line in lines if re.search(r"(?i)error|fail|bug|warn", line)], lines
        # A reboot is a VM reset: the TEE forgets the client's sessions (VM_DESTROYED, then VM_CREATED),
        # and the driver probes and works again.
        q.send("reboot\n")
        daemon.wait_log(r"VMM event VM_RESET", timeout=BOOT_TIMEOUT)
        rebooted = q.output().rindex("HVCTEST: begin reboot")
        console.wait(r"^HVCTEST: ready\r?$", BOOT_TIMEOUT, start=rebooted)
        assert "optee: initialized driver" in q.output()[rebooted:], q.output()[rebooted:]
        rc, lines = console.run("tee-test", timeout=120, ok=False)
        assert rc == 0 and "tee passed (0 failures)" in lines, lines
    finally:
        q.send("poweroff\n")
        q.wait(60)
    log = daemon.log_path.read_text(errors="replace")
    assert not re.search(r"(WARNING|ERROR) +hvcproxyd\.linux-tee\.tee", log), log[-4000:]
    assert "raised on" not in log and "timed out" not in log, log[-4000:]
    # The handler told the TEE when the VM came and went (the lifecycle sidecar, on QEMU's shutdown event).
    tee_log = workdir / "reftee.log"
    expected = ["VM_CREATED", "VM_DESTROYED", "VM_CREATED", "VM_DESTROYED"]  # boot, reboot, power-off

    def lifecycle() -> list[str]:
        return re.findall(rf"(VM_CREATED|VM_DESTROYED) client {CLIENT_ID}\b", tee_log.read_text())

    poll(lambda: lifecycle() == expected, f"the TEE to see {expected}", timeout=10, log=tee_log)
