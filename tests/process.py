"""``hvcproxyd run`` as a real child process, for the tests that need one
(signals, NOTIFY_SOCKET, QEMU connecting to it).  Both tiers use it: tests/
directly, integration/ through qemu_harness's ``start_daemon`` fixture.

Everything in-process uses the ``serve`` fixture (tests/conftest.py) instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hvcproxyd.ops.control import request_status

from .waiting import poll

REPO = Path(__file__).resolve().parent.parent


class DaemonProcess:
    """``python -m hvcproxyd run CONFIG [--socket SOCKET]`` in its own session,
    stdout and stderr in ``log_path``; ``with`` stops it (SIGTERM, then SIGKILL).

    The repository is on its PYTHONPATH, so configs may name test handlers such
    as ``tests.ops_support:Power``."""

    def __init__(self, config: Path, *, socket: Path | None = None, log_path: Path | None = None,
                 log_level: str | None = None, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.socket = socket
        self.log_path = log_path or config.with_suffix(".log")
        argv = [sys.executable, "-m", "hvcproxyd", "--log-format", "text"]
        if log_level:
            argv += ["--log-level", log_level]
        argv += ["run", str(config)]
        if socket is not None:
            argv += ["--socket", str(socket)]
        self.argv = argv
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifetime
    def start(self) -> DaemonProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=REPO, start_new_session=True)
        return self

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status; fails if the daemon is still running after ``timeout``."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"hvcproxyd still running after {timeout:g}s:\n{self.log[-4000:]}") from None

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM (to its whole session), SIGKILL after ``grace``; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.wait()

    # -- what it says
    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _alive(self) -> None:
        assert self.proc is not None, "DaemonProcess not started"
        if self.proc.poll() is not None:
            raise AssertionError(f"hvcproxyd exited with {self.proc.returncode}:\n{self.log[-4000:]}")

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of ``pattern`` (a multiline regex) in the log, once it appears."""
        return poll(lambda: re.search(pattern, self.log, re.MULTILINE), f"daemon log /{pattern}/",
                    timeout=timeout, log=self.log_path)

    def wait_listening(self, timeout: float = 30.0) -> Path:
        """The VMM socket, once the daemon listens on it; fails at once if the daemon exits."""
        sock = self.socket
        assert sock is not None, "wait_listening needs the socket= the daemon was started with"

        def listening() -> bool:
            self._alive()
            return sock.is_socket()
        poll(listening, f"the daemon to listen on {sock}", timeout=timeout, log=self.log_path)
        return sock

    def wait_ready(self, control: Path, timeout: float = 30.0) -> dict[str, Any]:
        """The first ``status`` answer on the control socket ``control``."""
        def ready() -> dict[str, Any] | None:
            self._alive()
            try:
                return request_status(control)
            except Exception:
                return None
        return poll(ready, f"the control socket {control}", timeout=timeout, log=self.log_path)
