"""The session's scheduling: a flooding vCPU cannot hold back another, replies
stay in order per vCPU, and calls answered in the reader still go through
replay and the handler timeout as before.  Assertions are on the order of
replies, never on wall-clock time."""

from __future__ import annotations

from collections.abc import Callable

import trio

from hvcproxyd import wire
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.server.session import VCPU_QUEUE

from .conftest import Serve

HELLO_FN, SLEEP_FN = 0x82000001, 0x82000003
CONFIG = """\
vm: sched
handler_timeout_ms: 5000
handlers:
  hello: {type: static, options: {regs: [0, 1]}}
  sleep: {type: "tests.plugins:Sleeper"}
rules:
  - {match: 0x82000001, action: hello}
  - {match: 0x82000003, action: sleep}
"""


class RawVmm:
    """A VMM that writes frames exactly as the test says (several in one write)."""

    def __init__(self, sock: trio.socket.SocketType, conn: wire.Connection) -> None:
        self.sock, self.conn = sock, conn

    @classmethod
    async def connect(cls, config: VmConfig, n_vcpus: int = 4) -> RawVmm:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(str(config.socket))
        vmm = cls(sock, wire.Connection(wire.Role.VMM))
        vcpus = tuple(wire.VcpuInfo(i, i, True) for i in range(n_vcpus))
        await vmm.write(wire.Hello("sched", wire.Accel.TCG, 40, vcpus, (wire.RamRegion(0x4000_0000, 1 << 24),)))
        assert isinstance(await vmm.read(), wire.Welcome)
        await vmm.write(wire.FilterStatus(0))
        return vmm

    async def write(self, *events: wire.Event) -> None:
        await self.sock.send(b"".join(self.conn.send(e) for e in events))

    async def read(self) -> wire.Event:
        with trio.fail_after(10):
            while (event := self.conn.next_event()) is wire.NEED_DATA:
                self.conn.receive_data(await self.sock.recv(1 << 16))
        return event  # type: ignore[return-value]

    async def replies(self, n: int) -> list[wire.Reply]:
        out = []
        for _ in range(n):
            event = await self.read()
            assert isinstance(event, wire.Reply)
            out.append(event)
        return out

    def close(self) -> None:
        self.sock.close()


def calls(first_seq: int, vcpu: int, n: int, fn: int = HELLO_FN) -> list[wire.Call]:
    return [wire.Call(first_seq + i, vcpu, fn, (0,) * wire.N_ARGS) for i in range(n)]


async def test_a_flooding_vcpu_cannot_hold_back_another(make_config: Callable[[str], VmConfig],
                                                        serve: Serve) -> None:
    """vCPU 0 has been served 20 times; then one write carries its full queue
    and, behind it, one call each from vCPUs 1 and 2.  Those two are answered
    before any of vCPU 0's, and vCPU 0's replies keep their order."""
    config = make_config(CONFIG)
    await serve(config)
    vmm = await RawVmm.connect(config)
    try:
        for c in calls(1, 0, 20):
            await vmm.write(c)
            assert [r.seq for r in await vmm.replies(1)] == [c.seq]
        flood = calls(100, 0, VCPU_QUEUE)
        quiet = [*calls(200, 1, 1), *calls(300, 2, 1)]
        await vmm.write(*flood, *quiet)
        order = [r.seq for r in await vmm.replies(len(flood) + len(quiet))]
    finally:
        vmm.close()
    assert sorted(order[:2]) == [200, 300]
    assert order[2:] == [c.seq for c in flood]


async def test_vcpus_share_a_batch_round_robin(make_config: Callable[[str], VmConfig], serve: Serve) -> None:
    """Two vCPUs, each with its whole queue in one write, one after the other:
    the replies alternate instead of draining the first vCPU's queue first."""
    config = make_config(CONFIG)
    await serve(config)
    vmm = await RawVmm.connect(config)
    try:
        a, b = calls(1, 0, VCPU_QUEUE), calls(101, 1, VCPU_QUEUE)
        await vmm.write(*a, *b)
        order = [r.vcpu for r in await vmm.replies(2 * VCPU_QUEUE)]
    finally:
        vmm.close()
    assert order == [0, 1] * VCPU_QUEUE


async def test_a_vcpu_waiting_on_its_worker_keeps_its_order(make_config: Callable[[str], VmConfig],
                                                           serve: Serve) -> None:
    """A handler that waits runs in the vCPU's worker; that vCPU's next call,
    although its handler never waits, is answered after it, while another
    vCPU's call is answered at once."""
    config = make_config(CONFIG)
    await serve(config)
    vmm = await RawVmm.connect(config)
    try:
        slow = wire.Call(1, 0, SLEEP_FN, (1, *(0,) * (wire.N_ARGS - 1)))  # x1 = 1: sleeps 1 ms (Sleeper)
        await vmm.write(slow, *calls(2, 0, 1), *calls(3, 1, 1))
        order = [r.seq for r in await vmm.replies(3)]
    finally:
        vmm.close()
    assert order == [3, 1, 2]


class _SlowSocket:
    """A transport whose kernel buffer takes ``room`` bytes, then nothing until
    the writer task waits for room."""

    def __init__(self, room: int) -> None:
        self.room, self.written = room, bytearray()

    def send_nowait(self, data: bytes | memoryview) -> int:
        n = min(self.room, len(data))
        self.room -= n
        self.written += data[:n]
        return n

    async def send(self, data: bytes) -> None:
        await trio.sleep(0)
        self.written += data


async def test_frames_the_socket_cannot_take_yet_go_out_in_order_through_the_writer(
        make_config: Callable[[str], VmConfig]) -> None:
    from hvcproxyd.core.service import VmService
    from hvcproxyd.server.session import LinkStats, Session

    sock = _SlowSocket(room=10)
    session = Session(VmService(make_config(CONFIG)), sock, links=LinkStats())  # type: ignore[arg-type]
    frames = [bytes([i]) * 7 for i in range(6)]
    async with trio.open_nursery() as nursery:
        await nursery.start(session._writer)
        for frame in frames[:3]:
            session._out.append(frame)
            session._flush()  # the first 10 bytes go at once, the rest waits for the writer
        assert bytes(sock.written) == b"".join(frames)[:10]
        for frame in frames[3:]:
            session._out.append(frame)
            session._flush()  # queued behind what is blocked, never written ahead of it
        await session.flush()
        nursery.cancel_scope.cancel()
    assert bytes(sock.written) == b"".join(frames)
