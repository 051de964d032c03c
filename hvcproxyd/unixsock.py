"""UNIX listening sockets with an owner group and mode, and who owns the path.

Trio has no UNIX listener of its own (STYLE.md): we bind, listen, and unlink
only the socket we bound, never a successor's that took the path since.
"""

from __future__ import annotations

import os
import socket as stdsocket
import stat
import struct
from contextlib import suppress
from pathlib import Path
from types import TracebackType

import trio

from .config import resolve_id
from .errors import HvcproxydError


def set_group(path: Path, group: int | str, key: str) -> None:
    """Hand a socket to ``group`` (e.g. QEMU's), so that group may connect."""
    gid = resolve_id(group, "group")
    if gid is None:
        raise HvcproxydError(f"{key}: there is no group {group!r} on this host, so {path} cannot be handed to it")
    try:
        os.chown(path, -1, gid)
    except OSError as err:
        raise HvcproxydError(
            f"{key}: cannot give {path} to group {group!r} ({gid}): {err.strerror}; the daemon must be a member "
            f"of that group (in the unit: SupplementaryGroups={group})") from err


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class UnixListener:
    """``async with UnixListener(path, 0o600) as listener:`` binds, listens, and
    on exit unlinks the path if it is still ours."""

    def __init__(self, path: Path, mode: int, group: int | str | None = None, key: str = "socket") -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.key = key
        self._sock: trio.socket.SocketType | None = None
        self._inode = -1

    async def __aenter__(self) -> trio.SocketListener:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()  # stale, from an earlier run
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            await sock.bind(str(self.path))
            os.chmod(self.path, self.mode)
            if self.group is not None:
                set_group(self.path, self.group, self.key)
            sock.listen(16)
        except OSError as err:
            sock.close()
            raise HvcproxydError(f"{self.key}: cannot listen on {self.path}: {err.strerror}") from err
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._inode = os.lstat(self.path).st_ino
        return trio.SocketListener(sock)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        if self._sock is not None:
            self._sock.close()


__all__ = ["UnixListener", "peer_credentials", "set_group"]


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """File descriptors passed with SCM_RIGHTS in a recvmsg()'s ancillary data."""
    import array

    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == stdsocket.SOL_SOCKET and kind == stdsocket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def fds_ancdata(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data for sendmsg() that passes ``fds`` with SCM_RIGHTS."""
    import array

    return [(stdsocket.SOL_SOCKET, stdsocket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
