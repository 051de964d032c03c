"""The demo works from an installed package: build the wheel, install it into a
fresh virtualenv (its dependencies come from the package index, as a user's
would), and run ``hvcproxyd demo`` from a directory that is not the repository.
Integration tier: it needs pip, the index and a few tens of seconds."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_demo_runs_from_a_wheel_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)], cwd=tmp_path)
    (wheel,) = dist.glob("hvcproxyd-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run([str(env_dir / "bin" / "hvcproxyd"), "demo", "--vcpus", "2"], cwd=elsewhere, timeout=120)
    installed = run([str(python), "-c", "import hvcproxyd; print(hvcproxyd.__file__)"], cwd=elsewhere).stdout
    assert str(env_dir) in installed  # the wheel's copy, not the repository's
    assert "demo.yaml" in done.stdout and str(REPO) not in done.stdout
    assert "PSCI_CPU_ON64(target=0x1" in done.stdout
    assert "hvcproxyd demo: the VM stopped (system-off)" in done.stdout
