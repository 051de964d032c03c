"""Partitions in other processes and VM-to-VM direct requests.

The external partition is a real server on a real UNIX socket in this test's
trio run (the protocol of hvcproxyd.handlers.ffa.peerwire), not a mock; the
two-VM tests run two daemons and two simulated VMMs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.ffa import peerwire
from hvcproxyd.vmm.simulator import Simulator, SimVcpu

from .conftest import Serve
from .ffa_support import (
    BIND,
    BITMAP_CREATE,
    DENIED,
    DIRECT_REQ32,
    DIRECT_REQ64,
    DIRECT_RESP32,
    ECHO_UUID,
    FEATURES,
    MSG_SEND2,
    NOTIF_GET,
    NOTIF_SET,
    SUCCESS32,
    VERSION,
    VM_ID,
    Desc,
    Guest,
    err,
    fid32,
    make_guest,
    share,
)

REMOTE = 0x8005
ABORTED = -8
MSG_WAIT = fid32(0x6B)
RETRY = -7


async def listen(path: Path, answer: peerwire.Serve, nursery: trio.Nursery, delay: float = 0) -> list[dict[str, Any]]:
    """An external partition: answers each request with ``answer`` after ``delay``."""
    seen: list[dict[str, Any]] = []
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(4)
    listener = trio.SocketListener(sock)

    async def answered(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        await trio.sleep(delay)
        return await answer(req)

    async def loop() -> None:
        while True:
            stream = await listener.accept()
            nursery.start_soon(peerwire.serve_connection, stream, answered, 5.0)

    nursery.start_soon(loop)
    return seen


def remote_guest(make_config: Callable[[str], VmConfig], tmp_path: Path, timeout_ms: int = 300) -> Guest:
    return make_guest(make_config, tmp_path, partitions=f"""
          remote: {{type: socket, id: {REMOTE:#x}, uuids: ["{ECHO_UUID}"],
                    options: {{path: {tmp_path / 'p.sock'}, timeout_ms: {timeout_ms}}}}}""")


async def test_external_partition(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    async def answer(req: dict[str, Any]) -> dict[str, Any]:
        if req["op"] == "direct":
            return {"status": 0, "regs": [a + 1 for a in req["args"]]}
        return {"status": 0 if req["op"] == "indirect" else DENIED}

    g = remote_guest(make_config, tmp_path)
    async with trio.open_nursery() as nursery:
        seen = await listen(tmp_path / "p.sock", answer, nursery)
        await g.ready(0x10001)
        regs = await g.call(DIRECT_REQ32, VM_ID << 16 | REMOTE, 0, 1, 2, 3, 4, 5)
        assert regs == (DIRECT_RESP32, REMOTE << 16 | VM_ID, 0, 2, 3, 4, 5, 6)
        assert seen[0] == {"op": "direct", "sender": VM_ID, "receiver": REMOTE, "wide": False, "args": [1, 2, 3, 4, 5]}
        g.write(g.handler.endpoint.mailbox.tx, b"\0" * 8 + (20).to_bytes(4, "little") +
                (VM_ID << 16 | REMOTE).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc")
        assert (await g.call(MSG_SEND2))[0] & 0xFFFF == 0x61
        assert seen[1]["payload"] == b"abc".hex()
        assert (await g.call(NOTIF_SET, VM_ID << 16 | REMOTE, 0, 6))[:3] == err(DENIED)  # the remote refused
        # The remote process cannot reach guest memory: nothing may be shared with it.
        assert (await share(g, Desc(receivers=[(REMOTE, 2)])))[:3] == err(DENIED)
        nursery.cancel_scope.cancel()


async def test_external_partition_failures(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    g = remote_guest(make_config, tmp_path, timeout_ms=100)
    await g.ready(0x10001)
    assert (await g.call(DIRECT_REQ32, VM_ID << 16 | REMOTE))[:3] == err(ABORTED)  # nobody listens

    async def bad(req: dict[str, Any]) -> dict[str, Any]:
        return {"status": 0, "regs": [1 << 64]}

    async with trio.open_nursery() as nursery:
        await listen(tmp_path / "p.sock", bad, nursery)
        assert (await g.call(DIRECT_REQ32, VM_ID << 16 | REMOTE))[:3] == err(ABORTED)  # not a u64
        nursery.cancel_scope.cancel()
    (tmp_path / "p.sock").unlink()
    async with trio.open_nursery() as nursery:
        await listen(tmp_path / "p.sock", bad, nursery, delay=1.0)
        start = trio.current_time()
        assert (await g.call(DIRECT_REQ32, VM_ID << 16 | REMOTE))[:3] == err(ABORTED)  # too slow
        assert trio.current_time() - start < 0.5
        nursery.cancel_scope.cancel()
    assert g.handler.endpoint.partitions[REMOTE].plugin.failures == 3  # type: ignore[attr-defined]


async def test_served_requests_are_checked(tmp_path: Path) -> None:
    async def never(req: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("a malformed request reached the partition")

    async with trio.open_nursery() as nursery:
        await listen(tmp_path / "p.sock", never, nursery)
        for req in ({"op": "direct", "sender": 1, "receiver": 2, "wide": False, "args": [1]},
                    {"op": "run", "sender": 1, "receiver": 2},
                    {"op": "notify", "sender": 1 << 16, "receiver": 2, "bitmap": 1},
                    {"op": "indirect", "sender": 1, "receiver": 2, "payload": "zz"}):
            resp = await peerwire.exchange(str(tmp_path / "p.sock"), req, 2)
            assert resp["status"] == -2, req
        stream = await trio.open_unix_socket(str(tmp_path / "p.sock"))
        await stream.send_all((1 << 20).to_bytes(4, "little"))  # an oversized frame
        resp = await peerwire.receive(stream)
        assert resp["status"] == -2
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------- two VMs

def vm_config(name: str, vid: int, tmp_path: Path, extra: str = "", partitions: str = "{}") -> str:
    return f"""
vm: {name}
handlers:
  ffa:
    type: ffa
    options:
      id: {vid}
      state_dir: {tmp_path / 'state'}
      {extra}
      partitions: {partitions}
rules:
  - match: ffa
    action: ffa
"""


async def serve_pair(write_config: Callable[..., Path], tmp_path: Path, serve: Serve, vm2_peers: str,
                     vm2_property: str) -> tuple[VmConfig, VmConfig]:
    """Serve VM2 (ID 2, accepting ``vm2_peers`` on its listen socket) and VM1 (ID 1),
    which has VM2 as a socket partition with ``vm2_property``; (VM1's, VM2's) config."""
    from hvcproxyd.core.vmconfig import load_config
    peer_sock = tmp_path / "vm2.ffa.sock"
    cfg2 = load_config(write_config(vm_config("vm2", 2, tmp_path, f"listen: {peer_sock}\n      peers: {vm2_peers}"),
                                    "vm2.yaml"), socket=str(tmp_path / "vm2.sock"))
    cfg1 = load_config(write_config(vm_config("vm1", 1, tmp_path, partitions=f"""
        vm2: {{type: socket, id: 2, uuids: ["{ECHO_UUID}"], properties: [{vm2_property}],
              options: {{path: {peer_sock}}}}}"""), "vm1.yaml"), socket=str(tmp_path / "vm1.sock"))
    await serve(cfg2)
    await serve(cfg1)
    return cfg1, cfg2


async def run_both(*sims: Simulator) -> None:
    try:
        async with trio.open_nursery() as nursery:
            for sim in sims:
                nursery.start_soon(sim.run, 30)
    finally:
        for sim in sims:
            sim.close()


async def two_vms(write_config: Callable[..., Path], tmp_path: Path, serve: Serve, vm2_peers: str,
                  vm2_answers: bool = True) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """VM1 (ID 1) sends VM2 (ID 2) a direct request; VM2's guest waits for it with
    MSG_WAIT and answers.  Returns what VM1 got and what VM2's guest was given."""
    cfg1, cfg2 = await serve_pair(write_config, tmp_path, serve, vm2_peers, "direct_req_recv")
    ready, finished = trio.Event(), trio.Event()
    got: list[tuple[int, ...]] = []
    given: list[tuple[int, ...]] = []

    async def vm2_guest(cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(VERSION, 0x10001))[0] == 0x10002
        ready.set()
        while vm2_answers and not finished.is_set():
            regs = await cpu.call(MSG_WAIT)
            if regs[:3] == err(RETRY):
                await trio.sleep(0.01)
                continue
            given.append(regs)
            await cpu.call(DIRECT_RESP32 if regs[0] == DIRECT_REQ32 else 0xC400_0070,
                           2 << 16 | regs[1] >> 16, 0, *(r * 2 for r in regs[3:8]))
        await finished.wait()

    async def vm1_guest(cpu: SimVcpu, x0: int) -> None:
        await ready.wait()
        assert (await cpu.call(VERSION, 0x10001))[0] == 0x10002
        got.append(await cpu.call(DIRECT_REQ32, 1 << 16 | 2, 0, 1, 2, 3, 4, 5))
        finished.set()

    await run_both(Simulator(cfg2.socket, n_vcpus=1, name="vm2", boot=vm2_guest),
                   Simulator(cfg1.socket, n_vcpus=1, name="vm1", boot=vm1_guest))
    return got[0], given


async def test_a_peer_vm_notification_raises_the_npi(write_config: Callable[..., Path], tmp_path: Path,
                                                     serve: Serve) -> None:
    """VM1's guest sets a notification for VM2, which VM2's guest bound to VM1:
    VM2's daemon gets it from its peers socket, outside any of VM2's calls, and
    interrupts VM2's vCPU 0 with the NPI; GET (VM senders) returns the bit."""
    cfg1, cfg2 = await serve_pair(write_config, tmp_path, serve, "[1]", "notifications")
    bound, finished = trio.Event(), trio.Event()
    seen: dict[str, object] = {}
    vm2 = Simulator(cfg2.socket, n_vcpus=2, name="vm2")

    async def vm2_guest(cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(VERSION, 0x10002))[0] == 0x10002
        assert (await cpu.call(BITMAP_CREATE, 2, 2))[0] == SUCCESS32
        assert (await cpu.call(BIND, 1 << 16 | 2, 0, 1 << 9, 0))[0] == SUCCESS32
        bound.set()
        await finished.wait()
        seen["irqs"] = cpu.pending_irqs
        seen["bits"] = (await cpu.call(NOTIF_GET, 2, 0x2))[4]  # w4: VM senders' bits

    async def vm1_guest(cpu: SimVcpu, x0: int) -> None:
        await bound.wait()
        assert (await cpu.call(VERSION, 0x10002))[0] == 0x10002
        seen["set"] = (await cpu.call(NOTIF_SET, 1 << 16 | 2, 0, 1 << 9, 0))[0]
        with trio.fail_after(10):
            while not vm2.entries("interrupt"):
                await trio.sleep(0.01)
        finished.set()

    vm2.boot = vm2_guest
    await run_both(vm2, Simulator(cfg1.socket, n_vcpus=1, name="vm1", boot=vm1_guest))
    assert seen == {"set": SUCCESS32, "irqs": 1 << 8, "bits": 1 << 9}, seen
    assert [(e.vcpu, e.data["intid"]) for e in vm2.entries("interrupt")] == [(0, 8)]


async def test_vm_to_vm_with_a_pair_policy(write_config: Callable[..., Path], tmp_path: Path,
                                           serve: Serve) -> None:
    got, given = await two_vms(write_config, tmp_path, serve, "[1]")
    assert given == [(DIRECT_REQ32, 1 << 16 | 2, 0, 1, 2, 3, 4, 5)]
    assert got == (DIRECT_RESP32, 2 << 16 | 1, 0, 2, 4, 6, 8, 10)


async def test_vm_to_vm_refused_without_policy(write_config: Callable[..., Path], tmp_path: Path,
                                               serve: Serve) -> None:
    got, given = await two_vms(write_config, tmp_path, serve, "[3]")  # VM2 accepts only VM 3
    assert got[:3] == err(DENIED) and given == []


async def test_vm_to_vm_unanswered_times_out(write_config: Callable[..., Path], tmp_path: Path,
                                             serve: Serve) -> None:
    got, given = await two_vms(write_config, tmp_path, serve, "[1]", vm2_answers=False)
    assert got[:3] == err(ABORTED) and given == []


async def test_peer_calls_are_offered_only_with_peers(make_config: Callable[[str], VmConfig],
                                                      tmp_path: Path) -> None:
    g = make_guest(make_config, tmp_path, f"listen: {tmp_path / 'l.sock'}\n      peers: [2]")
    await g.ready(0x10001)
    assert (await g.call(FEATURES, MSG_WAIT))[0] == 0x8400_0061
    assert (await g.call(MSG_WAIT))[:3] == err(RETRY)
    assert (await g.call(DIRECT_RESP32, VM_ID << 16 | 2))[:3] == err(DENIED)  # nothing held
    assert (await g.call(DIRECT_REQ64, VM_ID << 16 | 2))[:3] == err(-2)  # a peer is not a partition here
