"""The integration tier: everything here boots QEMU or needs host tools, and
carries the ``integration`` marker (``-m "not integration"`` deselects it).

The QEMU fixtures live in qemu_harness.py; the in-process daemon fixture and
the config writers are the unit tier's (tests/conftest.py), shared here."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemu_harness import guests, linux_guest, qemu_bin, start_daemon, start_qemu, workdir  # noqa: F401

from tests.conftest import make_config, serve, write_config  # noqa: F401

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m selects on markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(params=[False, True], ids=["socket", "line"])
def line(request: pytest.FixtureRequest) -> bool:
    """Whether a serial line (a pty and the line adapter) stands between QEMU and the handler."""
    return bool(request.param)
