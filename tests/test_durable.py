"""Durable state without sockets: the record format, the journal and its
compaction, fsync policies, restarts that replay, and the state directory
checks at start."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from hvcproxyd.core import state
from hvcproxyd.core.guestmem import GuestMemory
from hvcproxyd.core.service import VmService
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.durable import records
from hvcproxyd.durable.store import SNAPSHOT, DurableError, Fsync, Journal, load, prepare
from hvcproxyd.server.daemon import Daemon
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator
from hvcproxyd.wire import N_ARGS, Accel, Call, Hello, RamRegion, Reply, VcpuInfo

from .conftest import Serve

RAM, RAM_SIZE = 0x4000_0000, 1 << 20
SHARE, UNSHARE = 0xC6000003, 0xC6000004
CPU_ON, PSCI_VERSION, AFFINITY_INFO = 0xC4000003, 0x84000000, 0xC4000004
INVALID = (1 << 64) - 3
ALREADY_ON = (1 << 64) - 4


def config_text(tmp_path: Path, fsync: str = "batch") -> str:
    return "\n".join([
        "vm: d", f"state: {{dir: {tmp_path / 'state'}, fsync: {fsync}}}", "versions: {psci: '1.1'}",
        "handlers:", "  psci: {type: psci}", "  ms:", "    type: pkvm-memshare", "    options:",
        f"      socket: {tmp_path / 'ms.sock'}",
        "rules:", "  - {match: psci, action: psci}", "  - {match: kvm-vendor, action: ms}", ""])


class Vm:
    """A VM service with its journal, attached as a VMM would attach it."""

    def __init__(self, config: VmConfig, *, compact_bytes: int = 1 << 20) -> None:
        assert config.state is not None
        self.svc = VmService(config)
        self.path = config.state.dir / config.name
        self.journal = Journal(self.path, self.svc, Fsync(config.state.fsync), compact_bytes=compact_bytes)
        self.journal.open()
        self.seq = itertools.count(1)

    def attach(self, reconnect: bool) -> None:
        vcpus = tuple(VcpuInfo(i, i, i == 0) for i in range(4))
        hello = Hello("d", Accel.TCG, 40, vcpus, (RamRegion(RAM, RAM_SIZE),), 0, reconnect)
        self.svc.attach(hello, GuestMemory((RamRegion(RAM, RAM_SIZE),), 40))

    async def call(self, fid: int, *args: int, vcpu: int = 0, seq: int | None = None) -> tuple[int, ...]:
        padded = tuple(args) + (0,) * (N_ARGS - len(args))
        reply = await self.svc.dispatch(Call(next(self.seq) if seq is None else seq, vcpu, fid, padded, 0))
        await self.journal.settle()
        return reply.regs

    def crash(self) -> None:
        """kill -9: the file stays as written, nothing is compacted."""
        os.close(self.journal._fd)
        self.svc.sink = None


@pytest.fixture
def vm_config(make_config: Callable[[str], VmConfig], tmp_path: Path) -> Callable[..., VmConfig]:
    return lambda fsync="batch": make_config(config_text(tmp_path, fsync))


def ledger_of(svc: VmService) -> list[list[int]]:
    """The ledger's [ipa, size] ranges, as JSON has them (the snapshot holds tuples)."""
    return [list(r) for r in svc.snapshot()["ms"]["ledger"]["ranges"]]


# ----------------------------------------------------------------- the record format

def sample() -> tuple[bytes, list[dict[str, Any]]]:
    recs = [{"h": {"ms": {"d": [["s", 4096 * i, 4096, 0]]}}, "v": 0, "q": i} for i in range(3)]
    return records.MAGIC + b"".join(records.frame(r) for r in recs), recs


def test_records_round_trip() -> None:
    data, recs = sample()
    found = records.scan(data)
    assert found.records == recs and found.end == len(data) and found.problem is None


def test_a_torn_last_record_is_dropped_at_every_offset() -> None:
    data, recs = sample()
    last = records.frame(recs[-1])
    start = len(data) - len(last)
    for cut in range(start, len(data)):
        found = records.scan(data[:cut])
        assert found.records == recs[:-1], cut
        assert found.end == start
        assert (found.problem is None) == (cut == start), cut


