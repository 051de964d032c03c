"""``hvcproxyd run`` as systemd runs it: a real subprocess, a test NOTIFY_SOCKET,
real signals, and the answers read back through ``status``."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from hvcproxyd.ops.control import request_status
from hvcproxyd.ops.sdnotify import Notifier

from .ops_support import DaemonProcess, ops_config, wait_for


def notify_messages(sock: socket.socket, until: float) -> list[dict[str, str]]:
    """Datagrams received before ``until``, each as its KEY=VALUE fields."""
    out = []
    while time.monotonic() < until:
        sock.settimeout(max(until - time.monotonic(), 0.01))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
    return out


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
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    with notify, DaemonProcess(config, env) as daemon:
        before_ready: list[dict[str, str]] = []
        deadline = time.monotonic() + 15
        ready = None
        while ready is None and time.monotonic() < deadline:
            notify.settimeout(deadline - time.monotonic())
            msg = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
            if msg.get("READY") == "1":
                # Checked the moment READY arrives: every socket must already accept.
                ready = (msg, accepts(tmp_path / "opsvm.sock"), accepts(tmp_path / "opsvm.ctl"),
                         accepts(tmp_path / "opsvm.metrics"))
            else:
                before_ready.append(msg)
        assert ready is not None, f"no READY=1 within 15s; log:\n{daemon.log}"
        msg, vmm_ok, control_ok, metrics_ok = ready
        assert vmm_ok and control_ok and metrics_ok
        assert msg["STATUS"] == f"opsvm: waiting for the VMM on {tmp_path}/opsvm.sock (5 rules)"
        assert not any("WATCHDOG" in m for m in before_ready)
        later = notify_messages(notify, time.monotonic() + 1.0)
        pings = [m for m in later if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 3, later  # every 0.1s for a 0.2s WatchdogSec
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        stopping = notify_messages(notify, time.monotonic() + 0.2)  # already queued: the daemon has exited
        assert any(m.get("STOPPING") == "1" for m in stopping), stopping


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
            return wait_for(check, what=f"reload {n}")  # type: ignore[no-any-return]

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
        assert daemon.wait() == 1
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
