"""The VMM socket's file descriptors and its single VMM slot (issue 15 A, B).

The daemon runs in this process, so its fd table is ours: a descriptor it
leaked shows in /proc/self/fd, and a pipe whose write end it leaked never
reads EOF."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable

import pytest
import trio

from hvcproxyd import wire
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.server.session import HANDSHAKE_TIMEOUT
from hvcproxyd.unixsock import fds_ancdata
from hvcproxyd.vmm.simulator import Simulator, SimVcpu

from .conftest import Serve
from .test_daemon import COUNT, HELLO, config_text, run_sim
from .waiting import wait_until


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def raw_socket(config: VmConfig) -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(config.socket))
    return sock


async def read_error(sock: trio.socket.SocketType) -> wire.Error:
    """The daemon's ERROR frame, then EOF."""
    conn = wire.Connection(wire.Role.VMM)
    with trio.fail_after(10):
        while (event := conn.next_event()) is wire.NEED_DATA:
            data = await sock.recv(4096)
            assert data, "the daemon closed without an ERROR frame"
            conn.receive_data(data)
        assert await sock.recv(4096) == b""  # and closed
    assert isinstance(event, wire.Error), event
    return event


def pipe_write_end_closed_everywhere(r: int) -> bool:
    """True once every copy of the pipe's write end is closed (reading gives EOF)."""
    try:
        return os.read(r, 1) == b""
    except BlockingIOError:
        return False


async def test_fds_with_a_call_after_the_handshake_are_closed_and_a_protocol_error(
        make_config: Callable[[str], VmConfig], serve: Serve) -> None:
    config = make_config(config_text())
    daemon = await serve(config)
    baseline = fd_count()
    sim = Simulator(config.socket)
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        await sim.connect()
        memfd = os.memfd_create("stray", 0)
        await sim.send(wire.Call(1, 0, HELLO, (0,) * 17), fds=[w, memfd])
        os.close(w)
        os.close(memfd)
        with trio.fail_after(10):
            err = await sim.next_event()
        assert isinstance(err, wire.Error) and err.code is wire.ErrorCode.PROTOCOL, err
        assert "file descriptor" in err.reason and "HELLO" in err.reason
        await wait_until(lambda: pipe_write_end_closed_everywhere(r), "the daemon to close the stray pipe end")
    finally:
        sim.close()
        os.close(r)
    await wait_until(lambda: fd_count() == baseline, f"the fd count back at {baseline} (now {fd_count()})")
    assert daemon.links.protocol_errors == 1
    assert daemon.session is None

    async def boot(cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(HELLO))[1] == 1

    await run_sim(config, boot)  # and the next VMM is served


async def test_fds_with_a_bad_first_frame_are_closed(make_config: Callable[[str], VmConfig], serve: Serve) -> None:
    config = make_config(config_text())
    daemon = await serve(config)
    baseline = fd_count()
    r, w = os.pipe()
    os.set_blocking(r, False)
    sock = await raw_socket(config)
    try:
        await sock.sendmsg([wire.HEADER.pack(20, 99, 0, 0) + b"\0\0\0\0"], fds_ancdata([w, w]))
        os.close(w)
        err = await read_error(sock)
        assert err.code is wire.ErrorCode.PROTOCOL and "unknown message type 99" in err.reason
        await wait_until(lambda: pipe_write_end_closed_everywhere(r), "the daemon to close the stray pipe ends")
    finally:
        sock.close()
        os.close(r)
    await wait_until(lambda: fd_count() == baseline, f"the fd count back at {baseline} (now {fd_count()})")
    assert daemon.links.protocol_errors == 1


async def test_fds_of_a_refused_hello_are_closed(make_config: Callable[[str], VmConfig], serve: Serve) -> None:
    config = make_config(config_text())
    await serve(config)
    sim = Simulator(config.socket)
    try:
        baseline = fd_count()
        hello = dataclasses.replace(sim.hello(False), min_version=0xFFF0, max_version=0xFFFF)
        sock = await raw_socket(config)
        try:
            await sock.sendmsg([wire.Connection(wire.Role.VMM).send(hello)], fds_ancdata([sim.ram_fd]))
            err = await read_error(sock)
        finally:
            sock.close()
        assert err.code is wire.ErrorCode.VERSION
        await wait_until(lambda: fd_count() == baseline, f"the fd count back at {baseline} (now {fd_count()})")
    finally:
        sim.close()


async def test_a_silent_connection_does_not_hold_the_vmm_slot(make_config: Callable[[str], VmConfig],
                                                              serve: Serve) -> None:
    config = make_config(config_text())
    daemon = await serve(config)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # connects and never says a word
    silent.connect(str(config.socket))  # a listening UNIX socket accepts into its backlog at once
    try:
        async def boot(cpu: SimVcpu, x0: int) -> None:
            assert daemon.session is not None and daemon.session.hello is not None
            assert (await cpu.call(HELLO))[1] == 1

        # Served at once: well inside the handshake timeout the silent peer is still under.
        with trio.fail_after(HANDSHAKE_TIMEOUT / 2):
            await run_sim(config, boot)
        with pytest.raises(BlockingIOError):  # neither answered nor closed: still in its handshake
            silent.recv(1, socket.MSG_DONTWAIT)
    finally:
        silent.close()
    assert daemon.links.accepted == 1


async def test_a_reconnect_right_after_a_clean_close_is_never_busy(make_config: Callable[[str], VmConfig],
                                                                   serve: Serve) -> None:
    config = make_config(config_text())
    daemon = await serve(config)
    for _ in range(20):
        sim = Simulator(config.socket, reconnect_timeout=0)  # BUSY would raise DaemonRefused
        try:
            await sim.connect()
            await sim.send(wire.Call(1, 0, HELLO, (0,) * 17))
            with trio.fail_after(10):
                reply = await sim.next_event()
            assert isinstance(reply, wire.Reply) and reply.regs[1] == 1
        finally:
            sim.close()  # clean close; the next connects at once
    assert daemon.links.accepted == 20


@pytest.mark.parametrize("fid", [HELLO, COUNT])  # answered inline in the reader; in the vCPU's worker
async def test_a_stale_sequence_number_is_refused_never_run_again(make_config: Callable[[str], VmConfig],
                                                                  serve: Serve, fid: int) -> None:
    """Protocol §5: seqs only increase.  The same seq again is a replay (the same
    answer, the handler not run); an older one is a protocol error, never a second run."""
    config = make_config(config_text())
    daemon = await serve(config)
    sim = Simulator(config.socket)
    try:
        await sim.connect()
        for seq in (5, 9, 9):  # 9 twice: the replay
            await sim.send(wire.Call(seq, 0, fid, (0,) * 17))
            with trio.fail_after(10):
                reply = await sim.next_event()
            assert isinstance(reply, wire.Reply) and reply.seq == seq, reply
        runs = daemon.vm.stats.total()
        await sim.send(wire.Call(5, 0, fid, (0,) * 17))  # seq 5 again, after 9
        with trio.fail_after(10):
            err = await sim.next_event()
        assert isinstance(err, wire.Error) and err.code is wire.ErrorCode.PROTOCOL, err
        assert "older than its last answered call (9)" in err.reason
        assert daemon.vm.stats.total() == runs and daemon.vm.stats.replays == 1
    finally:
        sim.close()
