"""The operations keys (vmm, control_socket, metrics, log_calls), the risky-choice
warnings of ``check``, the shipped example configs, and the journal wire format."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from hvcproxyd.cli import main
from hvcproxyd.config import ConfigError, MetricsConfig, VmmAuth
from hvcproxyd.core.vmconfig import load_config
from hvcproxyd.ops.journal import JournalHandler, encode, field_name, journal_stream_is

from .ops_support import REPO

BASE = """\
vm: ops
socket: {dir}/ops.sock
handlers:
  hello: {{type: static, timeout_ms: 900}}
rules:
  - {{match: [0x8200FF00, 0x8200FF03], action: hello}}
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Callable[[str], Path]:
    def write(extra: str) -> Path:
        path = tmp_path / "ops.yaml"
        path.write_text(BASE.format(dir=tmp_path) + extra)
        return path
    return write


def problems(path: Path) -> list[str]:
    try:
        config = load_config(path)
    except ConfigError as err:
        return [str(p) for p in err.problems]
    return [str(w) for w in config.warnings]


def test_defaults_sit_beside_the_vmm_socket(cfg: Callable[[str], Path], tmp_path: Path) -> None:
    config = load_config(cfg(""))
    assert config.vmm == VmmAuth() and config.log_calls is False
    assert config.control_socket == tmp_path / "ops.ctl"
    assert config.metrics == MetricsConfig(socket=tmp_path / "ops.metrics")
    moved = load_config(cfg(""), socket=str(tmp_path / "elsewhere" / "x.sock"))  # `run --socket`
    assert moved.control_socket == tmp_path / "elsewhere" / "x.ctl"


def test_operations_keys_parse(cfg: Callable[[str], Path], tmp_path: Path) -> None:
    config = load_config(cfg("vmm: {uid: 64055, gid: root, timeout_ms: 5000}\ncontrol_socket: /run/x/c\n"
                             "metrics: {socket: /run/x/m, group: root}\n"))
    assert config.vmm == VmmAuth((64055,), "root", 5000)
    assert config.control_socket == Path("/run/x/c")
    assert config.metrics == MetricsConfig(Path("/run/x/m"), None, "root")
    assert load_config(cfg("metrics: false\n")).metrics is None
    tcp = load_config(cfg("metrics: {listen: 'localhost:9830'}\n")).metrics
    assert tcp == MetricsConfig(None, ("127.0.0.1", 9830))
    assert load_config(cfg("metrics: {listen: '[::1]:9830'}\n")).metrics == MetricsConfig(None, ("::1", 9830))


def test_operations_key_errors_name_file_line_column(cfg: Callable[[str], Path], tmp_path: Path) -> None:
    path = cfg(f"vmm: {{uid: -4, user: qemu, timeout_ms: 0}}\ncontrol_socket: {tmp_path}/ops.sock\n"
               "metrics: {listen: '0.0.0.0:9830', socket: /x}\nlog_calls: yes please\n")
    found = problems(path)
    assert f"{path}:7:12: error: vmm.uid: must be a user name or a number" in found[0]
    assert any(p.startswith(f"{path}:7:16: error: vmm.user: unknown key; valid keys: uid, gid, timeout_ms")
               for p in found)
    assert any(":7:40: error: vmm.timeout_ms: must be an integer" in p for p in found)
    assert any(":8:17: error: control_socket: must differ from socket" in p for p in found), found
    assert any(":9:19: error: metrics.listen: give socket or listen, not both" in p for p in found)
    assert any("metrics.listen: must be HOST:PORT with a loopback HOST" in p and "'0.0.0.0:9830'" in p
               for p in found)
    assert any(":10:12: error: log_calls: must be true or false" in p for p in found)
    assert problems(cfg("metrics: true\n")) == [
        f"{path}:7:10: error: metrics: is on by default (a UNIX socket beside the VMM's); give a mapping "
        "(socket, listen, group) or false to turn it off"]


def test_check_warns_about_risky_choices(cfg: Callable[[str], Path]) -> None:
    found = problems(cfg("vmm: {uid: no-such-user-here, timeout_ms: 900}\nlog_calls: true\n"
                         "metrics: {listen: '127.0.0.1:9830'}\n"))
    assert all(": warning: " in p for p in found)
    assert any("vmm.uid: there is no user 'no-such-user-here' on this host" in p for p in found)
    assert any("handlers.hello.timeout_ms: 900 ms is not shorter than vmm.timeout_ms (900 ms)" in p for p in found)
    assert any("log_calls: logs every call at INFO" in p for p in found)
    assert any("metrics.listen: TCP needs the unit's network sandbox opened: install systemd/metrics-tcp.conf" in p
               for p in found)
    assert problems(cfg("vmm: {uid: 0, timeout_ms: 901}\n")) == []


