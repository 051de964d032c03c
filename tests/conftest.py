"""Shared fixtures: write a config file, run a daemon in-process."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.server.daemon import Daemon

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "vm.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path
    return write


@pytest.fixture
def make_config(write_config: Callable[[str], Path], tmp_path: Path) -> Callable[[str], VmConfig]:
    def make(text: str) -> VmConfig:
        return load_config(write_config(text), socket=str(tmp_path / "vm.sock"))
    return make


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[VmConfig], trio.lowlevel.Task]]:
    """Start Daemon(config).serve in a nursery that ends with the test."""
    daemons: list[Daemon] = []
    async with trio.open_nursery() as nursery:
        async def start(config: VmConfig) -> Daemon:
            daemon = Daemon(config)
            await nursery.start(daemon.serve)
            daemons.append(daemon)
            return daemon
        yield start  # type: ignore[misc]
        for d in daemons:
            d.stop()
