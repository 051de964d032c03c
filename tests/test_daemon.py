"""End to end: the daemon and the VMM simulator over a real UNIX socket."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hvcproxyd import wire
from hvcproxyd.core.service import VmService
from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.smccc import MASK64, SmcccResult
from hvcproxyd.vmm.simulator import RAM_BASE, DaemonRefused, Simulator, SimVcpu

from .conftest import Serve
from .process import DaemonProcess
from .waiting import wait_until

NOT_SUPPORTED = SmcccResult.NOT_SUPPORTED & MASK64
INVALID = SmcccResult.INVALID_PARAMETER & MASK64
HELLO, COUNT, SLEEP, RAISE, MEM, DENIED, UNRULED = (0x82000001, 0x82000002, 0x82000003, 0x82000004,
                                                   0x82000005, 0x82000006, 0x82000007)
CONFIG = """\
vm: e2e
handler_timeout_ms: {timeout}
handlers:
  hello: {{type: static, options: {{regs: [0, {hello}]}}}}
  count: {{type: "tests.plugins:Counter"}}
  sleep: {{type: "tests.plugins:Sleeper"}}
  raise: {{type: "tests.plugins:Raiser"}}
  mem: {{type: "tests.plugins:MemoryProbe"}}
rules:
  - {{match: 0x82000001, action: hello}}
  - {{match: 0x82000002, action: count}}
  - {{match: 0x82000003, action: sleep}}
  - {{match: 0x82000004, action: raise}}
  - {{match: 0x82000005, action: mem}}
  - {{match: 0x82000006, conduit: smc, action: deny}}
  - {{match: 0x82000006, conduit: hvc, action: hello}}
