"""``hvcproxyd memshare ls|watch`` against a running daemon."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from hvcproxyd import cli
from hvcproxyd.cli.memshare import format_record, size_text
from hvcproxyd.cli.registry import SUBCOMMANDS
from hvcproxyd.core.vmconfig import VmConfig
from hvcproxyd.handlers.pkvm_memshare import MEM_SHARE_ID, MEM_UNSHARE_ID
from hvcproxyd.handlers.pkvm_memshare.handler import default_socket
from hvcproxyd.sidecars.memshare import MemshareSidecar
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu

from .conftest import Serve
from .waiting import wait_until


def run_cli(argv: list[str]) -> int:
    """The registered ``memshare`` subcommand, parsed by the real parser (logging set-up left alone)."""
    args = cli.build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command][2](args)


def memshare_config(make_config: Callable[[str], VmConfig], path: Path) -> VmConfig:
    return make_config(f"""
        vm: clivm
        handlers:
          ms: {{type: pkvm-memshare, options: {{socket: {path}, subscriber_flush_ms: 0}}}}
        rules:
          - {{match: kvm-vendor, action: ms}}
        """)


async def guest(cpu: SimVcpu, x0: int) -> None:
    for page in (0, 1, 2, 7):
        assert (await cpu.call(MEM_SHARE_ID, RAM_BASE + page * 4096))[0] == 0
    assert (await cpu.call(MEM_UNSHARE_ID, RAM_BASE + 4096))[0] == 0


async def test_ls_and_watch(make_config: Callable[[str], VmConfig], tmp_path: Path, serve: Serve,
                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ms.sock"
    config = memshare_config(make_config, path)
    daemon = await serve(config)
    async with trio.open_nursery() as nursery:
        side = daemon.vm.sidecars["ms"][0]
        assert isinstance(side, MemshareSidecar) and side.stream is not None
        watch_status: list[int] = []

        async def watch() -> None:
            watch_status.append(await trio.to_thread.run_sync(
                run_cli, ["memshare", "watch", "--socket", str(path), "--json"]))

        nursery.start_soon(watch)
        stream = side.stream
        await wait_until(lambda: stream.subscribers, "`memshare watch` to subscribe")
        sim = Simulator(config.socket, n_vcpus=1, name="clivm", boot=guest)
        try:
            await sim.run(timeout=60)
        finally:
            sim.close()
        # By the config's path, as status and trace take it: the stream is the one its handler names.
        assert await trio.to_thread.run_sync(run_cli, ["memshare", "ls", str(config.path)]) == 0
        daemon.stop()  # closes the stream: watch ends
    assert watch_status == [0]
    out = capsys.readouterr().out.splitlines()
    # watch --json printed JSON lines; ls printed text.
    records = [json.loads(line) for line in out if line.startswith("{")]
    assert [r["type"] for r in records] == ["snapshot", "share", "share", "share", "share", "unshare"]
    assert records[-1]["shared"] == 3 * 4096
    ls_out = "\n".join(line for line in out if not line.startswith("{"))
    assert f"{RAM_BASE:#014x}..{RAM_BASE + 0xFFF:#014x}" in ls_out
    assert f"{RAM_BASE + 0x2000:#014x}..{RAM_BASE + 0x2FFF:#014x}" in ls_out
    assert f"{RAM_BASE + 0x7000:#014x}..{RAM_BASE + 0x7FFF:#014x}" in ls_out
    assert "3 range(s), 12 KiB shared (peak 16 KiB, 4 shares, 1 unshares, 0 refused" in ls_out


def test_no_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="cannot connect"):
        run_cli(["memshare", "ls", "--socket", str(tmp_path / "none.sock")])
    assert run_cli(["memshare", "watch"]) == 2
    assert "give a VM name or --socket" in capsys.readouterr().err
    assert default_socket("vm7") == Path("/run/hvcproxyd/vm7.memshare.sock")


def test_a_config_without_the_stream_says_so(make_config: Callable[[str], VmConfig], tmp_path: Path) -> None:
    psci_only = make_config("vm: p\nhandlers:\n  psci:\n    type: psci\nrules:\n  - match: psci\n    action: psci\n")
    with pytest.raises(SystemExit, match="has no pkvm-memshare handler"):
        run_cli(["memshare", "ls", str(psci_only.path)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("vm: [\n")
    with pytest.raises(SystemExit, match="has errors, cannot find its stream"):
        run_cli(["memshare", "watch", str(broken)])


def test_help_lists_both_actions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(["memshare", "--help"])
    out = capsys.readouterr().out
    assert "watch" in out and "ls" in out


def test_formatting() -> None:
    assert [size_text(n) for n in (512, 4096, 6144, 1 << 20, 3 << 30)] == [
        "512 B", "4 KiB", "6 KiB", "1 MiB", "3 GiB"]
    assert size_text(5000) == "4.88 KiB"
    assert format_record({"type": "lost", "count": 7}) == [
        "-- this reader fell behind and lost 7 change(s); a fresh snapshot follows"]
    (line,) = format_record({"type": "share", "seq": 3, "time": 0.0, "vcpu": 1, "ipa": 0x4000_1000, "size": 8192,
                             "shared": 12288})
    assert "vcpu1" in line and "share" in line and "0x000040001000" in line and "+    8 KiB" in line
    assert format_record({"type": "future"})[0].startswith("-- unknown record")
