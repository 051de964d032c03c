"""Who may use which socket: the VMM's uid allow-list and group warning, and the
credential check every operations socket (control, metrics, event stream) shares."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from hvcproxyd.config.settings import VmmAuth
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.ops.peers import vmm_peer_problem
from hvcproxyd.unixsock import local_peer_problem

NOBODY = 65534
HEAD = "vm: p\nhandlers:\n  d: {type: deny}\nrules:\n  - {match: 0x82000001, action: d}\n"


def test_vmm_uid_takes_a_list(make_config: Callable[[str], VmConfig]) -> None:
    config = make_config(HEAD + "vmm: {uid: [nobody, 0]}\n")
    assert config.vmm.uids == ("nobody", 0)
    assert vmm_peer_problem(config.vmm, 0, 1234) is None
    assert vmm_peer_problem(config.vmm, NOBODY, NOBODY) is None
    why = vmm_peer_problem(config.vmm, 1000, 1000)
    assert why is not None and "vmm.uid 'nobody' (65534)" in why and "vmm.uid 0" in why
    assert vmm_peer_problem(VmmAuth(), 1000, 1000) is None  # no policy: the socket's mode decides


def test_a_broad_vmm_group_is_warned_about(make_config: Callable[[str], VmConfig]) -> None:
    config = make_config(HEAD + "vmm: {gid: users}\n")
    (warning,) = [w for w in config.warnings if w.key == "vmm.gid"]
    assert "every member of it can arrange (sg users)" in warning.message and "prefer vmm.uid" in warning.message


def _peer_as(uid: int, name: str) -> tuple[socket.socket, int]:
    """An accepted connection from a forked child running as ``uid`` (an abstract
    socket: no file permission stands between them, only the credential check).
    The child holds the connection until the parent closes its end."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)
    server.listen(1)
    pid = os.fork()
    if pid == 0:  # the child: nothing but the connection, then gone
        try:
            server.close()
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect("\0" + name)
                s.recv(1)
        finally:
            os._exit(0)
    conn, _ = server.accept()
    server.close()
    return conn, pid


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a peer as another user")
def test_operations_sockets_admit_root_the_daemon_and_the_group_only(tmp_path: Path) -> None:
    conn, child = _peer_as(NOBODY, f"hvcproxyd-test-{os.getpid()}")
    try:
        why = local_peer_problem(conn, None)
        assert why == f"uid {NOBODY} is neither root nor uid 0"
        assert local_peer_problem(conn, "nogroup") is None  # nobody's own group
        refused = local_peer_problem(conn, "users")
        assert refused is not None and "nor in group 'users'" in refused
    finally:
        conn.close()
        os.waitpid(child, 0)


def test_the_daemons_own_user_is_admitted() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert local_peer_problem(a, None) is None


def test_with_vmm_uid_the_group_only_opens_the_file(make_config: Callable[[str], VmConfig]) -> None:
    config = make_config(HEAD + "vmm: {uid: nobody, gid: users}\n")
    assert not [w for w in config.warnings if w.key == "vmm.gid"]  # the group is not the check here
    assert vmm_peer_problem(config.vmm, 1000, 100) is not None  # in the group, not the user: refused
    assert vmm_peer_problem(config.vmm, NOBODY, NOBODY) is None
