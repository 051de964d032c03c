"""trace, status, metrics, per-call journal records and the VMM credential check,
against an in-process daemon that the VMM simulator drives over real sockets."""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from hvcproxyd import cli as cli_main
from hvcproxyd.cli.registry import SUBCOMMANDS
from hvcproxyd.core.stats import LATENCY_BUCKETS, MAX_FUNCTIONS, OTHER, CallStats, Histogram
from hvcproxyd.core.vmconfig import VmConfig, load_config
from hvcproxyd.ops import logsetup
from hvcproxyd.ops.control import TraceFilter, request_status, trace_calls
from hvcproxyd.ops.journal import JournalHandler
from hvcproxyd.ops.metrics import scrape_unix
from hvcproxyd.smccc.results import ResultClass
from hvcproxyd.vmm.simulator import Simulator, SimVcpu
from hvcproxyd.wire import Call, Reply

from .conftest import Serve
from .ops_support import CPU_OFF, CPU_ON64, HELLO, MINUS3, REPO, SIP_UID, UNRULED, ops_config
from .waiting import wait_until

ENTRY1, ENTRY2 = 0x4008_0000, 0x4009_0000


def load(tmp_path: Path, **kw: Any) -> VmConfig:
    path = tmp_path / "opsvm.yaml"
    path.write_text(ops_config(tmp_path, **kw))
    return load_config(path)


def control(config: VmConfig) -> Path:
    assert config.control_socket is not None  # load_config always sets it
    return config.control_socket


async def run_sim(config: VmConfig, boot: Any, **kw: Any) -> Simulator:
    sim = Simulator(config.socket, name=config.name, boot=boot, **kw)
    try:
        await sim.run(timeout=30)
    finally:
        sim.close()
    return sim


def hvcproxyd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hvcproxyd", *args]


# ----------------------------------------------------------------- trace and status

