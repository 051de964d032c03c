"""The systemd units: `systemd-analyze verify` and the hardening score.

systemd-analyze must be installed (scripts/install-system-deps.sh, which
`./dev test` runs); a missing one fails these tests rather than skipping them,
so CI cannot go green without having checked the units.  A host tool: this is
the integration tier."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qemu_harness import REPO

from hvcproxyd.errors import ExitCode

UNIT = REPO / "systemd" / "hvcproxyd@.service"
DROP_INS = sorted((REPO / "systemd").glob("*.conf"))
MAX_EXPOSURE = 2.0


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: run scripts/install-system-deps.sh"
    return tool


def instance(tmp_path: Path, *drop_ins: Path) -> Path:
    """hvcproxyd@test.service in a scratch unit directory, its ExecStart pointed at
    the hvcproxyd installed here (verify checks the binary exists)."""
    exe = Path(sys.executable).parent / "hvcproxyd"
    assert exe.exists(), exe
    (tmp_path / UNIT.name).write_text(UNIT.read_text().replace("/usr/bin/hvcproxyd", str(exe)))
    (tmp_path / "hvcproxyd@test.service").symlink_to(UNIT.name)
    if drop_ins:
        d = tmp_path / "hvcproxyd@.service.d"
        d.mkdir()
        for conf in drop_ins:
            shutil.copy(conf, d)
    return tmp_path / "hvcproxyd@test.service"


def exposure(unit: Path) -> float:
    out = subprocess.run([analyze(), "security", "--offline=true", str(unit)], capture_output=True, text=True,
                         cwd=unit.parent)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m, out.stdout + out.stderr
    return float(m.group(1))


@pytest.mark.parametrize("drop_ins", [(), *((c,) for c in DROP_INS)], ids=lambda d: d[0].name if d else "base")
def test_units_verify(tmp_path: Path, drop_ins: tuple[Path, ...]) -> None:
    unit = instance(tmp_path, *drop_ins)
    out = subprocess.run([analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_security_score_is_ok(tmp_path: Path) -> None:
    assert exposure(instance(tmp_path)) <= MAX_EXPOSURE


def test_security_score_with_tcp_metrics_is_still_ok(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "tcp").mkdir()
    base = exposure(instance(tmp_path / "base"))
    assert base < exposure(instance(tmp_path / "tcp", REPO / "systemd" / "metrics-tcp.conf")) <= MAX_EXPOSURE


def test_unit_says_what_the_issue_asks(tmp_path: Path) -> None:
    """Settings whose absence the score would not catch."""
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID",
                 "RuntimeDirectory=hvcproxyd", "RuntimeDirectoryPreserve=yes", "StateDirectory=hvcproxyd",
                 "ExecStart=/usr/bin/hvcproxyd run /etc/hvcproxyd/%i.yaml", "MemoryDenyWriteExecute=yes",
                 "PrivateNetwork=yes", "RestrictAddressFamilies=AF_UNIX\n", "SystemCallFilter=@system-service"):
        assert line in text, line


def test_permanent_errors_stop_the_unit_instead_of_looping() -> None:
    """The unit's RestartPreventExitStatus= is exactly what `run` exits with when
    a restart cannot help, and nothing hides a missing config or the socket."""
    text = UNIT.read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("RestartPreventExitStatus=")]
    assert sorted(int(c) for c in line.split("=", 1)[1].split()) == sorted(ExitCode.PERMANENT)
    assert "\nConditionPathExists=" not in text  # `systemctl start hvcproxyd@typo` must fail loudly
    assert "\nDynamicUser=" not in text  # its preserved runtime dir would hide under /run/private (0700)
    sysusers = (REPO / "systemd" / "sysusers.d" / "hvcproxyd.conf").read_text()
    assert any(x.split()[:2] == ["u", "hvcproxyd"] for x in sysusers.splitlines()) and "User=hvcproxyd\n" in text
