"""``hvcproxyd state export|import``: offline, over the state directory, with
one-line errors; the checked-in version-1 document must import."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from hvcproxyd.cli import main
from hvcproxyd.core import state
from hvcproxyd.core.vmconfig import VmConfig

from .test_durable import RAM, SHARE, UNSHARE, Vm, config_text, ledger_of

FIXTURE = Path(__file__).parent / "fixtures" / "state-v1.json"


@pytest.fixture
def cfg(tmp_path: Path, write_config: Callable[..., Path]) -> Path:
    path = write_config(config_text(tmp_path) + f"control_socket: {tmp_path / 'd.ctl'}\n")
    return path


def loaded(cfg: Path, make_config: Callable[[str], VmConfig]) -> VmConfig:
    return make_config(cfg.read_text())


async def test_export_is_what_a_restart_loads(cfg: Path, make_config: Callable[[str], VmConfig], tmp_path: Path,
                                              capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    a = Vm(loaded(cfg, make_config))
    a.attach(reconnect=False)
    await a.call(SHARE, RAM)
    await a.call(SHARE, RAM + 0x3000)
    a.crash()  # journal only, no final compaction
    assert main(["state", "export", str(cfg)]) == 0
    doc = state.decode(capsysbinary.readouterr().out)
    assert doc["handlers"]["ms"]["ledger"]["ranges"] == [[RAM, 4096], [RAM + 0x3000, 4096]]
    assert "replay" not in doc and "journal_gen" not in doc  # the restart's own bookkeeping stays home
    out = tmp_path / "out.json"
    assert main(["state", "export", str(cfg), "-o", str(out)]) == 0
    assert state.decode(out.read_bytes())["handlers"] == doc["handlers"]


async def test_the_v1_fixture_imports(cfg: Path, make_config: Callable[[str], VmConfig],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert state.decode(FIXTURE.read_bytes())["version"] == 1
    assert main(["state", "import", str(cfg), str(FIXTURE)]) == 0
    assert "is now the state of VM 'd'" in capsys.readouterr().out
    b = Vm(loaded(cfg, make_config))
    assert ledger_of(b.svc) == [[RAM, 8192], [RAM + 0x8000, 4096]]
    assert b.svc.snapshot()["psci"]["power"]["1"] == "ON_PENDING"
    b.attach(reconnect=True)
    assert (await b.call(UNSHARE, RAM + 0x1000))[0] == 0  # shared before the import, unshared after


@pytest.mark.parametrize(("change", "says"), [
    (lambda d: d.update(version=state.VERSION + 1), "is newer than this hvcproxyd reads"),
    (lambda d: d["abi"]["handlers"]["psci"].update(version="1.0"), "version is '1.0' in the state, '1.1' here"),
    (lambda d: d.update(vm="other"), "it is VM 'other'"),
    (lambda d: d["handlers"]["ms"].update(ledger={}), "handler 'ms' refused its state"),
])
def test_import_refuses_what_does_not_fit(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          change: Callable[[dict[str, object]], None], says: str) -> None:
    doc = json.loads(FIXTURE.read_text())
    change(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(["state", "import", str(cfg), str(bad)]) == 1
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "state" / "d" / "snapshot.json").exists()


def test_import_refuses_a_running_daemon(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_UNIX) as ctl:
        ctl.bind(str(tmp_path / "d.ctl"))
        ctl.listen()
        assert main(["state", "import", str(cfg), str(FIXTURE)]) == 1
    assert "daemon is running" in capsys.readouterr().err


def test_errors_are_one_line(cfg: Path, tmp_path: Path, write_config: Callable[..., Path],
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["state", "export", str(cfg)]) == 1
    assert "has no saved state" in capsys.readouterr().err
    assert main(["state", "import", str(cfg), str(tmp_path / "missing.json")]) == 1
    assert "cannot read" in capsys.readouterr().err
    plain = write_config("vm: p\nhandlers:\n  p: {type: psci}\nrules:\n  - {match: psci, action: p}\n")
    assert main(["state", "export", str(plain)]) == 1
    assert "has no state: section" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["export", "import"])
def test_help(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["state", action, "--help"])
    assert done.value.code == 0
    assert "VM|CONFIG" in capsys.readouterr().out
