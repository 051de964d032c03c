"""A Debian 12 VM with systemd as PID 1, for the systemd-vm tier (test_systemd_vm.py).

The image is integration/systemd-vm/build-image.sh's (cached); each boot runs
on a qcow2 overlay of it, so the cached image stays clean.  Files come in on a
read-only virtio-9p share, mounted at /mnt/share; commands go to the image's
agent (integration/systemd-vm/agent.py) over the virtio-serial port ``ctl``;
the serial console is a file whose tail every failure message carries.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Booting the image under TCG takes ~40 s on an idle two-core machine; this is the hang guard.
BOOT_TIMEOUT = 300.0


@dataclass
class Result:
    cmd: str
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"`{self.cmd}` exited {self.rc}\n--- stdout ---\n{self.out[-3000:]}\n--- stderr ---\n{self.err[-3000:]}"


class SystemdVm:
    """One boot of the image: ``run`` a shell command in it, read its console."""

    def __init__(self, image: Path, share: Path, workdir: Path) -> None:
        self.image, self.share, self.workdir = image, share, workdir
        self.console = workdir / "console.log"
        self.ctl_path = workdir / "ctl.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.buf = b""
        self.next_id = 0

    def console_tail(self, chars: int = 4000) -> str:
        text = self.console.read_text(errors="replace") if self.console.exists() else "(no console output)"
        return f"--- VM console ({self.console}), last {chars} chars ---\n{text[-chars:]}"

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        overlay = self.workdir / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image / "root.img"),
                        "-F", "raw", str(overlay)], check=True, capture_output=True, timeout=60)
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "2G", "-smp", "2",
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 systemd.show_status=1",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-virtfs", f"local,path={self.share},mount_tag=share,security_model=none,readonly=on",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off",
            "-device", "virtserialport,chardev=ctl,name=ctl",
            "-serial", f"file:{self.console}", "-display", "none", "-monitor", "none", "-nic", "none",
            "-no-reboot",
        ]
        err = (self.workdir / "qemu-x86.err").open("wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ctl_path.is_socket():
            self._check_alive()
            if time.monotonic() > deadline:
                pytest.fail(f"QEMU opened no control socket in {timeout:.0f}s\n{self.console_tail()}")
            time.sleep(0.2)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.ctl_path))
        # The agent answers only once the VM has booted; pings before that wait in the port.
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the VM's agent did not answer within {timeout:.0f}s of boot\n{self.console_tail()}")
            try:
                if self._request("true", timeout=min(10.0, remaining), cmd_timeout=5).rc == 0:
                    break
            except TimeoutError:
                continue

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = (self.workdir / "qemu-x86.err").read_text(errors="replace")
            pytest.fail(f"the VM's QEMU exited ({self.proc.returncode}):\n{err[-2000:]}\n{self.console_tail()}")

    def _request(self, cmd: str, timeout: float, cmd_timeout: float) -> Result:
        assert self.sock is not None
        self.next_id += 1
        rid = self.next_id
        self.sock.sendall(json.dumps({"id": rid, "cmd": cmd, "timeout": cmd_timeout}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                answer = json.loads(line)
                if answer.get("id") == rid:  # older ids: pings answered late
                    return Result(cmd, answer["rc"], answer["out"], answer["err"])
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(cmd)
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                pytest.fail(f"the VM's control channel closed during `{cmd}`\n{self.console_tail()}")
            self.buf += chunk

    def run(self, cmd: str, timeout: float = 120.0, check: bool = True) -> Result:
        """Run ``cmd`` with bash in the VM (as root); with ``check``, fail unless it exits 0."""
        try:
            res = self._request(cmd, timeout=timeout + 30, cmd_timeout=timeout)
        except TimeoutError:
            pytest.fail(f"no answer from the VM for `{cmd}` in {timeout + 30:.0f}s\n{self.console_tail()}")
        if check and res.rc != 0:
            pytest.fail(f"in the VM: {res}\n{self.console_tail()}")
        return res

    def wait_for(self, cmd: str, what: str, timeout: float = 120.0, interval: float = 1.0) -> Result:
        """Re-run ``cmd`` until it exits 0; fail naming ``what`` (with the last output) if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.run(cmd, timeout=60, check=False)
            if res.rc == 0:
                return res
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last try: {res}\n"
                            f"{self.console_tail()}")
            time.sleep(interval)

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the overlay is thrown away: no clean shutdown needed
            self.proc.wait(timeout=30)


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` into the share as ``dst`` (a hard link when the cache is on the same file system)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


__all__ = ["BOOT_TIMEOUT", "Result", "SystemdVm", "link_or_copy"]