def test_check_warns_when_a_service_is_taken_but_not_its_version_query(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("vm: p\nhandlers:\n  cpu: {type: static}\n  other: {type: static}\n  l: {type: log}\n"
                    "rules:\n  - {match: 0xC4000003, action: cpu}\n  - {match: 0x84000063, action: other}\n"
                    "  - {match: [0x84000064, 0x84000070], action: cpu}\n"
                    "  - {match: 0x82000002, action: l}\n  - {match: 0x8200FF01, action: cpu}\n")
    found = problems(path)
    assert (f"{path}:7:5: warning: rules[0].match: forwards psci calls to 'cpu', but PSCI_VERSION (0x84000000, hvc), "
            "which a guest asks first, goes to nothing (the guest gets NOT_SUPPORTED); forward it to the same "
            "handler") in found
    assert any(":9:5: warning: rules[2].match: forwards ffa calls to 'cpu', but FFA_VERSION (0x84000063, hvc)" in p
               and "goes to 'other'" in p for p in found)
    assert any(":10:5: warning: rules[3].action: 'l' (type log) writes an INFO line for every call" in p
               for p in found)


def test_shipped_configs_pass_check(capsys: pytest.CaptureFixture[str]) -> None:
    configs = sorted(str(p) for p in (REPO / "config").glob("*.yaml"))
    assert str(REPO / "config" / "vm-template.yaml") in configs
    assert main(["check", "--quiet", *configs]) == 0, capsys.readouterr().out


def test_template_documents_every_key() -> None:
    from hvcproxyd.core.vmconfig import TOP_KEYS

    text = (REPO / "config" / "vm-template.yaml").read_text()
    for key in TOP_KEYS:
        assert f"\n{key}:" in text or f"\n# {key}:" in text, key
    for key in ("uid:", "gid:", "timeout_ms:", "listen:", "group:"):
        assert key in text, key


# ----------------------------------------------------------------- journal wire format

def test_journal_encoding_and_fields(tmp_path: Path) -> None:
    assert encode({"A": "x", "B": 5}) == b"A=x\nB=5\n"
    assert encode({"M": "two\nlines"}) == b"M\n" + struct.pack("<Q", 9) + b"two\nlines\n"
    assert field_name("func") == "HVC_FUNC" and field_name("bad key") is None
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "j"))
        handler = JournalHandler(str(tmp_path / "j"), static={"HVC_VM": "vm1"})
        record = logging.LogRecord("hvcproxyd.x", logging.WARNING, "f.py", 7, "hi %s", ("there",), None)
        record.hvc = {"func": "PSCI_CPU_ON", "vcpu": 3, "bad key": 1}
        handler.emit(record)
        big = logging.LogRecord("hvcproxyd.x", logging.ERROR, "f.py", 8, "x" * 400_000, (), None)
        handler.emit(big)  # past the datagram limit: sent as a sealed memfd
        data = s.recv(65536)
        _, ancdata, _, _ = s.recvmsg(16, socket.CMSG_SPACE(4))
        handler.close()
    ((_, _, fd_bytes),) = ancdata
    (fd,) = struct.unpack("i", fd_bytes)
    with os.fdopen(fd, "rb") as memfd:
        memfd.seek(0)  # journald maps it; the sender's offset is at the end
        assert b"MESSAGE=" + b"x" * 400_000 + b"\nPRIORITY=3\n" in memfd.read()
    assert b"MESSAGE=hi there\n" in data and b"PRIORITY=4\n" in data and b"HVC_FUNC=PSCI_CPU_ON\n" in data
    assert b"HVC_VCPU=3\n" in data and b"HVC_VM=vm1\n" in data and b"BAD" not in data


def test_journal_is_chosen_only_for_our_own_stream(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert journal_stream_is(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not journal_stream_is(f.fileno(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not journal_stream_is(f.fileno(), {})


def test_journal_falls_back_to_stderr_when_journald_is_away(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    handler = JournalHandler(str(tmp_path / "no-journald"))
    handler.emit(logging.LogRecord("hvcproxyd.x", logging.ERROR, "f.py", 1, "still seen", (), None))
    handler.close()
    assert capsys.readouterr().err == "<3>still seen\n"  # sd-daemon(3) priority prefix


def test_state_section(cfg: Callable[[str], Path], tmp_path: Path) -> None:
    assert load_config(cfg("")).state is None
    assert load_config(cfg("state: false\n")).state is None
    on = load_config(cfg("state: {}\n")).state
    assert on is not None and (on.dir, on.fsync) == (Path("/var/lib/hvcproxyd"), "batch")
    mine = load_config(cfg(f"state: {{dir: {tmp_path}, fsync: never}}\n")).state
    assert mine is not None and (mine.dir, mine.fsync) == (tmp_path, "never")


@pytest.mark.parametrize(("extra", "says"), [
    ("state: true\n", ":7:8: error: state: give a mapping (dir, fsync), {} for the defaults, or false"),
    ("state: {fsync: sometimes}\n", ":7:16: error: state.fsync: 'sometimes' is not valid; one of: always, batch"),
    ("state: {dir: var/lib}\n", ":7:14: error: state.dir: var/lib is relative"),
    ("state: {dir: /nonexistent/hvc}\n", ":7:14: warning: state.dir: /nonexistent/hvc does not exist"),
    ("state: {fsync: batch, mode: 1}\n", ":7:23: error: state.mode: unknown key; valid keys: dir, fsync"),
])
def test_state_section_problems_say_where(cfg: Callable[[str], Path], extra: str, says: str) -> None:
    found = problems(cfg(extra))
    assert any(says in p for p in found), found
