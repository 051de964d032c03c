"""Log records to journald with fields, over its native protocol.

Under systemd, ``journalctl -u hvcproxyd@vm1 HVC_FUNC=PSCI_CPU_ON`` should find
calls; that needs fields, which plain stderr lines cannot carry.  A record's
``extra={"hvc": {...}}`` becomes ``HVC_<KEY>`` fields.

Hand-written for the same reasons as :mod:`hvcproxyd.sdnotify`, and one more:
libsystemd fixes the journal socket's path, so with it the fields could only be
tested against a live journald; here a test passes its own socket.  The format
(systemd.io/JOURNAL_NATIVE_PROTOCOL) is ``KEY=value\\n``, or for a value holding a
newline ``KEY\\n``, its length as little-endian u64, the value and ``\\n``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_FIELD = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def journal_stream_is(fd: int = 2, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``fd`` is systemd's journal stream for this service: ``$JOURNAL_STREAM``
    names its device and inode, so a redirected stderr is not mistaken for it."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


def encode(fields: Mapping[str, object]) -> bytes:
    out = bytearray()
    for key, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def field_name(key: str) -> str | None:
    """``HVC_<KEY>`` if that is a valid journal field name, else None."""
    name = "HVC_" + key.upper()
    return name if _FIELD.fullmatch(name) else None


class JournalHandler(logging.Handler):
    """One datagram per record; ``static`` fields (e.g. HVC_VM) go on every record."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "hvcproxyd",
                 static: dict[str, str] | None = None) -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.static = static if static is not None else {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.setFormatter(logging.Formatter("%(message)s"))  # journald stamps time, unit and pid itself

    def fields(self, record: logging.LogRecord) -> dict[str, object]:
        out: dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": _PRIORITY.get(record.levelno, 6),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
        }
        out.update(self.static)
        extra = getattr(record, "hvc", None)
        if isinstance(extra, dict):
            for key, value in extra.items():
                name = field_name(str(key))
                if name is not None and value is not None:
                    out[name] = value
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode(self.fields(record))
            try:
                self.sock.sendto(data, self.path)
            except OSError as err:
                if err.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_large(data)
        except OSError:
            # journald away (restarting): stderr is its stream, the line still lands.
            sys.stderr.write(f"<{_PRIORITY.get(record.levelno, 6)}>{self.format(record)}\n")
        except Exception:
            self.handleError(record)

    def _send_large(self, data: bytes) -> None:
        """Past the datagram limit journald takes a sealed memfd instead."""
        fd = os.memfd_create("hvcproxyd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                        | fcntl.F_SEAL_SEAL)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        super().close()


__all__ = ["JOURNAL_SOCKET", "JournalHandler", "encode", "field_name", "journal_stream_is"]