async def test_trace_and_status_follow_a_simulated_vm(tmp_path: Path, serve: Serve,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = load(tmp_path)
    ctl = str(config.control_socket)
    outputs: dict[str, bytes] = {}
    library_trace: list[dict[str, Any]] = []

    async def cli(key: str, *args: str) -> None:
        done = await trio.run_process(hvcproxyd(*args), capture_stdout=True, capture_stderr=True, cwd=REPO)
        outputs[key] = done.stdout

    async def secondary1(cpu: SimVcpu, x0: int) -> None:
        await cpu.call(HELLO)

    async def secondary2(cpu: SimVcpu, x0: int) -> None:
        await cpu.call(CPU_OFF)

    status_seen: list[dict[str, Any]] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        for _ in range(3):
            await cpu.call(HELLO, 7)
        await cpu.call(SIP_UID)
        await cpu.call(MINUS3)
        await cpu.call(UNRULED)
        await cpu.call(CPU_ON64, 1, ENTRY1, 0x11)
        await cpu.call(CPU_ON64, 2, ENTRY2, 0x22)
        vm = daemon.daemon.vm
        # The secondaries' calls answered, and vCPU 2's CPU_OFF confirmed by the VMM (EFFECT_DONE).
        await wait_until(lambda: vm.stats.by_handler()["hello"] == 4 and vm.stats.by_handler()["power"] == 3
                         and vm.vmm_power == {0: True, 1: True, 2: False, 3: False}, "the secondaries' calls")
        status_seen.append(await trio.to_thread.run_sync(request_status, control(config)))
        # `hvcproxyd status` in-process (the real parser and command); the traces are real processes.
        parsed = cli_main.build_parser().parse_args(["status", "--control-socket", ctl, "opsvm"])
        assert await trio.to_thread.run_sync(SUBCOMMANDS["status"][2], parsed) == 0
        outputs["status"] = capsys.readouterr().out.encode()

    def read_all() -> None:
        for obj in trace_calls(control(config), TraceFilter()):
            library_trace.append(obj)
            if len(library_trace) == 11:  # the header and ten calls
                return

    daemon = await serve.service(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cli, "json", "trace", "--control-socket", ctl, "--json", "--handler", "hello", "-n", "4",
                           "opsvm")
        nursery.start_soon(cli, "text", "trace", "--control-socket", ctl, "--func", "PSCI_CPU_ON64", "--vcpu", "0",
                           "-n", "2", "opsvm")
        nursery.start_soon(trio.to_thread.run_sync, read_all)
        await wait_until(lambda: len(daemon.hub.subscribers) == 3, "three trace subscribers")
        await run_sim(config, boot, programs={ENTRY1: secondary1, ENTRY2: secondary2})
    await serve.stop(daemon.daemon)

    # The JSON trace: exactly the calls hello answered, decoded.
    lines = [trio_json(line) for line in outputs["json"].decode().splitlines()]
    assert [(c["vcpu"], c["name"], c["handler"], c["result"]) for c in lines] == [
        (0, None, "hello", "success")] * 3 + [(1, None, "hello", "success")]
    assert lines[0]["func_id"] == "0x82000001" and lines[0]["args"]["x1"] == "0x7"
    # The text trace: CPU_ON from vCPU 0 only, with named arguments and the effect.
    text = outputs["text"].decode().splitlines()
    assert len(text) == 2
    assert "vcpu0 HVC 0xc4000003 PSCI_CPU_ON64(target=0x1, entry=0x40080000, context=0x11) -> power: SUCCESS " \
           "+CPU_ON(vcpu1)" in text[0]
    assert "PSCI_CPU_ON64(target=0x2" in text[1]
    # Unfiltered: every call, in order per vCPU, with result classes.
    calls = library_trace[1:]
    assert library_trace[0]["ok"] and library_trace[0]["vm"] == "opsvm"
    assert [(c["handler"], c["result"]) for c in calls if c["vcpu"] == 0] == [
        ("hello", "success")] * 3 + [("ident", "value"), ("minus3", "error"), ("none", "not_supported"),
                                     ("power", "success"), ("power", "success")]
    assert {(c["vcpu"], c["name"]) for c in calls if c["vcpu"] != 0} == {(1, None), (2, "PSCI_CPU_OFF")}
    assert len(daemon.hub.subscribers) == 0 and daemon.hub.observe not in daemon.daemon.vm.observers

    # status, while the VMM was attached.
    (st,) = status_seen
    assert st["state"] == "serving" and st["vm"] == "opsvm"
    assert st["vmm"]["pid"] == os.getpid() and st["vmm"]["uid"] == os.getuid()
    assert st["vmm"]["memory"] == "memfd" and st["vmm"]["reconnect"] is False
    assert [v["power"] for v in st["vcpus"]] == ["on", "on", "off", "off"]
    handlers = st["calls"]["handlers"]
    assert {k: v["calls"] for k, v in handlers.items()} == {"hello": 4, "minus3": 1, "ident": 1, "none": 1,
                                                            "power": 3}
    assert handlers["hello"]["p50_us"] > 0 and handlers["hello"]["p99_us"] >= handlers["hello"]["p50_us"]
    assert st["calls"]["results"] == {"success": 7, "value": 1, "error": 1, "not_supported": 1}
    assert st["connections"] == {"accepted": 1, "reconnects": 0, "refused_peers": 0, "protocol_errors": 0}
    human = outputs["status"].decode()
    assert "serving opsvm: 4 vCPUs, 5 rules, 10 calls" in human
    assert "vCPUs      0 on, 1 on, 2 off, 3 off (as the VMM holds them)" in human  # no PSCI handler here
    assert any(line.split()[:3] == ["hello", "static", "4"] for line in human.splitlines())


async def test_trace_clients_that_leave_mid_stream_are_not_errors(tmp_path: Path, serve: Serve,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A trace client may go at any moment, even while the daemon is writing to
    it: at most a DEBUG line, never an ERROR with a traceback."""
    config = load(tmp_path)
    daemon = await serve.service(config)
    leavers: list[trio.SocketStream] = []
    for _ in range(3):  # the daemon runs in this trio loop: its clients must not block it
        s = await trio.open_unix_socket(str(control(config)))
        await s.send_all(b'{"op": "trace"}\n')
        await s.receive_some(4096)  # the header
        leavers.append(s)
    # One leaves with a reset (the daemon sees it on its read side first); two stop
    # reading, so the daemon's next write is what fails: the case that was an ERROR.
    leavers[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await wait_until(lambda: len(daemon.hub.subscribers) == 3, "three trace subscribers")

    async def boot(cpu: SimVcpu, x0: int) -> None:
        await cpu.call(HELLO, 1)
        await leavers[0].aclose()
        for s in leavers[1:]:
            s.socket.shutdown(socket.SHUT_RD)
        for _ in range(50):
            await cpu.call(HELLO, 2)
        await wait_until(lambda: not daemon.hub.subscribers, "the subscribers gone")

    with caplog.at_level(logging.DEBUG, logger="hvcproxyd"):
        await run_sim(config, boot)
    await serve.stop(daemon.daemon)
    for s in leavers[1:]:
        await s.aclose()
    loud = [r for r in caplog.records if r.name.startswith("hvcproxyd") and r.levelno > logging.INFO]
    assert loud == [], [r.getMessage() for r in loud]
    assert any("trace client left" in r.getMessage() for r in caplog.records)


def trio_json(line: str) -> dict[str, Any]:
    import json

    return json.loads(line)  # type: ignore[no-any-return]


async def test_trace_filter_parsing_and_refusals(tmp_path: Path, serve: Serve) -> None:
    flt = TraceFilter.parse(["PSCI_CPU_ON", "0x8200ff01"], ["psci", "0x82000000-0x820000ff"], [1], ["hello"])
    assert flt.funcs == {0x84000003, 0x8200FF01}
    assert (0x82000000, 0x820000FF) in flt.ranges and (0xC4000000, 0xC400001F) in flt.ranges
    assert TraceFilter.from_json(flt.to_json()) == flt
    with pytest.raises(ValueError, match="not a function ID or a known name"):
        TraceFilter.parse(["PSCI_CPU_ONN"], [], [], [])
    with pytest.raises(ValueError, match="FIRST-LAST"):
        TraceFilter.parse([], ["0x9-0x1"], [], [])
    config = load(tmp_path)
    daemon = await serve.service(config)

    def ask(request: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(config.control_socket))
            s.sendall(request)
            return s.makefile("rb").read()
    assert b"unknown op" in await trio.to_thread.run_sync(ask, b'{"op": "reboot"}\n')
    assert b"filter" in await trio.to_thread.run_sync(ask, b'{"op": "trace", "filter": {"vcpus": [-1]}}\n')
    assert b"one JSON object" in await trio.to_thread.run_sync(ask, b"status\n")
    assert daemon.hub.subscribers == []

    def hang_up(path: Path) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
    # Clients that leave at once cost the daemon nothing (a broken reply once crashed it).
    for path in (control(config), tmp_path / "opsvm.metrics", config.socket):
        await trio.to_thread.run_sync(hang_up, path)
    await trio.testing.wait_all_tasks_blocked()  # the daemon has seen every hang-up
    assert (await trio.to_thread.run_sync(request_status, control(config)))["state"] == "waiting"
    await serve.stop(daemon.daemon)


# ----------------------------------------------------------------- metrics

def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset((k, v) for k, v in s.labels.items() if k != "vm")] = s.value
    return out


def sample(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found[name, frozenset(labels.items())]


async def test_metrics_count_a_known_call_sequence(tmp_path: Path, serve: Serve) -> None:
    config = load(tmp_path)
    assert config.metrics is not None and config.metrics.socket == tmp_path / "opsvm.metrics"
    scraped: list[str] = []

    async def boot(cpu: SimVcpu, x0: int) -> None:
        for _ in range(3):
            await cpu.call(HELLO)
        await cpu.call(SIP_UID)
        await cpu.call(MINUS3)
        await cpu.call(MINUS3)
        await cpu.call(UNRULED)
        body = await trio.to_thread.run_sync(scrape_unix, str(config.metrics.socket))  # type: ignore[union-attr]
        scraped.append(body.decode())

    service = await serve.service(config)
    await run_sim(config, boot)
    await serve.stop(service.daemon)

    m = samples(scraped[0])
    calls = "hvcproxyd_calls_total"
    assert sample(m, calls, function="0x82000001", function_id="0x82000001", handler="hello", result="success") == 3
    assert sample(m, calls, function="SIP_CALL_UID", function_id="0x8200ff01", handler="ident", result="value") == 1
    assert sample(m, calls, function="0x82000003", function_id="0x82000003", handler="minus3", result="error") == 2
    assert sample(m, calls, function="0x82000006", function_id="0x82000006", handler="none",
                  result="not_supported") == 1
    assert sum(v for (name, _), v in m.items() if name == calls) == 7
    assert sample(m, "hvcproxyd_handler_latency_seconds_count", handler="hello") == 3
    assert sample(m, "hvcproxyd_handler_latency_seconds_bucket", handler="hello", le="+Inf") == 3
    assert sample(m, "hvcproxyd_handler_latency_seconds_bucket", handler="minus3", le="10.0") == 2
    assert sample(m, "hvcproxyd_vmm_connections_total") == 1
    assert sample(m, "hvcproxyd_vmm_connected") == 1
    assert sample(m, "hvcproxyd_vmm_reconnects_total") == 0
    assert sample(m, "hvcproxyd_protocol_errors_total") == 0
    assert sample(m, "hvcproxyd_config_reloads_total", result="refused") == 0
    assert sample(m, "hvcproxyd_process_open_fds") > 0


async def test_metrics_on_loopback_tcp(tmp_path: Path, serve: Serve) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = load(tmp_path, extra=f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
    assert any("metrics-tcp.conf" in str(w) for w in config.warnings)

    def get(path: str) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            return s.makefile("rb").read()

    daemon = await serve.service(config)
    assert daemon.metrics_address == ("127.0.0.1", port)
    ok = await trio.to_thread.run_sync(get, "/metrics")
    missing = await trio.to_thread.run_sync(get, "/nothing")
    await serve.stop(daemon.daemon)
    head, _, body = ok.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/plain; version=" in head
    assert sample(samples(body.decode()), "hvcproxyd_vmm_connected") == 0
    assert missing.startswith(b"HTTP/1.1 404")


# ----------------------------------------------------------------- per-call logs

def parse_journal(data: bytes) -> dict[str, str]:
    """The native protocol, decoded the way journald does."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            out[key.decode()] = value.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + n].decode()
            assert data[nl + 9 + n:nl + 10 + n] == b"\n"
            i = nl + 10 + n
    return out


@pytest.mark.parametrize("log_calls", [True, False])
async def test_per_call_journal_records_only_when_asked(tmp_path: Path, serve: Serve, log_calls: bool) -> None:
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal"))
    journal.setblocking(False)
    handler = JournalHandler(str(tmp_path / "journal"), static=logsetup.STATIC_FIELDS)
    calls_log = logging.getLogger("hvcproxyd.calls")
    calls_log.addHandler(handler)
    calls_log.setLevel(logging.INFO)  # INFO: per-call records only if log_calls says so
    try:
        config = load(tmp_path, extra=f"log_calls: {str(log_calls).lower()}\n")

        async def boot(cpu: SimVcpu, x0: int) -> None:
            await cpu.call(CPU_ON64, 5, ENTRY1, 0)  # no such MPIDR: INVALID_PARAMETERS

        daemon = await serve.service(config)
        assert (daemon._call_logger is not None) == log_calls
        await run_sim(config, boot)
        await serve.stop(daemon.daemon)
    finally:
        calls_log.removeHandler(handler)
        calls_log.setLevel(logging.NOTSET)
        handler.close()
    records = []
    while True:
        try:
            records.append(parse_journal(journal.recv(65536)))
        except BlockingIOError:
            break
    journal.close()
    if not log_calls:
        assert records == []
        return
    (rec,) = records
    assert rec["HVC_VM"] == "opsvm" and rec["PRIORITY"] == "6" and rec["LOGGER"] == "hvcproxyd.calls"
    assert rec["HVC_FUNC"] == "PSCI_CPU_ON64" and rec["HVC_FUNC_ID"] == "0xc4000003"
    assert rec["HVC_VCPU"] == "0" and rec["HVC_CONDUIT"] == "HVC" and rec["HVC_HANDLER"] == "power"
    assert rec["HVC_RESULT"] == "INVALID_PARAMETERS" and float(rec["HVC_LATENCY_US"]) > 0
    assert rec["MESSAGE"].startswith("opsvm: vcpu0 HVC 0xc4000003 PSCI_CPU_ON64(target=0x5, entry=0x40080000")


# ----------------------------------------------------------------- VMM credentials

async def connect_raw(path: Path) -> bytes:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        with trio.fail_after(5):
            return await sock.recv(100)  # b"" when the daemon closes without a word


async def test_a_vmm_with_other_credentials_is_refused_and_logged(tmp_path: Path, serve: Serve,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    other = os.getuid() + 1
    path = tmp_path / "opsvm.yaml"
    path.write_text(ops_config(tmp_path).replace(f"vmm: {{uid: {os.getuid()}}}", f"vmm: {{uid: {other}}}"))
    config = load_config(path)
    daemon = await serve.service(config)
    assert await connect_raw(config.socket) == b""
    links = daemon.daemon.links
    assert links.refused_peers == 1 and daemon.daemon.session is None and links.accepted == 0
    body = await trio.to_thread.run_sync(scrape_unix, str(tmp_path / "opsvm.metrics"))
    await serve.stop(daemon.daemon)
    assert sample(samples(body.decode()), "hvcproxyd_vmm_refused_total") == 1
    (msg,) = [r.getMessage() for r in caplog.records if "refused VMM" in r.getMessage()]
    assert f"refused VMM pid {os.getpid()} uid {os.getuid()} gid {os.getgid()}" in msg
    assert f"matches neither vmm.uid {other}" in msg


async def test_a_vmm_in_the_configured_group_is_let_in(tmp_path: Path, serve: Serve) -> None:
    import grp

    path = tmp_path / "opsvm.yaml"
    group = grp.getgrgid(os.getgid()).gr_name  # by name: resolved at connect time
    path.write_text(ops_config(tmp_path).replace(f"vmm: {{uid: {os.getuid()}}}",
                                                 f"vmm: {{gid: {group}}}"))  # no uid: the group is the check
    config = load_config(path)

    async def boot(cpu: SimVcpu, x0: int) -> None:
        assert (await cpu.call(HELLO))[:2] == (0, 1)

    daemon = await serve.service(config)
    assert os.stat(config.socket).st_gid == os.getgid() and os.stat(config.socket).st_mode & 0o777 == 0o660
    assert os.stat(config.control_socket).st_mode & 0o777 == 0o600  # type: ignore[arg-type]
    await run_sim(config, boot)
    assert daemon.daemon.links.refused_peers == 0 and daemon.daemon.vm.stats.by_handler()["hello"] == 1
    await serve.stop(daemon.daemon)


def test_stats_cap_functions_and_interpolate_percentiles() -> None:
    t = CallStats()
    for n in range(MAX_FUNCTIONS + 10):  # a guest sweeping a forwarded block
        t.record(Call(n + 1, 0, 0x8200_0000 + n, (0,) * 17), Reply(n + 1, 0, (0, 0, 0, 0)), "h", 1e-5)
    assert len(t.calls) == MAX_FUNCTIONS + 1 and t.calls[OTHER, "h", ResultClass.SUCCESS] == 10
    h = Histogram()
    assert h.quantile(0.5) is None
    for seconds in (3e-5,) * 99 + (2.0,):
        h.observe(seconds)
    assert LATENCY_BUCKETS[1] < h.quantile(0.5) <= LATENCY_BUCKETS[2]  # type: ignore[operator]
    assert h.quantile(0.999) > 1.0  # type: ignore[operator]
    assert h.cumulative()[-1] == ("+Inf", 100)
