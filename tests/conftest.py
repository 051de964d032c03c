"""Shared fixtures: write a config file, and run daemons in-process (``serve``).

Helpers that are not fixtures live beside this file: waiting.py (the one wait
helper) and process.py (``hvcproxyd run`` as a subprocess, for signal tests).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import settings

from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.ops.sdnotify import Notifier
from hvcproxyd.ops.service import Service
from hvcproxyd.server.daemon import Daemon

from .process import REPO

__all__ = ["REPO", "Serve"]

# Property tests: no deadline (a loaded CI machine is not a failing test), and a
# number of examples that keeps tests/ in seconds.  HYPOTHESIS_PROFILE=thorough
# runs them as hard as they used to be run (300-400 examples each).
settings.register_profile("unit", deadline=None, max_examples=60)
settings.register_profile("thorough", deadline=None, max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unit"))


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    def write(text: str, name: str = "vm.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path
    return write


@pytest.fixture
def make_config(write_config: Callable[..., Path], tmp_path: Path) -> Callable[[str], VmConfig]:
    def make(text: str) -> VmConfig:
        return load_config(write_config(text), socket=str(tmp_path / "vm.sock"))
    return make


class Serve:
    """Daemons served in the test's own trio run (the ``serve`` fixture).

    ``await serve(config)`` starts ``Daemon(config).serve`` and returns the daemon
    once it listens; ``await serve.service(config)`` does the same for the
    operations layer (``Service``: control socket, metrics, signal handling).
    Whatever is still serving when the test ends is stopped."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._done: dict[int, trio.Event] = {}
        self._daemons: list[Daemon] = []

    async def __call__(self, config: VmConfig | Daemon) -> Daemon:
        daemon = config if isinstance(config, Daemon) else Daemon(config)
        await self._start(daemon, daemon.serve)
        return daemon

    async def service(self, config: VmConfig, notifier: Notifier | None = None) -> Service:
        service = Service(config, notifier or Notifier({}))
        await self._start(service.daemon, service.run)
        return service

    async def stop(self, daemon: Daemon) -> None:
        """Stop ``daemon`` and wait until it has stopped serving (its socket is gone)."""
        daemon.stop()
        await self._done[id(daemon)].wait()

    async def _start(self, daemon: Daemon, run: Callable[..., object]) -> None:
        done = trio.Event()

        async def serving(*, task_status: trio.TaskStatus[None]) -> None:
            try:
                await run(task_status=task_status)  # type: ignore[misc]
            finally:
                done.set()

        self._done[id(daemon)] = done
        self._daemons.append(daemon)
        await self._nursery.start(serving)

    def stop_all(self) -> None:
        for daemon in self._daemons:
            daemon.stop()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serve daemons in-process for the length of the test; see :class:`Serve`."""
    async with trio.open_nursery() as nursery:
        runner = Serve(nursery)
        yield runner
        runner.stop_all()
