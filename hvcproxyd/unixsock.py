"""UNIX listening sockets with an owner group and mode, and who owns the path.

Trio has no UNIX listener of its own (STYLE.md): we bind, listen, and unlink
only the socket we bound, never a successor's that took the path since.
"""

from __future__ import annotations

import array
import grp
import os
import pwd
import socket as stdsocket
import stat
import struct
from contextlib import suppress
from pathlib import Path
from types import TracebackType

import trio

from .errors import HvcproxydError


def resolve_id(value: int | str, kind: str) -> int | None:
    """A uid (kind "user") or gid (kind "group") from a number or a name; None if unknown."""
    if isinstance(value, int):
        return value
    try:
        return pwd.getpwnam(value).pw_uid if kind == "user" else grp.getgrnam(value).gr_gid
    except KeyError:
        return None
    except ValueError:  # an embedded NUL, or a name the C library cannot take: no such account
        return None


def group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def group_members(group: int | str) -> list[str]:
    """The users listed as members of ``group`` (its supplementary members)."""
    try:
        entry = grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)
    except (KeyError, ValueError):
        return []
    return list(entry.gr_mem)


def set_group(path: Path, group: int | str, key: str, shown: Path | None = None) -> None:
    """Hand a socket to ``group`` (e.g. QEMU's), so that group may connect; errors
    name ``shown`` (the path a socket bound under a temporary name will have)."""
    shown = shown or path
    gid = resolve_id(group, "group")
    if gid is None:
        raise HvcproxydError(f"{key}: there is no group {group!r} on this host, so {shown} cannot be handed to it")
    try:
        os.chown(path, -1, gid)
    except OSError as err:
        raise HvcproxydError(
            f"{key}: cannot give {shown} to group {group!r} ({gid}): {err.strerror}; the daemon must be a member "
            f"of that group (in the unit: SupplementaryGroups={group})") from err


#: SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups; not in Python's socket module.
SO_PEERGROUPS = getattr(stdsocket, "SO_PEERGROUPS", 59)


def peer_groups(sock: trio.socket.SocketType | stdsocket.socket) -> frozenset[int]:
    """The peer's primary and supplementary groups (SO_PEERCRED + SO_PEERGROUPS)."""
    _pid, _uid, gid = peer_credentials(sock)
    try:
        raw = sock.getsockopt(stdsocket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
    except OSError:
        return frozenset({gid})
    return frozenset({gid, *struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])})


def local_peer_problem(sock: trio.socket.SocketType | stdsocket.socket, group: int | str | None) -> str | None:
    """None if the peer is root, the daemon's own user, or (with ``group``) a member
    of it: who may read an operations socket; else why not."""
    _pid, uid, _gid = peer_credentials(sock)
    if uid in (0, os.getuid()):
        return None
    if group is not None:
        gid = resolve_id(group, "group")
        if gid is not None and gid in peer_groups(sock):
            return None
        return f"uid {uid} is neither root, nor uid {os.getuid()}, nor in group {group!r}"
    return f"uid {uid} is neither root nor uid {os.getuid()}"


def peer_credentials(sock: trio.socket.SocketType | stdsocket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


#: Pending connections the kernel queues per listener (net.core.somaxconn caps it).
LISTEN_BACKLOG = 128


class UnixListener:
    """``async with UnixListener(path, 0o600) as listener:`` binds, listens, and
    on exit unlinks the path if it is still ours.

    The socket is bound under a temporary name beside ``path``, given its mode and
    group, and renamed into place: a client never finds the path with the wrong
    permissions, and a stale socket from an earlier run is replaced atomically
    (a regular file at ``path`` is never touched)."""

    def __init__(self, path: Path, mode: int, group: int | str | None = None, key: str = "socket",
                 group_key: str | None = None) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.key = key
        self.group_key = group_key or key
        self._sock: trio.socket.SocketType | None = None
        self._inode = -1

    async def __aenter__(self) -> trio.SocketListener:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise HvcproxydError(f"{self.key}: cannot listen on {self.path}: it exists and is not a socket; "
                                     "remove it or choose another path")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            with suppress(FileNotFoundError):
                tmp.unlink()
            await sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            if self.group is not None:
                set_group(tmp, self.group, self.group_key, self.path)
            sock.listen(LISTEN_BACKLOG)
            os.rename(tmp, self.path)
        except OSError as err:
            sock.close()
            with suppress(OSError):
                tmp.unlink()
            raise HvcproxydError(f"{self.key}: cannot listen on {self.path}: {err.strerror}") from err
        except BaseException:
            sock.close()
            with suppress(OSError):
                tmp.unlink()
            raise
        self._sock = sock
        self._inode = os.lstat(self.path).st_ino
        return trio.SocketListener(sock)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:  # not a successor's socket
                self.path.unlink()
        if self._sock is not None:
            self._sock.close()


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """File descriptors passed with SCM_RIGHTS in a recvmsg()'s ancillary data."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == stdsocket.SOL_SOCKET and kind == stdsocket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


def fds_ancdata(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data for sendmsg() that passes ``fds`` with SCM_RIGHTS."""
    return [(stdsocket.SOL_SOCKET, stdsocket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


__all__ = ["LISTEN_BACKLOG", "UnixListener", "fds_ancdata", "fds_from_ancdata", "group_members", "group_name",
           "local_peer_problem", "peer_credentials", "peer_groups", "resolve_id", "set_group"]