def test_a_corrupt_checksum_keeps_what_came_before() -> None:
    data, recs = sample()
    second = len(records.MAGIC) + len(records.frame(recs[0]))
    damaged = bytearray(data)
    damaged[second + 12] ^= 0x20  # a payload byte of the second record
    found = records.scan(bytes(damaged))
    assert found.records == recs[:1]
    assert found.problem is not None and "checksum" in found.problem


def test_not_a_journal() -> None:
    assert records.scan(b"something else").problem == "not a journal (bad header)"
    assert records.scan(records.MAGIC[:3]).records == []


# ----------------------------------------------------------------- journal and restart

async def test_restart_restores_ledger_power_and_replay(vm_config: Callable[..., VmConfig]) -> None:
    a = Vm(vm_config())
    a.attach(reconnect=False)
    assert (await a.call(SHARE, RAM))[0] == 0
    assert (await a.call(SHARE, RAM + 4096, vcpu=1, seq=50))[0] == 0
    assert (await a.call(CPU_ON, 2, 0x4008_0000, 0, vcpu=0, seq=60))[0] == 0
    a.crash()

    b = Vm(vm_config())
    assert ledger_of(b.svc) == [[RAM, 8192]]
    assert b.svc.snapshot()["psci"]["power"]["2"] == "ON_PENDING"
    b.attach(reconnect=True)
    # The re-sent CALL gets the recorded reply and is not run again (it would be INVALID now).
    assert (await b.call(SHARE, RAM + 4096, vcpu=1, seq=50))[0] == 0
    assert b.svc.stats.replays == 1
    assert ledger_of(b.svc) == [[RAM, 8192]]
    # The guest's UNSHARE of the page it really shared is answered as before the restart.
    assert (await b.call(UNSHARE, RAM, seq=61))[0] == 0
    # An older seq is still a protocol error.
    with pytest.raises(Exception, match="older than its last"):
        await b.call(SHARE, RAM, vcpu=1, seq=49)


async def test_a_fresh_vm_starts_fresh(vm_config: Callable[..., VmConfig]) -> None:
    a = Vm(vm_config())
    a.attach(reconnect=False)
    await a.call(SHARE, RAM, vcpu=1, seq=7)
    a.attach(reconnect=False)  # a new VM process on the same daemon
    a.crash()
    b = Vm(vm_config())
    assert ledger_of(b.svc) == []
    b.attach(reconnect=False)
    assert (await b.call(SHARE, RAM, vcpu=1, seq=7))[0] == 0  # run, not replayed
    assert b.svc.stats.replays == 0


async def test_calls_that_change_nothing_write_nothing(vm_config: Callable[..., VmConfig]) -> None:
    a = Vm(vm_config())
    a.attach(reconnect=False)
    before = a.journal.records
    await a.call(PSCI_VERSION)
    await a.call(AFFINITY_INFO, 0, 0)
    assert (await a.call(UNSHARE, RAM))[0] == INVALID  # refused: nothing changed
    assert a.journal.records == before
    await a.call(SHARE, RAM)
    assert a.journal.records == before + 1


async def test_compaction_keeps_everything(vm_config: Callable[..., VmConfig]) -> None:
    a = Vm(vm_config(), compact_bytes=2000)
    a.attach(reconnect=False)
    for i in range(60):
        await a.call(SHARE, RAM + 8192 * i, vcpu=i % 4)
        if a.journal._compact.is_set():
            a.journal._compact = trio.Event()
            await a.journal.compact()
    assert a.journal.compactions >= 2
    assert sorted(p.name for p in a.path.iterdir()) == [f"journal.{a.journal.gen}", SNAPSHOT]
    expected = ledger_of(a.svc)
    last = a.svc._last_reply[2]
    a.crash()
    b = Vm(vm_config())
    assert ledger_of(b.svc) == expected and len(expected) == 60
    assert b.svc._last_reply[2] == last


async def test_a_crash_mid_compaction_loads_both_journals(vm_config: Callable[..., VmConfig]) -> None:
    a = Vm(vm_config())
    a.attach(reconnect=False)
    await a.call(SHARE, RAM)
    a.journal._start_journal(a.journal.gen + 1)  # the compaction's first step, then the crash
    a.journal.gen += 1
    await a.call(SHARE, RAM + 4096)
    a.crash()
    b = Vm(vm_config())
    assert ledger_of(b.svc) == [[RAM, 8192]]


