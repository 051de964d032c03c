"""The VM's state document and its transfer over the wire (protocol v2): what a
live migration, savevm/loadvm and an offline export carry.

Two daemons stand for a migration's source and destination, and the VMM
simulator does what QEMU's forwarder does: STATE_SAVE on the source when the
VM stops, STATE_DATA to the destination before its vCPUs run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvcproxyd.core import state
from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.handlers.pkvm_memshare import MEM_SHARE_ID, MEM_UNSHARE_ID
from hvcproxyd.vmm.simulator import RAM_BASE, DaemonRefused, Simulator, SimVcpu

from .conftest import Serve

CPU_ON64, AFFINITY_INFO64 = 0xC400_0003, 0xC400_0004
ON, OFF, ALREADY_ON = 0, 1, (1 << 64) - 4
INVALID = (1 << 64) - 3
PAGE = RAM_BASE + 0x20_0000


def vm_yaml(sock: Path, *, psci_version: str = "1.3", extra: str = "") -> str:
    return f"""
        vm: mig
        socket: {sock}
        versions: {{psci: "{psci_version}"}}
        handlers:
          psci: {{type: psci}}
          ms: {{type: pkvm-memshare, options: {{stream: false}}}}
        {extra}
        rules:
          - {{match: psci, action: psci}}
          - {{match: kvm-vendor, action: ms}}
        """


@pytest.fixture
def two_vms(write_config: Callable[..., Path], tmp_path: Path) -> Callable[..., tuple[VmConfig, VmConfig]]:
    """The source's config and a destination's, each on its own socket."""
    def make(dest_version: str = "1.3") -> tuple[VmConfig, VmConfig]:
        src = load_config(write_config(vm_yaml(tmp_path / "src.sock"), "src.yaml"))
        dst = load_config(write_config(vm_yaml(tmp_path / "dst.sock", psci_version=dest_version), "dst.yaml"))
        return src, dst
    return make


async def run_source(config: VmConfig) -> tuple[bytes, Simulator]:
    """Boot the source: vCPUs 1 and 2 on, two pages shared; then save its state."""
    sim = Simulator(config.socket, n_vcpus=4, name="mig")
    saved: list[bytes] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        for target in (1, 2):
            assert (await cpu.call(CPU_ON64, target, RAM_BASE + 0x1000, 0))[0] == 0
        assert (await cpu.call(MEM_SHARE_ID, PAGE))[0] == 0
        assert (await cpu.call(MEM_SHARE_ID, PAGE + 0x1000))[0] == 0
        saved.append(await sim.save_state())

    sim.boot = boot
    await sim.run(timeout=30)
    return saved[0], sim


async def test_a_migrated_vm_sees_the_same_machine(two_vms: Callable[..., tuple[VmConfig, VmConfig]],
                                                   serve: Serve) -> None:
    src, dst = two_vms()
    await serve(src)
    destination = await serve(dst)
    document, source_sim = await run_source(src)
    assert source_sim.migration_blocker == ""  # nothing here lives outside the daemon
    doc = state.decode(document)
    assert doc["vm"] == "mig" and doc["version"] == state.VERSION
    assert doc["handlers"]["psci"]["power"] == {"0": "ON", "1": "ON", "2": "ON", "3": "OFF"}

    seen: dict[str, object] = {}
    sim = Simulator(dst.socket, n_vcpus=4, name="mig")  # a fresh QEMU: its HELLO has only vCPU 0 on

    async def resumed(cpu: SimVcpu, x0: int) -> None:
        await sim.load_state(document)
        seen["affinity"] = [(await cpu.call(AFFINITY_INFO64, v, 0))[0] for v in range(4)]
        seen["cpu_on_running"] = (await cpu.call(CPU_ON64, 1, RAM_BASE, 0))[0]
        seen["reshare"] = (await cpu.call(MEM_SHARE_ID, PAGE))[0]
        seen["unshare"] = (await cpu.call(MEM_UNSHARE_ID, PAGE + 0x1000))[0]

    sim.boot = resumed
    await sim.run(timeout=30)
    assert seen == {"affinity": [ON, ON, ON, OFF], "cpu_on_running": ALREADY_ON, "reshare": INVALID,
                    "unshare": 0}
    assert destination.vm.instances["ms"].report()["shared_bytes"] == 0x1000  # type: ignore[index]


async def test_a_destination_that_pins_another_version_refuses_and_keeps_its_state(
        two_vms: Callable[..., tuple[VmConfig, VmConfig]], serve: Serve) -> None:
    src, dst = two_vms(dest_version="1.1")
    await serve(src)
    destination = await serve(dst)
    document, _sim = await run_source(src)
    sim = Simulator(dst.socket, n_vcpus=4, name="mig")
    refused: list[str] = []

    async def resumed(cpu: SimVcpu, x0: int) -> None:
        try:
            await sim.load_state(document)
        except DaemonRefused as err:
            refused.append(str(err))
        refused.append(str((await cpu.call(AFFINITY_INFO64, 1, 0))[0]))

    sim.boot = resumed
    await sim.run(timeout=30)
    assert "handler 'psci': version is '1.3' in the state, '1.1' here" in refused[0], refused
    assert refused[1] == str(OFF)  # the destination's own state, untouched
    assert destination.vm.instances["psci"].snapshot()["power"]["1"] == "OFF"


@pytest.mark.parametrize(("document", "match"), [
    (b"not json", "not a state document"),
    (json.dumps({"format": state.FORMAT, "version": state.VERSION + 1}).encode(), "newer than this hvcproxyd"),
    (b"", "over the protocol"),  # what the daemon makes of a load past MAX_STATE
])
async def test_malformed_documents_are_refused_by_name(document: bytes, match: str,
                                                       two_vms: Callable[..., tuple[VmConfig, VmConfig]],
                                                       serve: Serve) -> None:
    src, _dst = two_vms()
    await serve(src)
    sim = Simulator(src.socket, n_vcpus=1, name="mig")
    refused: list[str] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        with pytest.raises(DaemonRefused) as info:
            await sim.load_state(document)
        refused.append(str(info.value))
        assert (await cpu.call(0x8400_0000))[0] == 0x1_0003  # still serving: PSCI 1.3

    sim.boot = boot
    await sim.run(timeout=30)
    assert match in refused[0], refused


async def test_a_handler_that_refuses_its_part_leaves_every_handler_as_it_was(
        two_vms: Callable[..., tuple[VmConfig, VmConfig]], serve: Serve) -> None:
    src, dst = two_vms()
    await serve(src)
    destination = await serve(dst)
    document, _sim = await run_source(src)
    doc = state.decode(document)
    doc["handlers"]["ms"]["ledger"]["ranges"] = [[PAGE + 1, 4096]]  # psci restores first, then ms refuses
    before = {name: inst.snapshot() for name, inst in destination.vm.instances.items()}
    with pytest.raises(state.StateError, match="handler 'ms' refused its state"):
        destination.vm.load_state(doc)
    assert {name: inst.snapshot() for name, inst in destination.vm.instances.items()} == before


async def test_the_blocker_follows_the_config_and_refuses_a_save(write_config: Callable[..., Path],
                                                                 tmp_path: Path, serve: Serve) -> None:
    def yaml(reason: str | None) -> str:
        options = f', options: {{reason: "{reason}"}}' if reason else ""
        return vm_yaml(tmp_path / "vm.sock", extra=f'  held: {{type: "tests.plugins:Blocking"{options}}}')
    path = write_config(yaml("held: its sessions live in a backend"))
    daemon = await serve(load_config(path))
    sim = Simulator(daemon.config.socket, n_vcpus=1, name="mig")
    seen: list[object] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        await cpu.call(0x8400_0000)  # the blocker came before this reply
        seen.append(sim.migration_blocker)
        with pytest.raises(DaemonRefused, match="held: its sessions live in a backend"):
            await sim.save_state()
        write_config(yaml(None))
        assert await daemon.reload()
        await cpu.call(0x8400_0000)
        seen.append(sim.migration_blocker)
        seen.append(state.decode(await sim.save_state())["vm"])

    sim.boot = boot
    await sim.run(timeout=30)
    assert seen == ["held: its sessions live in a backend", "", "mig"]


def test_abi_differences_name_each_key() -> None:
    have = {"filter": [[0x8400_0000, 0x8400_001F, 2]], "handlers": {"psci": {"type": "psci", "version": "1.3"}}}
    want = {"filter": [[0x8400_0000, 0x8400_001F, 2]],
            "handlers": {"psci": {"type": "psci", "version": "1.1"}, "ms": {"type": "pkvm-memshare"}}}
    assert state.abi_differences(have, have) == []
    assert state.abi_differences(have, want) == [
        "handler 'ms' is in this VM's config but not in the state",
        "handler 'psci': version is '1.3' in the state, '1.1' here"]
    moved = {**want, "filter": [[0x8600_0000, 0x8600_FFFF, 2]]}
    assert state.abi_differences(have, moved)[0].startswith(
        "forwarded ranges differ: the state has 0x84000000-0x8400001f forward, this VM forwards 0x86000000")


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=4), c, max_size=4)
                     | st.dictionaries(st.integers(), c, max_size=4),  # json.dumps cannot sort mixed keys
                     max_leaves=30)


@given(_JSON)
def test_encode_gives_json_dumps_bytes_a_piece_at_a_time(value: object) -> None:
    """The chunked encoder (so a thread encoding millions of ranges lets the loop
    run) writes exactly what json.dumps(sort_keys, compact) writes."""
    doc = {"v": value, "long": list(range(2 * state._CHUNK + 3)), "nested": {"rows": [[1, 2]] * (state._CHUNK + 1)}}
    assert state.encode(doc) == json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
