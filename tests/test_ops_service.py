"""``hvcproxyd run`` as systemd runs it: a real subprocess, a test NOTIFY_SOCKET,
real signals, and the answers read back through ``status``."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from hvcproxyd.errors import ExitCode
from hvcproxyd.ops.control import request_status
from hvcproxyd.ops.sdnotify import Notifier

from .ops_support import ops_config
from .process import DaemonProcess
from .waiting import poll


class NotifyListener:
    """The NOTIFY_SOCKET end systemd would hold: datagrams as KEY=VALUE dicts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, timeout: float = 30.0) -> dict[str, str]:
        """The next message; fails after ``timeout`` (a hang guard)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no sd_notify message within {timeout:g}s") from None
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def queued(self) -> list[dict[str, str]]:
        """Every message already waiting, without waiting for more."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096)
                out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def test_notify_ready_only_once_listening_then_watchdog_and_stopping(tmp_path: Path) -> None:
    config = tmp_path / "opsvm.yaml"
    config.write_text(ops_config(tmp_path))
    notify = NotifyListener(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    try:
        with DaemonProcess(config, env=env) as daemon:
            before_ready: list[dict[str, str]] = []
            while (msg := notify.receive()).get("READY") != "1":
                before_ready.append(msg)
            # Checked the moment READY arrives: every socket must already accept.
            assert accepts(tmp_path / "opsvm.sock") and accepts(tmp_path / "opsvm.ctl")
            assert accepts(tmp_path / "opsvm.metrics")
            assert msg["STATUS"] == f"opsvm: waiting for the VMM on {tmp_path}/opsvm.sock (5 rules)"
            assert not any("WATCHDOG" in m for m in before_ready)
            # Pings keep coming (every 0.1s for a 0.2s WatchdogSec): wait for three.
            later = [notify.receive()]
            while sum(m.get("WATCHDOG") == "1" for m in later) < 3:
                later.append(notify.receive())
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0, daemon.log
            stopping = notify.queued()  # already sent: the daemon has exited
            assert any(m.get("STOPPING") == "1" for m in stopping), stopping
    finally:
        notify.close()


def test_sighup_applies_a_good_config_and_refuses_bad_ones(tmp_path: Path) -> None:
    config = tmp_path / "opsvm.yaml"
    config.write_text(ops_config(tmp_path))
    control = tmp_path / "opsvm.ctl"
    with DaemonProcess(config) as daemon:
        st = daemon.wait_ready(control)
        assert st["config"]["handlers"] == 4 and st["reloads"] == {"applied": 0, "refused": 0, "last": None}

        def reloaded(n: int) -> dict[str, object]:
            def check() -> dict[str, object] | None:
                st = request_status(control)
                return st if st["reloads"]["applied"] + st["reloads"]["refused"] == n else None
            return poll(check, f"reload {n}")

        # A valid change: one more handler, and per-call logging on.
        config.write_text(ops_config(tmp_path, more_handlers="probe: {type: log}\n", extra="log_calls: true\n"))
        daemon.signal(signal.SIGHUP)
        st = reloaded(1)
        assert st["reloads"]["applied"] == 1 and st["reloads"]["last"]["ok"] is True  # type: ignore[index]
        assert st["config"]["handlers"] == 5 and st["config"]["log_calls"] is True  # type: ignore[index]

        # A broken file: refused with the file:line:column of the problem, running config kept.
        config.write_text(ops_config(tmp_path) + "colour: blue\n")
        daemon.signal(signal.SIGHUP)
        st = reloaded(2)
        last = st["reloads"]["last"]  # type: ignore[index]
        assert last["ok"] is False and st["reloads"]["refused"] == 1  # type: ignore[index]
        assert f"{config}:" in last["error"] and "colour: unknown key" in last["error"]
        assert st["config"]["handlers"] == 5  # type: ignore[index]

        # Valid but not live-compatible: a new forwarded range.
        config.write_text(ops_config(tmp_path).replace("0x82000003, action: minus3",
                                                       "[0x82000003, 0x82000004], action: minus3"))
        daemon.signal(signal.SIGHUP)
        st = reloaded(3)
        last = st["reloads"]["last"]  # type: ignore[index]
        assert last["ok"] is False and "forwarded/denied ranges" in last["error"]
        assert st["config"]["handlers"] == 5 and st["config"]["log_calls"] is True  # type: ignore[index]

        assert daemon.stop() == 0
    log = daemon.log
    assert "reload refused, keeping the running config" in log and "colour: unknown key" in log


def test_startup_failure_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "opsvm.yaml"
    config.write_text(ops_config(tmp_path).replace(f"vmm: {{uid: {os.getuid()}}}",
                                                   "vmm: {gid: no-such-group-here}"))
    with DaemonProcess(config) as daemon:
        # A missing group is permanent (ExitCode docs): the unit must not restart it.
        assert daemon.wait() == ExitCode.CANTCREAT
    assert "cannot serve: vmm.gid: there is no group 'no-such-group-here'" in daemon.log
    assert "Traceback" not in daemon.log


def test_notifier_reads_the_environment(tmp_path: Path) -> None:
    assert not Notifier({}).enabled and Notifier({}).watchdog_s is None
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == b"\0abstract"
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_s == 3.0
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_s is None  # another process's
    path = tmp_path / "n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        assert n.notify(READY=1, STATUS="a b")
        assert s.recv(100) == b"READY=1\nSTATUS=a b\n"
        assert n.reloading()
        assert s.recv(100).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        n.close()
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).notify(READY=1)
