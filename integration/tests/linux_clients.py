"""Helpers for the Linux client tests (test_linux_clients.py): the client
kernel's build fixture, a console driver for integration/linux/init-clients,
and readers of the memshare ledger (``hvcproxyd memshare ls`` and a live
``watch`` subscriber).

These live here rather than in qemu_harness.py so that the shared harness is
unchanged; the fixtures are imported into the test module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from qemu_harness import CONFIGS, REPO, Qemu, _run_build

from tests.process import DaemonProcess
from tests.waiting import poll

# A cold build: download + unpack ~2.5 min, kernel ~3.5-6 min on 2 busy cores.
KERNEL_BUILD_TIMEOUT = 40 * 60
CLI_TIMEOUT = 30


@pytest.fixture(scope="session")
def client_kernel() -> Path:
    """integration/linux/build-kernel.sh's output: Image, initramfs.cpio.gz, config."""
    return _run_build("linux/build-kernel.sh", timeout=KERNEL_BUILD_TIMEOUT)


def write_config(template: Path, workdir: Path, memshare_socket: Path,
                 memshare_options: dict[str, object] | None = None, name: str = "vm.yaml") -> Path:
    """``template`` with the memshare stream socket moved into the test's work directory
    (and any other memshare handler options overridden)."""
    data = yaml.safe_load(template.read_text())
    for h in data["handlers"].values():
        if h.get("type") == "pkvm-memshare":
            h.setdefault("options", {}).update(memshare_options or {}, socket=str(memshare_socket))
    out = workdir / name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


PKVM_GUEST_CONFIG = CONFIGS / "pkvm-guest.yaml"
VENDOR_ONLY_CONFIG = REPO / "config" / "memshare.yaml"


FFA_CONFIG = REPO / "config" / "ffa.yaml"


def ffa_config(workdir: Path) -> tuple[Path, int, dict[str, tuple[int, str]]]:
    """config/ffa.yaml with its state directory in the test's work directory, the
    guest's endpoint ID, and the partitions it offers by name: (ID, UUID)."""
    data = yaml.safe_load(FFA_CONFIG.read_text())
    options = data["handlers"]["ffa"]["options"]
    options["state_dir"] = str(workdir / "state")
    out = workdir / "ffa.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out, options["id"], {name: (p["id"], p["uuids"][0]) for name, p in options["partitions"].items()}