"""


def config_text(timeout: int = 2000, hello: int = 1) -> str:
    return CONFIG.format(timeout=timeout, hello=hello)


async def run_sim(config: VmConfig, boot: Callable[[SimVcpu, int], Awaitable[None]], **kw: Any) -> Simulator:
    sim = Simulator(config.socket, boot=boot, **kw)
    try:
        await sim.run(timeout=30)
    finally:
        sim.close()
    return sim


async def test_four_vcpus_call_concurrently(make_config: Callable[[str], VmConfig], serve: Serve) -> None:
    config = make_config(config_text())
    await serve(config)
    results: dict[int, list[tuple[int, ...]]] = {}

    async def worker(cpu: SimVcpu, x0: int) -> None:
        results[cpu.index] = [await cpu.call(HELLO, cpu.index, i) for i in range(25)]

    async def boot(cpu: SimVcpu, x0: int) -> None:
        async with trio.open_nursery() as n:
            for v in cpu.sim.vcpus[1:]:
                v.powered_on = True
                n.start_soon(worker, v, 0)
            await worker(cpu, 0)

    sim = await run_sim(config, boot)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(regs == [(0, 1, 0, 0)] * 25 for regs in results.values())
    calls = sim.entries("call")
    assert len(calls) == 100
    # The calls really interleaved: some vCPU answered between two calls of another.
    order = [e.vcpu for e in calls]
    assert any(order[i] != order[i + 1] for i in range(len(order) - 1))


async def test_conduit_specific_rules_and_unmatched_calls(make_config: Callable[[str], VmConfig],
                                                          serve: Serve) -> None:
    config = make_config(config_text())
    await serve(config)
    got: list[int] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        got.append((await cpu.call(DENIED, smc=False))[1])  # hvc -> hello
        got.append((await cpu.call(DENIED, smc=True))[0])  # smc -> deny, answered by the daemon
        got.append((await cpu.call(UNRULED))[0])  # no rule; not in the filter: the VMM answers
        got.append((await cpu.call(HELLO | (1 << 16)))[1])  # the SVE hint bit does not change routing

    sim = await run_sim(config, boot)
    assert got == [1, NOT_SUPPORTED, NOT_SUPPORTED, 1]
    assert [e.data["func"] for e in sim.entries("local")] == [UNRULED]


async def test_a_handler_that_raises(make_config: Callable[[str], VmConfig], serve: Serve,
                                     caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(config_text())
    daemon = await serve(config)
    got: list[tuple[int, ...]] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        got.append(await cpu.call(RAISE))
        got.append(await cpu.call(HELLO))

    await run_sim(config, boot)
    assert got == [(NOT_SUPPORTED, 0, 0, 0), (0, 1, 0, 0)]
    assert daemon.vm.stats.failures["raise", "exception"] == 1
    assert "deliberate failure in a test handler" in caplog.text  # the traceback is logged


async def test_a_slow_handler_times_out_while_other_vcpus_are_served(
        make_config: Callable[[str], VmConfig], serve: Serve, autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(config_text(timeout=400))
    daemon = await serve(config)
    done: list[str] = []

    async def fast(cpu: SimVcpu, x0: int) -> None:
        for _ in range(20):
            assert (await cpu.call(HELLO))[1] == 1
        done.append(f"fast{cpu.index}")

    async def slow(cpu: SimVcpu, x0: int) -> None:
        regs = await cpu.call(SLEEP, 60_000)  # far past the 400 ms limit
        done.append(f"slow:{regs[0]:#x}")

    async def boot(cpu: SimVcpu, x0: int) -> None:
        async with trio.open_nursery() as n:
            for v in cpu.sim.vcpus[1:]:
                v.powered_on = True
                n.start_soon(fast, v, 0)
            await slow(cpu, 0)

    await run_sim(config, boot)
    assert done[-1] == f"slow:{NOT_SUPPORTED:#x}"
    assert sorted(done[:-1]) == ["fast1", "fast2", "fast3"]
    assert daemon.vm.stats.failures["sleep", "timeout"] == 1


@pytest.mark.parametrize(("by_fd", "sealed"), [(True, True), (False, True), (True, False)],
                         ids=["memfd", "mem-frames", "unsealed-memfd"])
async def test_guest_memory_access(make_config: Callable[[str], VmConfig], serve: Serve, by_fd: bool,
                                   sealed: bool, caplog: pytest.LogCaptureFixture) -> None:
    """RAM by a sealed memfd is mapped; by frames, or by a memfd the VMM could shrink
    under us (SIGBUS), it is reached through MEM_READ/MEM_WRITE, with the same answers."""
    config = make_config(config_text())
    daemon = await serve(config)
    mapped: list[bool] = []
    got: list[tuple[int, ...]] = []
    size = 0x18000  # larger than one MEM_READ frame

    async def boot(cpu: SimVcpu, x0: int) -> None:
        memory = daemon.vm.ctx.memory
        mapped.append(memory is not None and memory.mapped)
        cpu.sim.ram[0x100:0x108] = b"hvcproxy"
        got.append(await cpu.call(MEM, RAM_BASE + 0x100, 8, 0))
        got.append(await cpu.call(MEM, RAM_BASE + 0x2000, size, 1, 0xA5))
        got.append(await cpu.call(MEM, RAM_BASE + 0x2000, size, 0))
        got.append(await cpu.call(MEM, RAM_BASE - 8, 16, 0))  # straddles the start of RAM
        got.append(await cpu.call(MEM, RAM_BASE + cpu.sim.ram_size - 4, 8, 1, 1))  # runs off the end
        got.append(await cpu.call(MEM, (1 << 40) - 4, 8, 0))  # beyond the IPA size

    sim = await run_sim(config, boot, pass_memfd=by_fd, seal_memfd=sealed)
    assert mapped == [by_fd and sealed]
    assert ("not sealed against shrinking" in caplog.text) == (by_fd and not sealed)
    assert got[0][:2] == (0, int.from_bytes(b"hvcproxy", "little"))
    assert got[1][0] == 0
    assert got[2][1] == int.from_bytes(b"\xa5" * 8, "little")
    assert [g[0] for g in got[3:]] == [INVALID] * 3
    assert sim.stop_reason == "idle"


async def test_reconnect_replays_the_call_in_flight(write_config: Callable[[str], Path], tmp_path: Path,
                                                    serve: Serve, autojump_clock: trio.testing.MockClock) -> None:
    path = write_config(config_text(timeout=5000))
    config = load_config(path, socket=str(tmp_path / "vm.sock"))
    got: list[tuple[int, ...]] = []
    first_call_answered = trio.Event()

    async def boot(cpu: SimVcpu, x0: int) -> None:
        got.append(await cpu.call(COUNT))
        first_call_answered.set()
        got.append(await cpu.call(SLEEP, 700))  # the daemon dies while this one runs
        got.append(await cpu.call(COUNT))

    sim = Simulator(config.socket, boot=boot)
    first = await serve(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sim.run, 30)
        await first_call_answered.wait()
        def in_handler() -> bool:
            return first.session is not None and first.session.in_flight == 1
        await wait_until(in_handler, "the SLEEP call to be in the first daemon's handler")
        await serve.stop(first)  # like a crash: the call in flight is never answered
        second = await serve(load_config(path, socket=str(config.socket)))
    sim.close()
    assert got == [(0, 1, 0, 0), (0, 0, 0, 0), (0, 1, 0, 0)]  # the new daemon's counter starts afresh
    assert [e.kind for e in sim.transcript].count("reconnect") == 1
    assert second.vm.stats.by_handler()["sleep"] == 1


async def test_reconnect_with_a_different_filter_is_refused(make_config: Callable[[str], VmConfig],
                                                            serve: Serve) -> None:
    config = make_config(config_text())
    await serve(config)
    sim = Simulator(config.socket)
    sim.ranges = (wire.FilterRange(0x8200_0001, 2, wire.FilterAction.FORWARD),)
    try:
        with pytest.raises(DaemonRefused, match=r"FILTER_MISMATCH.*entry 0"):
            await sim.connect(reconnect=True)
    finally:
        sim.close()


async def test_replayed_call_is_answered_without_running_the_handler_again(
        make_config: Callable[[str], VmConfig]) -> None:
    service = VmService(make_config(config_text()))
    call = wire.Call(41, 0, COUNT, (0,) * 17)
    first = await service.dispatch(call)
    again = await service.dispatch(call)
    assert first == again and first.regs[1] == 1
    assert (await service.dispatch(wire.Call(42, 0, COUNT, (0,) * 17))).regs[1] == 2
    assert service.stats.replays == 1


async def test_protocol_error_gets_an_error_frame_and_the_daemon_stays_up(
        make_config: Callable[[str], VmConfig], serve: Serve) -> None:
    config = make_config(config_text())
    daemon = await serve(config)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(config.socket))
    await sock.send(wire.HEADER.pack(20, 99, 0, 0) + b"\0\0\0\0")
    data = await sock.recv(4096)
    conn = wire.Connection(wire.Role.VMM)
    conn.receive_data(data)
    err = conn.next_event()
    assert isinstance(err, wire.Error) and err.code is wire.ErrorCode.PROTOCOL
    assert "unknown message type 99" in err.reason
    assert await sock.recv(4096) == b""  # and closed
    sock.close()
    assert daemon.links.protocol_errors == 1

    async def boot(cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(HELLO))[1] == 1

    await run_sim(config, boot)  # the next VMM is served


async def test_second_vmm_is_refused_while_one_is_connected(make_config: Callable[[str], VmConfig],
                                                            serve: Serve) -> None:
    config = make_config(config_text())
    await serve(config)
    refused: list[str] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        other = Simulator(config.socket, reconnect_timeout=0)
        try:
            await other.connect()
        except DaemonRefused as err:
            refused.append(str(err))
        finally:
            other.close()

    await run_sim(config, boot)
    assert refused and "BUSY" in refused[0]


async def test_filter_rejected_by_the_vmm_is_logged_and_closed(make_config: Callable[[str], VmConfig],
                                                               serve: Serve,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(config_text())
    await serve(config)
    sim = Simulator(config.socket, filter_status=-17)
    try:
        with pytest.raises(DaemonRefused, match="FILTER_REJECTED"):
            await sim.connect()
    finally:
        sim.close()
    assert "EEXIST" in caplog.text


# ------------------------------------------------------------ the real process


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[Callable[[Path], DaemonProcess]]:
    """``hvcproxyd run CONFIG --socket tmp/vm.sock``, listening; stopped at the end."""
    started: list[DaemonProcess] = []

    def start(config: Path) -> DaemonProcess:
        daemon = DaemonProcess(config, socket=tmp_path / "vm.sock").start()
        started.append(daemon)
        daemon.wait_listening()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


async def test_sigterm_drains_calls_in_flight_and_exits_0(write_config: Callable[[str], Path],
                                                          daemon_process: Callable[[Path], DaemonProcess]) -> None:
    daemon = daemon_process(write_config(config_text(timeout=5000)))
    assert daemon.socket is not None
    got: list[tuple[int, ...]] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        async with trio.open_nursery() as n:
            async def slow() -> None:
                got.append(await cpu.call(SLEEP, 500))
            n.start_soon(slow)
            # SIGTERM only once the call is in the handler.
            await wait_until(lambda: "vcpu 0 sleeps 500 ms" in daemon.log, "the SLEEP call to reach its handler",
                             log=daemon.log_path)
            daemon.signal(signal.SIGTERM)

    sim = Simulator(daemon.socket, boot=boot, reconnect_timeout=0.5)
    try:
        await sim.run(timeout=20)
    finally:
        sim.close()
    assert got == [(0, 0, 0, 0)]  # the call in flight was answered, not dropped
    assert await trio.to_thread.run_sync(daemon.wait) == 0
    log = daemon.log
    assert "draining 1 call(s)" in log and not daemon.socket.exists()


async def test_sighup_applies_a_good_config_and_keeps_the_running_one_on_a_bad_one(
        write_config: Callable[[str], Path], daemon_process: Callable[[Path], DaemonProcess]) -> None:
    path = write_config(config_text(hello=1))
    daemon = daemon_process(path)
    assert daemon.socket is not None
    seen: list[int] = []

    def reloads(outcome: str) -> int:
        return daemon.log.count(outcome)

    async def reload(outcome: str, count: int, what: str) -> None:
        daemon.signal(signal.SIGHUP)
        await wait_until(lambda: reloads(outcome) == count, what, log=daemon.log_path)

    applied, refused = ": reloaded ", "reload refused, keeping the running config"

    async def boot(cpu: SimVcpu, x0: int) -> None:
        seen.append((await cpu.call(HELLO))[1])
        assert (await cpu.call(COUNT))[1] == 1
        path.write_text(config_text(hello=2))
        await reload(applied, 1, "the good config to be applied")
        seen.append((await cpu.call(HELLO))[1])
        assert (await cpu.call(COUNT))[1] == 2  # handler state carried across the reload
        path.write_text(config_text(hello=3).replace("rules:", "rules: [oops"))
        await reload(refused, 1, "the broken config to be refused")
        path.write_text(config_text(hello=4).replace("0x82000006, conduit: smc", "0x82000008, conduit: smc"))
        await reload(refused, 2, "the incompatible config to be refused")
        seen.append((await cpu.call(HELLO))[1])

    sim = Simulator(daemon.socket, boot=boot)
    try:
        await sim.run(timeout=60)
    finally:
        sim.close()
    daemon.signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(daemon.wait) == 0
    assert seen == [1, 2, 2]
    log = daemon.log
    assert "reload refused, keeping the running config" in log and "vm.yaml:" in log
    assert "changes the forwarded/denied ranges" in log


async def test_protocol_error_while_running_closes_only_that_connection(
        make_config: Callable[[str], VmConfig], serve: Serve) -> None:
    config = make_config(config_text())
    daemon = await serve(config)
    sim = Simulator(config.socket)
    try:
        await sim.connect()
        await sim.send(wire.Call(1, 99, HELLO, (0,) * 17))  # the VM has 4 vCPUs
        with trio.fail_after(10):
            err = await sim.next_event()
    finally:
        sim.close()
    assert isinstance(err, wire.Error) and err.code is wire.ErrorCode.PROTOCOL and "vCPU 99" in err.reason
    assert daemon.links.protocol_errors == 1

    async def boot(cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(HELLO))[1] == 1

    await run_sim(config, boot)  # the daemon still serves the next VMM
