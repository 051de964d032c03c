"""systemd's readiness and watchdog protocol (sd_notify(3)), client side.

Hand-written on purpose: the protocol is one datagram of ``KEY=VALUE`` lines to
the socket named in ``$NOTIFY_SOCKET``, which systemd documents as a stable
interface for exactly this.  The maintained binding, cysystemd, would load its
own copies of libsystemd, libgcrypt, lz4 and zstd into a hardened daemon for
these few lines, and python-systemd needs a C build against libsystemd-dev.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("hvcproxyd.sdnotify")


class Notifier:
    """Sends state to the service manager; a no-op when not run by one.

    ``watchdog_s`` is the ``WatchdogSec=`` the unit asked for (None: no
    watchdog); the daemon must ping at least that often, and pings at half of it.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message, e.g. ``notify(READY=1, STATUS="serving")``; False if it
        could not be delivered (logged once: the service keeps running without it)."""
        if self.address is None:
            return False
        data = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self.address)
        except OSError as err:
            if not self._failed:
                log.warning("cannot notify the service manager at %r: %s", self.address, err.strerror)
            self._failed = True
            return False
        return True

    def reloading(self) -> bool:
        """RELOADING=1, stamped as systemd ≥ 253 wants it (older ones ignore the stamp)."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # unset, or a transport (vsock:) a per-VM daemon never runs under


__all__ = ["Notifier"]