async def test_a_torn_tail_on_disk_is_dropped_with_a_log_line(vm_config: Callable[..., VmConfig],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    a = Vm(vm_config())
    a.attach(reconnect=False)
    await a.call(SHARE, RAM)
    await a.call(SHARE, RAM + 8192)
    a.crash()
    jpath = a.path / f"journal.{a.journal.gen}"
    data = jpath.read_bytes()
    jpath.write_bytes(data[:-3])
    with caplog.at_level(logging.WARNING, "hvcproxyd.durable"):
        b = Vm(vm_config())
    assert ledger_of(b.svc) == [[RAM, 4096]]
    assert "is cut short" in caplog.text and "2 record(s) before it are kept" in caplog.text


async def test_sigterm_close_compacts(vm_config: Callable[..., VmConfig]) -> None:
    a = Vm(vm_config())
    a.attach(reconnect=False)
    await a.call(SHARE, RAM)
    a.journal.close()
    assert [p.name for p in a.path.iterdir()] == [SNAPSHOT]
    assert ledger_of(Vm(vm_config()).svc) == [[RAM, 4096]]


@pytest.mark.parametrize("policy", ["always", "batch", "never"])
async def test_fsync_policies(vm_config: Callable[..., VmConfig], policy: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        synced.append(fd)
        real(fd)
    monkeypatch.setattr(os, "fsync", counted)
    a = Vm(vm_config(policy))
    a.attach(reconnect=False)
    synced.clear()
    # Four vCPUs' calls finish together: batch makes them share one fsync.
    for v in range(4):
        await a.svc.dispatch(Call(100 + v, v, SHARE, (RAM + 4096 * v,) + (0,) * (N_ARGS - 1), 0))
    assert a.journal.pending() == (policy == "batch")
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(a.journal.settle)
    assert not a.journal.pending()
    assert len(synced) == {"always": 4, "batch": 1, "never": 0}[policy]


async def test_batch_replies_wait_for_their_fsync(vm_config: Callable[..., VmConfig],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    a = Vm(vm_config())
    a.attach(reconnect=False)
    gate = trio.Event()
    token = trio.lowlevel.current_trio_token()
    monkeypatch.setattr(os, "fsync", lambda fd: trio.from_thread.run(gate.wait, trio_token=token))
    await a.svc.dispatch(Call(1, 0, SHARE, (RAM,) + (0,) * (N_ARGS - 1), 0))
    settled = False

    async def settle() -> None:
        nonlocal settled
        await a.journal.settle()
        settled = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(settle)
        await trio.testing.wait_all_tasks_blocked()
        assert not settled and a.journal.pending()
        gate.set()
    assert settled and not a.journal.pending()


# ----------------------------------------------------------------- the state directory at start

def test_missing_directory_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DurableError, match="cannot be created"):
        prepare(tmp_path / "file" / "vm")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a read-only directory anyway")
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(DurableError, match="cannot be written"):
            prepare(ro)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_read_only_or_full_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(fd: int, data: bytes) -> int:
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "write", refuse)
    with pytest.raises(DurableError, match=f"cannot be written: {os.strerror(code)}"):
        prepare(tmp_path / "vm")


def test_a_state_of_another_machine_is_refused(vm_config: Callable[..., VmConfig], tmp_path: Path,
                                               make_config: Callable[[str], VmConfig]) -> None:
    Vm(vm_config()).journal.close()
    other = make_config(config_text(tmp_path).replace("psci: '1.1'", "psci: '1.0'"))
    with pytest.raises(DurableError, match=r"cannot be restored.*version"):
        Vm(other)


def test_a_damaged_snapshot_is_refused(vm_config: Callable[..., VmConfig], tmp_path: Path) -> None:
    a = Vm(vm_config())
    a.journal.close()
    (a.path / SNAPSHOT).write_text("{not json")
    with pytest.raises(DurableError, match="not a state document"):
        Vm(vm_config())
    shutil.rmtree(a.path)
    assert load(a.path.parent).doc is None  # an empty directory is simply a fresh VM


def test_snapshot_is_a_state_document(vm_config: Callable[..., VmConfig]) -> None:
    a = Vm(vm_config())
    a.journal.close()
    doc = state.decode((a.path / SNAPSHOT).read_bytes())
    assert set(doc["handlers"]) == {"psci", "ms"} and "replay" in doc
    assert json.loads((a.path / SNAPSHOT).read_bytes())["journal_gen"] == a.journal.gen + 1


# ----------------------------------------------------------------- through the daemon

async def test_a_resent_call_after_a_restart_gets_the_recorded_reply(
        vm_config: Callable[..., VmConfig], serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    config = vm_config()
    first = await serve(Daemon(config))
    sim = Simulator(config.socket, n_vcpus=2, reconnect_timeout=0)
    try:
        await sim.connect()
        share = Call(5, 1, SHARE, (RAM_BASE,) + (0,) * (N_ARGS - 1), 0)
        await sim.send(share)
        with trio.fail_after(10):
            reply = await sim.next_event()
        assert isinstance(reply, Reply) and reply.regs[0] == 0
        journal = first.journal
        assert journal is not None
        monkeypatch.setattr(journal, "close", lambda: os.close(journal._fd))  # a crash: no final compaction
        await serve.stop(first)
    finally:
        sim.close()
    second = await serve(Daemon(config))
    again = Simulator(config.socket, n_vcpus=2, reconnect_timeout=0)
    try:
        again.ranges = sim.ranges
        await again.connect(reconnect=True)
        await again.send(share)  # QEMU re-sends what it was waiting for, same seq
        with trio.fail_after(10):
            replayed = await again.next_event()
        assert replayed == reply
        assert second.vm.stats.replays == 1
        assert ledger_of(second.vm) == [[RAM_BASE, 4096]]  # run once, not twice (twice would be INVALID)
    finally:
        again.close()


async def test_a_failed_write_stops_rather_than_answers(vm_config: Callable[..., VmConfig],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    a = Vm(vm_config())
    a.attach(reconnect=False)
    stopped: list[BaseException] = []
    a.journal.on_failure = stopped.append

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DurableError, match="No space left on device"):
        await a.call(SHARE, RAM)
    assert len(stopped) == 1
    with pytest.raises(DurableError, match="failed earlier"):
        await a.call(SHARE, RAM + 4096)
    assert a.journal.report()["records"] == 1  # the fresh boot's only


async def test_the_daemon_compacts_while_it_serves(vm_config: Callable[..., VmConfig], serve: Serve) -> None:
    config = vm_config()
    daemon = Daemon(config)
    journal = daemon.journal
    assert journal is not None
    journal.compact_bytes = 600
    await serve(daemon)
    sim = Simulator(config.socket, n_vcpus=2, reconnect_timeout=0)
    try:
        await sim.connect()
        for i in range(40):
            await sim.send(Call(i + 1, i % 2, SHARE, (RAM_BASE + 0x2000 * i,) + (0,) * (N_ARGS - 1), 0))
            with trio.fail_after(10):
                reply = await sim.next_event()
            assert isinstance(reply, Reply) and reply.regs[0] == 0 and reply.seq == i + 1
    finally:
        sim.close()
    assert journal.compactions >= 3
    expected = ledger_of(daemon.vm)
    await serve.stop(daemon)
    assert ledger_of(Vm(config).svc) == expected and len(expected) == 40


async def test_a_compaction_amid_fsyncs_in_flight_keeps_every_record(
        vm_config: Callable[..., VmConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    a = Vm(vm_config())
    a.attach(reconnect=False)
    gate = trio.Event()
    token = trio.lowlevel.current_trio_token()
    real = os.fsync
    synced: list[tuple[str, int]] = []

    def held(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            trio.from_thread.run(gate.wait, trio_token=token)
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, os.fstat(fd).st_size))  # EBADF if closed
        real(fd)
    monkeypatch.setattr(os, "fsync", held)
    old = a.path / f"journal.{a.journal.gen}"
    await a.svc.dispatch(Call(1, 0, SHARE, (RAM,) + (0,) * (N_ARGS - 1), 0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.journal.settle)  # its fsync covers the first record only
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(a.journal.compact)
        await trio.testing.wait_all_tasks_blocked()
        await a.svc.dispatch(Call(2, 1, SHARE, (RAM + 4096,) + (0,) * (N_ARGS - 1), 0))
        size = old.stat().st_size
        nursery.start_soon(a.journal.settle)  # a reply waiting for the second record
        await trio.testing.wait_all_tasks_blocked()
        assert a.journal.compactions == 0
        gate.set()
    assert a.journal.compactions == 1 and a.journal.failed is None and not a.journal.pending()
    assert (old.name, size) in synced  # the second record was made durable where it was written
    a.crash()
    assert ledger_of(Vm(vm_config()).svc) == [[RAM, 8192]]
