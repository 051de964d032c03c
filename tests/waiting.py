"""The one way tests wait for something to become true.

``wait_until`` is for trio tests: it re-checks observable state (a counter, a
subscriber list, a log file) each time the scheduler comes back to it, under a
hang guard.  On trio's MockClock the guard is virtual time, so a test that
waits on in-process state costs no real time.  ``poll`` is its twin for plain
(synchronous) tests that watch a subprocess.  Neither decides an outcome by
how long it slept: the predicate does, and the timeout only turns a hang into
a failure that says what was awaited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

T = TypeVar("T")

#: Hang guard, generous for a loaded two-core machine.
TIMEOUT = 30.0
#: Between checks: short, it only hands the CPU to whatever is being waited for.
INTERVAL = 0.01


def _failure(what: str, timeout: float, log: Path | None) -> str:
    tail = ""
    if log is not None and log.exists():
        tail = f"\n--- {log} ---\n{log.read_text(errors='replace')[-4000:]}"
    return f"timed out after {timeout:g}s waiting for {what}{tail}"


async def wait_until(predicate: Callable[[], T | None], what: str, *, timeout: float = TIMEOUT,
                     log: Path | None = None) -> T:
    """Await ``predicate()`` becoming truthy and return its value; fail (naming
    ``what``, with the tail of ``log``) if it does not within ``timeout``."""
    with trio.move_on_after(timeout):
        while not (value := predicate()):
            await trio.sleep(INTERVAL)
        return value
    raise AssertionError(_failure(what, timeout, log))


def poll(predicate: Callable[[], T | None], what: str, *, timeout: float = TIMEOUT, log: Path | None = None) -> T:
    """``wait_until`` for synchronous tests (a subprocess's sockets, files, logs)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(_failure(what, timeout, log))
        time.sleep(INTERVAL)
    return value
