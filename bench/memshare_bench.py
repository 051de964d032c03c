"""pkvm-memshare throughput: MEM_SHARE+MEM_UNSHARE pairs through the daemon with
a subscriber connected, against the daemon's own PSCI_VERSION round trip and a
raw UNIX-socket echo floor, all measured in the same run.

Layout (two cores: the daemon on one, the VMM on the other, as in production):

- this process runs the daemon (trio), or the floor's echo server (a thread);
- a child process runs the VMM simulator with N vCPUs, each with one call in
  flight, and times its calls;
- for the memshare phase, another child process subscribes to the ledger's
  stream and rebuilds it (hvcproxyd.handlers.pkvm_memshare.ledger.Replica), as ``memshare watch`` would.

Usage: .venv/bin/python bench/memshare_bench.py [--vcpus 8] [--pairs 2000] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import socket as stdsocket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from hvcproxyd.core.handler import available_handlers
from hvcproxyd.core.vmconfig import load_config
from hvcproxyd.handlers.pkvm_memshare import MEM_SHARE_ID, MEM_UNSHARE_ID, MemshareHandler
from hvcproxyd.handlers.pkvm_memshare.ledger import Replica
from hvcproxyd.server.daemon import Daemon
from hvcproxyd.sidecars.memshare import MemshareSidecar
from hvcproxyd.vmm.simulator import RAM_BASE, Simulator, SimVcpu

PSCI_VERSION = 0x8400_0000
CALL_FRAME = 16 + 152  # header + CALL payload (docs/protocol.md §3.4)
REPLY_FRAME = 16 + 8 + 4 * 8  # header + REPLY with x0..x3 (§3.5)
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------- child: the VMM simulator

async def vmm_main(sock: str, vcpus: int, count: int, kind: str) -> dict[str, Any]:
    """Run ``count`` calls (memshare: count/2 pairs) on every vCPU; time them from the guest's side."""
    times: dict[str, float] = {}

    async def worker(cpu: SimVcpu) -> None:
        if kind == "psci":
            for _ in range(count):
                await cpu.call(PSCI_VERSION)
            return
        page = RAM_BASE + cpu.index * 4096  # a page of its own: every call succeeds
        for _ in range(count // 2):
            if (await cpu.call(MEM_SHARE_ID, page))[0] or (await cpu.call(MEM_UNSHARE_ID, page))[0]:
                raise SystemExit(f"vcpu {cpu.index}: a share or unshare failed")

    async def boot(cpu: SimVcpu, x0: int) -> None:
        times["start"], cpu0 = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for vcpu in sim.vcpus:
                nursery.start_soon(worker, vcpu)
        times["end"], times["cpu"] = time.perf_counter(), time.process_time() - cpu0

    sim = Simulator(sock, n_vcpus=vcpus, name="bench", boot=boot)
    for vcpu in sim.vcpus:
        vcpu.powered_on = True
    try:
        await sim.run(timeout=600)
    finally:
        sim.close()
    return {"calls": vcpus * (count if kind == "psci" else count // 2 * 2), "seconds": times["end"] - times["start"],
            "cpu": times["cpu"]}


# ----------------------------------------------------------------- child: a subscriber

def subscriber_main(sock: str, until_seq: int) -> dict[str, Any]:
    replica = Replica()
    s = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    s.connect(sock)
    print("connected", flush=True)
    cpu0 = time.process_time()
    buf = b""
    while replica.seq is None or replica.seq < until_seq:
        data = s.recv(1 << 16)
        if not data:
            break
        *lines, buf = (buf + data).split(b"\n")
        for line in lines:
            replica.apply(json.loads(line))
    return {"changes": replica.changes, "lost": replica.lost, "snapshots": replica.snapshots,
            "shared": replica.shared.total, "cpu": time.process_time() - cpu0}


# ----------------------------------------------------------------- the floor: plain sockets, no framework

def floor_client(sock_path: str, vcpus: int, count: int) -> dict[str, Any]:
    """The same frames with the same number in flight (one per vCPU), over plain
    blocking sockets: every reply that arrives is answered with the next call, all
    of them in one write.  Nothing but the kernel and a Python loop in between."""
    s = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    s.connect(sock_path)
    frame = struct.pack("<IHHQ", CALL_FRAME, 4, 0, 0) + bytes(CALL_FRAME - 16)
    total, received, pending = vcpus * count, 0, 0
    start, cpu0 = time.perf_counter(), time.process_time()
    s.sendall(frame * vcpus)
    sent = vcpus
    while received < total:
        data = s.recv(1 << 17)
        if not data:
            raise SystemExit("floor server went away")
        pending += len(data)
        k, pending = divmod(pending, REPLY_FRAME)
        received += k
        n = min(k, total - sent)
        if n:
            s.sendall(frame * n)
            sent += n
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    s.close()
    return {"calls": total, "seconds": seconds, "cpu": cpu}


def floor_server(listener: stdsocket.socket) -> None:
    """Answer every complete CALL frame with a REPLY-sized frame, all in one write."""
    conn, _ = listener.accept()
    reply = struct.pack("<IHHQ", REPLY_FRAME, 5, 0, 0) + bytes(REPLY_FRAME - 16)
    pending = 0
    with conn:
        while data := conn.recv(1 << 17):
            pending += len(data)
            k, pending = divmod(pending, CALL_FRAME)
            if k:
                conn.sendall(reply * k)


# ----------------------------------------------------------------- the parent

def child(role: str, *args: Any) -> list[str]:
    return [sys.executable, str(HERE), "--role", role, *map(str, args)]


async def run_child(cmd: list[str]) -> dict[str, Any]:
    """The child's report, plus ``server_cpu``: this process's CPU seconds meanwhile
    (the daemon or the floor's server), which with the child's tells who is the bottleneck."""
    cpu0 = time.process_time()
    proc = await trio.run_process(cmd, capture_stdout=True, check=True)
    report: dict[str, Any] = json.loads(proc.stdout.decode().splitlines()[-1])
    report["server_cpu"] = time.process_time() - cpu0
    return report


CONFIG = """
vm: bench
handlers:
  ms:
    type: pkvm-memshare
    options: {{socket: {stream}, subscriber_queue: 4096}}
  psci:
    type: {psci_type}
{psci_options}
rules:
  - match: kvm-vendor
    action: ms
  - match: psci
    action: psci
"""


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    psci_type = "psci" if "psci" in available_handlers() else "static"
    psci_options = "    options: {regs: [0x10001]}" if psci_type == "static" else ""
    (tmp / "bench.yaml").write_text(CONFIG.format(stream=tmp / "ms.sock", psci_type=psci_type,
                                                  psci_options=psci_options))
    config = load_config(tmp / "bench.yaml", socket=str(tmp / "vm.sock"))
    daemon = Daemon(config)
    handler = daemon.vm.instances["ms"]
    (side,) = daemon.vm.sidecars["ms"]
    assert isinstance(handler, MemshareHandler) and isinstance(side, MemshareSidecar) and side.stream is not None
    results: dict[str, list[dict[str, Any]]] = {"floor": [], "psci": [], "memshare": []}
    subscribers: list[dict[str, Any]] = []
    profile = cProfile.Profile() if args.profile else None
    calls = args.pairs * 2
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        for i in range(args.repeat):
            floor_path = tmp / f"floor{i}.sock"
            with stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM) as listener:
                listener.bind(str(floor_path))
                listener.listen(1)
                async with trio.open_nursery() as floor:
                    floor.start_soon(trio.to_thread.run_sync, floor_server, listener)
                    results["floor"].append(await run_child(child("floor", floor_path, args.vcpus, calls)))
            results["psci"].append(await run_child(child("vmm", config.socket, args.vcpus, calls, "psci")))

            until = handler.ledger.seq + args.vcpus * calls
            sub = await trio.lowlevel.open_process(child("subscriber", side.socket_path, until),
                                                   stdout=subprocess.PIPE)
            assert sub.stdout is not None
            await sub.stdout.receive_some(64)  # "connected"
            while not side.stream.subscribers:
                await trio.sleep(0.01)
            if profile is not None:
                profile.enable()
            results["memshare"].append(await run_child(child("vmm", config.socket, args.vcpus, calls, "memshare")))
            if profile is not None:
                profile.disable()
            out = b""
            while chunk := await sub.stdout.receive_some(1 << 16):
                out += chunk
            await sub.wait()
            subscribers.append(json.loads(out.decode().splitlines()[-1]))
        daemon.stop()
    report: dict[str, Any] = {"vcpus": args.vcpus, "calls_per_vcpu": calls, "repeat": args.repeat,
                              "psci_handler": psci_type, "subscribers": subscribers}
    for name, runs in results.items():
        report[name] = statistics.median(r["calls"] / r["seconds"] for r in runs)
        # CPU microseconds per call on each side (the server side includes process start-up of the child).
        report[f"{name}_us_per_call"] = {
            "server": statistics.median(r["server_cpu"] / r["calls"] * 1e6 for r in runs),
            "vmm": statistics.median(r["cpu"] / r["calls"] * 1e6 for r in runs)}
    report["ledger_seq"] = handler.ledger.seq
    if profile is not None:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        report["profile"] = text.getvalue()
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vcpus", type=int, default=8)
    p.add_argument("--pairs", type=int, default=2000, help="MEM_SHARE+MEM_UNSHARE pairs per vCPU (PSCI and the "
                   "floor make the same number of calls)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each phase; the median is reported")
    p.add_argument("--profile", action="store_true", help="cProfile the daemon during the memshare phases")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.role == "vmm":
        sock, vcpus, count, kind = args.rest
        print(json.dumps(trio.run(vmm_main, sock, int(vcpus), int(count), kind)))
        return 0
    if args.role == "floor":
        sock, vcpus, count = args.rest
        print(json.dumps(floor_client(sock, int(vcpus), int(count))))
        return 0
    if args.role == "subscriber":
        sock, until = args.rest
        print(json.dumps(subscriber_main(sock, int(until))))
        return 0
    with tempfile.TemporaryDirectory(prefix="hvcproxyd-bench-") as tmp:
        report = trio.run(bench, args, Path(tmp))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    floor, psci, ms = report["floor"], report["psci"], report["memshare"]
    print(f"memshare bench: {args.vcpus} vCPUs, {report['calls_per_vcpu']} calls each, median of {args.repeat} "
          f"(PSCI_VERSION answered by the {report['psci_handler']!r} handler)")
    def cpu(name: str) -> str:
        us = report[f"{name}_us_per_call"]
        return f"CPU/call: server {us['server']:5.1f} us, VMM {us['vmm']:5.1f} us"

    print(f"  raw UNIX-socket echo floor     {floor:8.0f} calls/s                               {cpu('floor')}")
    print(f"  PSCI_VERSION via the daemon    {psci:8.0f} calls/s  {psci / floor:5.2f} x floor"
          f"                {cpu('psci')}")
    print(f"  MEM_SHARE/UNSHARE + subscriber {ms:8.0f} calls/s  {ms / floor:5.2f} x floor  "
          f"{ms / psci:5.2f} x PSCI  {cpu('memshare')}")
    subs = report["subscribers"]
    changes, lost = sum(s["changes"] for s in subs), sum(s["lost"] for s in subs)
    print(f"  subscriber (Replica, own process): {changes} changes received live, {lost} lost, "
          f"{sum(s['cpu'] for s in subs) / max(changes, 1) * 1e6:.1f} us CPU per change")
    if "profile" in report:
        print(report["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
