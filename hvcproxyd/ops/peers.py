"""Who may connect as the VMM: SO_PEERCRED against ``vmm.uid``/``vmm.gid``."""

from __future__ import annotations

from ..config.settings import VmmAuth
from ..unixsock import resolve_id


def vmm_peer_problem(auth: VmmAuth, uid: int, gid: int) -> str | None:
    """None if a peer with ``uid``/``gid`` may act as the VMM, else why not.

    With ``vmm.uid`` the peer must be one of those users, and ``vmm.gid`` only
    hands the socket file to QEMU's group so that it can open it; without
    ``vmm.uid``, the peer's primary gid must be ``vmm.gid`` (weaker: any member
    of the group can arrange that)."""
    if not auth.uids and auth.gid is None:
        return None
    wanted = []
    checks: list[tuple[int | str, str, int]] = [(value, "user", uid) for value in auth.uids]
    if not checks and auth.gid is not None:
        checks.append((auth.gid, "group", gid))
    for value, kind, have in checks:
        want = resolve_id(value, kind)
        if want == have:
            return None
        key = "vmm.uid" if kind == "user" else "vmm.gid"
        if want is None:
            wanted.append(f"{key} {value!r} (no such {kind})")
        elif isinstance(value, str):
            wanted.append(f"{key} {value!r} ({want})")
        else:
            wanted.append(f"{key} {value}")
    return f"uid {uid} gid {gid} matches neither " + " nor ".join(wanted)


__all__ = ["vmm_peer_problem"]