class Console:
    """Commands for init-clients over the serial console: each is answered by
    ``HVCTEST: begin CMD`` ... ``HVCTEST: end CMD rc=N``."""

    def __init__(self, q: Qemu) -> None:
        self.q = q

    def wait(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        rx = re.compile(pattern, re.MULTILINE)

        def found() -> re.Match[str] | None:
            out = self.q.output()
            if self.q.proc.poll() is not None and not rx.search(out, start):
                pytest.fail(f"QEMU exited ({self.q.proc.returncode}) before /{pattern}/:\n{out[-6000:]}")
            return rx.search(out, start)

        try:
            return poll(found, f"/{pattern}/ on the console", timeout=timeout)
        except AssertionError as err:
            pytest.fail(f"{err}:\n{self.q.output()[-6000:]}")

    def run(self, cmd: str, timeout: float = 60, ok: bool = True) -> tuple[int, list[str]]:
        """Run one command; returns its status and the "HVCTEST: " lines it printed."""
        start = len(self.q.output())
        self.q.send(cmd + "\n")
        begin = self.wait(rf"^HVCTEST: begin {re.escape(cmd)}\r?$", timeout, start)
        end = self.wait(rf"^HVCTEST: end {re.escape(cmd)} rc=(\d+)\r?$", timeout, begin.end())
        body = self.q.output()[begin.end():end.start()]
        lines = [m[1] for m in re.finditer(r"^HVCTEST: (.*?)\r?$", body, re.MULTILINE)]
        rc = int(end[1])
        if ok and rc != 0:
            pytest.fail(f"guest command {cmd!r} failed (rc={rc}):\n{self.q.output()[start:][-4000:]}")
        return rc, lines


def memshare_ls(socket: Path) -> dict[str, Any]:
    """``hvcproxyd memshare ls --socket SOCKET --json``: the ledger's snapshot."""
    proc = subprocess.run([sys.executable, "-m", "hvcproxyd", "memshare", "ls", "--socket", str(socket), "--json"],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"hvcproxyd memshare ls failed ({proc.returncode}):\n{proc.stderr}"
    rec: dict[str, Any] = json.loads(proc.stdout)
    assert rec["type"] == "snapshot", rec
    return rec


def memshare_ls_text(socket: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "hvcproxyd", "memshare", "ls", "--socket", str(socket)],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class Watcher:
    """``hvcproxyd memshare watch --socket SOCKET --json`` in the background: every
    record the subscriber stream delivers, checked by the CLI's own Replica."""

    def __init__(self, socket: Path, log: Path) -> None:
        self.log = log
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hvcproxyd", "memshare", "watch", "--socket", str(socket), "--json"],
            stdout=subprocess.PIPE, stderr=log.open("wb"), stdin=subprocess.DEVNULL, cwd=REPO,
            start_new_session=True, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.records.append(json.loads(line))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.records)

    def wait_for(self, pred: Any, timeout: float, what: str) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            recs = self.snapshot()
            if pred(recs):
                return recs
            if self.proc.poll() is not None:
                raise AssertionError("the watcher exited")
            return None

        try:
            return poll(ready, f"memshare watcher: {what}", timeout=timeout)
        except AssertionError:
            pass
        pytest.fail(f"memshare watcher: no {what} within {timeout:.0f}s (exit {self.proc.poll()}); "
                    f"{len(self.snapshot())} records, stderr:\n{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._thread.join(timeout=10)


def replay(records: list[dict[str, Any]]) -> set[int]:
    """The shared granule addresses after a stream of records (snapshot, share, unshare, reset),
    replayed independently of the CLI's Replica."""
    shared: set[int] = set()
    granule = 4096
    for rec in records:
        kind = rec["type"]
        if kind == "snapshot":
            granule = rec["granule"]
            shared = {ipa + off for ipa, size in rec["ranges"] for off in range(0, size, granule)}
        elif kind == "share":
            pages = {rec["ipa"] + off for off in range(0, rec["size"], granule)}
            assert not pages & shared, f"share of an already shared granule: {rec}"
            shared |= pages
        elif kind == "unshare":
            pages = {rec["ipa"] + off for off in range(0, rec["size"], granule)}
            assert pages <= shared, f"unshare of a granule not shared: {rec}"
            shared -= pages
        elif kind == "reset":
            shared = set()
    return shared


def ranges_to_pages(ranges: list[list[int]], granule: int = 4096) -> set[int]:
    return {ipa + off for ipa, size in ranges for off in range(0, size, granule)}


#: -smp and -m of a LinuxVm.
VM_SMP = 4
VM_MEMORY = "512M"


class LinuxVm:
    """The client kernel as a pKVM guest (-smp 4) under the patched QEMU, and its daemon
    (integration/configs/pkvm-guest.yaml, with its memshare stream in the work
    directory): one end of a migration, or a VM whose daemon a test restarts."""

    def __init__(self, name: str, start_daemon: Callable[..., DaemonProcess], workdir: Path,
                 psci: str | None = None, blocker: str | None = None, state: dict[str, str] | None = None) -> None:
        """``psci``: pin another PSCI version; ``blocker``: add a handler whose state
        cannot move, for that reason; ``state``: the config's durable ``state:``."""
        self.ms_sock = workdir / f"{name}-memshare.sock"
        config = write_config(PKVM_GUEST_CONFIG, workdir, self.ms_sock, name=f"{name}.yaml")
        data = yaml.safe_load(config.read_text())
        if psci is not None:
            data["versions"]["psci"] = psci
        if blocker is not None:
            data["handlers"]["held"] = {"type": "tests.plugins:Blocking", "options": {"reason": blocker}}
        if state is not None:
            data["state"] = state
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        self.config = config
        self.socket = workdir / f"{name}.sock"
        self.daemon = start_daemon(config=config, socket=self.socket, qmp=False)
        poll(self.ms_sock.exists, f"the memshare stream {self.ms_sock}", timeout=20, log=self.daemon.log_path)
        self.q: Qemu | None = None

    def boot(self, start_qemu: Callable[..., Qemu], kernel: Path, *extra: str) -> Qemu:
        self.q = start_qemu("-kernel", str(kernel / "Image"), "-initrd", str(kernel / "initramfs.cpio.gz"),
                            "-append", "console=ttyAMA0 rdinit=/init panic=-1", *extra,
                            forwarder=self.socket, smp=VM_SMP, memory=VM_MEMORY, forwarder_opts=",vm-name=linux")
        return self.q

    def status(self) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "hvcproxyd", "status", "--json", "--control-socket",
                               str(self.socket.with_suffix(".ctl")), "x"],
                              capture_output=True, text=True, timeout=30, cwd=REPO, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    def power(self) -> dict[str, str]:
        """Each vCPU's power state as the daemon's PSCI handler holds it."""
        status = self.status()
        assert status["vcpu_power_source"] == "handler psci", status
        return {str(v["index"]): v["power"] for v in status["vcpus"]}

    def pages(self) -> set[int]:
        return ranges_to_pages(memshare_ls(self.ms_sock)["ranges"])
