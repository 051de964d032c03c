"""``hvcproxyd run`` tells a supervisor whether a restart could help: a real
process, its exit status, and the one line that says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hvcproxyd.errors import ExitCode

from .process import REPO

RULES = "handlers:\n  p:\n    type: psci\nrules:\n  - match: psci\n    action: p\n"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hvcproxyd", "--log-format", "text", "run", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=False)


@pytest.mark.parametrize(("config", "socket", "code", "says"), [
    (None, None, ExitCode.CONFIG, "cannot read: No such file or directory"),  # `systemctl start hvcproxyd@typo`
    ("vm: a\nhandlers: [\n", None, ExitCode.CONFIG, "has errors, not starting"),
    (f"vm: a\n{RULES}", "/proc/hvcproxyd-test.sock", ExitCode.CANTCREAT, "cannot listen on /proc/hvcproxyd-test"),
    (f"vm: a\nstate: {{dir: /proc/hvcproxyd-test}}\n{RULES}", None, ExitCode.CANTCREAT,
     "state directory /proc/hvcproxyd-test/a cannot be created"),
])
def test_permanent_failures_have_their_own_exit_status(tmp_path: Path, config: str | None, socket: str | None,
                                                       code: int, says: str) -> None:
    path = tmp_path / "vm.yaml"
    if config is not None:
        path.write_text(config)
    done = run(str(path), "--socket", socket or str(tmp_path / "vm.sock"))
    assert done.returncode == code and code in ExitCode.PERMANENT, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def test_saved_state_that_does_not_fit_the_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "vm.yaml"
    state = tmp_path / "state" / "a"
    state.mkdir(parents=True)
    (state / "snapshot.json").write_bytes((REPO / "tests" / "fixtures" / "state-v1.json").read_bytes())
    path.write_text(f"vm: a\nstate: {{dir: {tmp_path / 'state'}}}\n{RULES}")
    done = run(str(path), "--socket", str(tmp_path / "vm.sock"))
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "cannot serve: the state in" in done.stderr and "hvcproxyd state import" in done.stderr
    assert "Traceback" not in done.stderr
