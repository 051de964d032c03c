"""pkvm-memshare end to end: the daemon, the VMM simulator over its UNIX socket,
four vCPUs sharing and unsharing at once, one live subscriber and one that never
reads until the guest is done."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.pkvm_memshare import MEM_SHARE_ID, MEM_UNSHARE_ID
from hvcproxyd.handlers.pkvm_memshare.ledger import Replica
from hvcproxyd.sidecars.memshare import MemshareSidecar
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu

from .conftest import Serve
from .waiting import wait_until

N_VCPUS = 4
# Enough changes to overflow the stalled subscriber's socket (net.core.wmem_default, ~208 KiB on
# Debian) and then its queue: about 2.5x what that takes here.
CALLS_PER_VCPU = 600
POOL = 48  # pages all vCPUs contend for, so shares collide and get refused too
QUEUE = 32
INVALID = (1 << 64) - 3


async def follow(stream: trio.SocketStream, replica: Replica) -> None:
    """Apply every record the stream sends, until cancelled."""
    buf = b""
    while data := await stream.receive_some(1 << 16):
        *lines, buf = (buf + data).split(b"\n")
        for line in lines:
            replica.apply(json.loads(line))


async def test_concurrent_guest_with_live_and_stalled_subscribers(
        make_config: Callable[[str], VmConfig], tmp_path: Path, serve: Serve) -> None:
    stream_path = tmp_path / "ms.sock"
    config = make_config(f"""
        vm: e2e
        handlers:
          ms:
            type: pkvm-memshare
            options:
              socket: {stream_path}
              subscriber_queue: {QUEUE}
        rules:
          - match: kvm-vendor
            action: ms
        """)
    daemon = await serve(config)
    results: list[tuple[int, int, int]] = []  # (vcpu, fid, x0) as the guest saw them

    async def worker(cpu: SimVcpu) -> None:
        rng = random.Random(cpu.index)
        for _ in range(CALLS_PER_VCPU):
            fid = rng.choice((MEM_SHARE_ID, MEM_UNSHARE_ID))
            x0 = (await cpu.call(fid, RAM_BASE + rng.randrange(POOL) * 4096))[0]
            assert x0 in (0, INVALID)
            results.append((cpu.index, fid, x0))

    async def boot(cpu: SimVcpu, x0: int) -> None:
        async with trio.open_nursery() as nursery:
            for vcpu in sim.vcpus:
                nursery.start_soon(worker, vcpu)

    async with trio.open_nursery() as nursery:
        side = daemon.vm.sidecars["ms"][0]
        assert isinstance(side, MemshareSidecar) and side.stream is not None
        # The stalled subscriber: a plain socket nobody reads until the guest is done.
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.connect(str(stream_path))
        live_stream = await trio.open_unix_socket(str(stream_path))
        await trio.testing.wait_all_tasks_blocked()
        assert len(side.stream.subscribers) == 2
        live = Replica()
        nursery.start_soon(follow, live_stream, live)

        sim = Simulator(config.socket, n_vcpus=N_VCPUS, name="e2e", boot=boot)
        for vcpu in sim.vcpus:
            vcpu.powered_on = True  # all four run from the start
        try:
            assert await sim.run(timeout=120) == "idle"
        finally:
            sim.close()
        ledger = daemon.vm.instances["ms"].ledger  # type: ignore[attr-defined]

        # Every call came back while the stalled subscriber had not read a byte.
        assert len(results) == N_VCPUS * CALLS_PER_VCPU
        shares_ok = sum(1 for _, fid, x0 in results if fid == MEM_SHARE_ID and x0 == 0)
        unshares_ok = sum(1 for _, fid, x0 in results if fid == MEM_UNSHARE_ID and x0 == 0)
        refused = sum(1 for *_, x0 in results if x0 == INVALID)
        assert (ledger.counters.shares, ledger.counters.unshares, ledger.counters.refused) == (
            shares_ok, unshares_ok, refused)
        assert shares_ok and unshares_ok and refused  # the run exercised all three outcomes
        assert ledger.shared_bytes == (shares_ok - unshares_ok) * 4096

        # The live subscriber kept up with every change and rebuilt the ledger exactly.
        await wait_until(lambda: live.seq == ledger.seq, "the live subscriber to catch up")
        assert live.shared == ledger.shared
        assert live.lost == 0 and live.snapshots == 1 and live.changes == ledger.seq

        # The stalled one was held to its queue, told what it lost, and resynced.
        stalled_sub = next(s for s in side.stream.subscribers if s.lost or s.resync)
        assert len(stalled_sub.queue) <= QUEUE
        stalled_stream = trio.SocketStream(trio.socket.from_stdlib_socket(stalled))
        late = Replica()
        nursery.start_soon(follow, stalled_stream, late)
        await wait_until(lambda: late.seq == ledger.seq and late.snapshots >= 2, "the stalled subscriber to resync")
        assert late.lost > 0 and late.lost == side.stream.stats.lost
        assert late.changes + late.lost == ledger.seq  # every change either seen or counted as lost
        assert late.shared == ledger.shared
        daemon.stop()
        nursery.cancel_scope.cancel()


async def test_guest_is_served_when_the_stream_cannot_listen(
        make_config: Callable[[str], VmConfig], tmp_path: Path, serve: Serve,
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    config = make_config(f"""
        vm: e2e
        handlers:
          ms:
            type: pkvm-memshare
            options: {{socket: {tmp_path / "file" / "ms.sock"}}}
        rules:
          - {{match: kvm-vendor, action: ms}}
        """)
    daemon = await serve(config)
    answers: list[int] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        answers.append((await cpu.call(MEM_SHARE_ID, RAM_BASE))[0])

    sim = Simulator(config.socket, n_vcpus=1, name="e2e", boot=boot)
    try:
        await sim.run(timeout=60)
    finally:
        sim.close()
    await serve.stop(daemon)
    assert answers == [0]
    assert any("no memshare subscribers" in r.getMessage() for r in caplog.records)
