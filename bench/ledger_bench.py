"""The memshare ledger at millions of ranges: what one guest call costs, whether a
subscriber's snapshot holds up the event loop, and what a reload costs, each
against a floor measured in the same run.

- **update**: one MEM_SHARE of a hole in the middle of a ledger of alternate
  granules (it joins two ranges) and the MEM_UNSHARE that splits them again,
  per pair, at each size; the floor is the same pair on a 10-range ledger.
- **snapshot stall**: an :class:`~hvcproxyd.sidecars.eventstream.EventStream`
  serves the ledger; a subscriber in another process (so its reading is not
  the daemon's work) takes the whole snapshot while a ticker task in the
  daemon's trio loop asks to run every millisecond.  Reported: the ticker's
  worst lateness while the snapshot streams, against its worst lateness with
  no snapshot (the floor), and what encoding the whole record at once would
  have held the loop for (what the stream did before it sent chunks).
- **reload**: handing the ledger to a reloaded handler (``adopt``: the blocks,
  not the ranges) against the plain snapshot()/restore() walk.
- **compaction**: a VM with ``state:`` whose memshare handler holds the ledger
  compacts its journal (``Journal.compact``: the state captured on the loop,
  the snapshot built, encoded and written in a thread) while the ticker runs;
  its worst lateness against the idle one, and what building the state
  document on the loop would have held it for (what a compaction and a
  migration's state save did before ``Handler.frozen_snapshot``).

Usage: .venv/bin/python bench/ledger_bench.py [--sizes 10,10000,1000000,4000000] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from hvcproxyd.core.service import VmService
from hvcproxyd.core.vmconfig import load_config
from hvcproxyd.durable.store import Fsync, Journal
from hvcproxyd.handlers.pkvm_memshare.handler import MemshareHandler
from hvcproxyd.handlers.pkvm_memshare.ledger import Ledger, RangeSet
from hvcproxyd.sidecars.eventstream import EventStream

G = 4096
TICK = 0.001
#: The subscriber: connect, read one line (the snapshot), print how many bytes and seconds it took.
SUBSCRIBER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); t = time.perf_counter(); n = 0
while True:
    b = s.recv(1 << 20); n += len(b)
    if not b or b.endswith(b"\\n"): break
print(n, time.perf_counter() - t)
"""


def alternate(n: int) -> Ledger:
    """n ranges of one granule with one-granule holes between them: the worst fragmentation."""
    ledger = Ledger(G)
    ledger.shared = RangeSet.from_sorted((2 * i * G, (2 * i + 1) * G) for i in range(n))
    return ledger


def update_cost(ledger: Ledger, pairs: int) -> float:
    """Microseconds per share+unshare pair of holes spread over the ledger."""
    n = len(ledger.shared)
    holes = [(2 * (i * max(n // pairs, 1) % max(n - 1, 1)) + 1) * G for i in range(pairs)]
    t = time.perf_counter()
    for ipa in holes:
        ledger.share(ipa, G, vcpu=0)
        ledger.unshare(ipa, G, vcpu=0)
    return (time.perf_counter() - t) / pairs * 1e6


async def ticker_lateness(duration_or_until: Callable[[], bool]) -> list[float]:
    """The ticker: sleeps TICK at a time until told to stop; returns how late each wake-up was (s)."""
    late: list[float] = []
    while not duration_or_until():
        t = time.perf_counter()
        await trio.sleep(TICK)
        late.append(time.perf_counter() - t - TICK)
    return late


async def snapshot_stall(ledger: Ledger, sock: Path) -> dict[str, float]:
    es = EventStream(sock, lambda: ledger.view("bench", time.time()), queue_limit=1024)
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(es.serve)
        deadline = time.perf_counter() + 0.3
        idle = await ticker_lateness(lambda: time.perf_counter() > deadline)
        child = await trio.lowlevel.open_process([sys.executable, "-c", SUBSCRIBER, str(sock)],
                                                 stdout=subprocess.PIPE)
        assert child.stdout is not None
        busy = await ticker_lateness(lambda: child.poll() is not None)
        report = (await child.stdout.receive_some(4096)).split()
        await child.wait()
        nursery.cancel_scope.cancel()
    out["idle_max_ms"] = max(idle) * 1e3
    out["busy_max_ms"] = max(busy) * 1e3
    out["busy_p99_ms"] = statistics.quantiles(busy, n=100)[98] * 1e3 if len(busy) >= 100 else out["busy_max_ms"]
    out["bytes"] = float(report[0])
    out["seconds"] = float(report[1])
    t = time.perf_counter()
    b"".join(ledger.view("bench", 0.0))
    out["whole_encode_ms"] = (time.perf_counter() - t) * 1e3
    return out


COMPACT_CONFIG = """\
vm: bench
socket: {tmp}/bench.sock
state: {{dir: {tmp}/state, fsync: never}}
handlers:
  ms: {{type: pkvm-memshare, options: {{stream: false, max_ranges: 8000000}}}}
rules:
  - {{match: kvm-vendor, action: ms}}
"""


async def compaction_stall(ledger: Ledger, tmp: Path) -> dict[str, float]:
    cfg = tmp / "compact.yaml"
    cfg.write_text(COMPACT_CONFIG.format(tmp=tmp))
    vm = VmService(load_config(cfg))
    handler = vm.instances["ms"]
    assert isinstance(handler, MemshareHandler)
    journal = Journal(tmp / "state" / "bench", vm, Fsync.NEVER)
    journal.open()
    handler.ledger = ledger.copy(max_ranges=None)
    done = False

    async def compact() -> None:
        nonlocal done
        await journal.compact()
        done = True

    deadline = time.perf_counter() + 0.3
    idle = await ticker_lateness(lambda: time.perf_counter() > deadline)
    t = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(compact)
        busy = await ticker_lateness(lambda: done)
    took = time.perf_counter() - t
    t = time.perf_counter()
    vm.durable_document()  # the whole document on the loop, as before
    on_loop = time.perf_counter() - t
    journal.close()
    return {"compact_idle_ms": max(idle) * 1e3, "compact_busy_ms": max(busy) * 1e3, "compact_s": took,
            "document_on_loop_ms": on_loop * 1e3}


def reload_cost(ledger: Ledger) -> tuple[float, float]:
    """(copy, walk) in milliseconds: what adopt() does against snapshot()+restore()."""
    t = time.perf_counter()
    ledger.copy(max_ranges=None)
    copy = time.perf_counter() - t
    t = time.perf_counter()
    Ledger.from_dict(json.loads(json.dumps(ledger.to_dict())) if len(ledger.shared) < 1000 else ledger.to_dict())
    walk = time.perf_counter() - t
    return copy * 1e3, walk * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,10000,1000000,4000000",
                        help="ledger sizes in ranges, comma-separated (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=2000, help="share+unshare pairs timed per size")
    parser.add_argument("--quick", action="store_true", help="sizes 10,10000,1000000 and 500 pairs (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    sizes = [10, 10_000, 1_000_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    pairs = 500 if args.quick else args.pairs
    floor_us = update_cost(alternate(10), pairs)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            print(f"[bench] {n} ranges: building", file=sys.stderr, flush=True)
            ledger = alternate(n)
            row: dict[str, Any] = {"ranges": n, "update_us": update_cost(ledger, pairs)}
            row["update_vs_floor"] = row["update_us"] / floor_us
            print(f"[bench] {n} ranges: snapshot through a subscriber", file=sys.stderr, flush=True)
            row.update(trio.run(snapshot_stall, ledger, Path(tmp) / f"l{n}.sock"))
            row["stall_vs_idle"] = row["busy_max_ms"] / max(row["idle_max_ms"], 1e-3)
            row["copy_ms"], row["walk_ms"] = reload_cost(ledger)
            print(f"[bench] {n} ranges: journal compaction", file=sys.stderr, flush=True)
            sub = Path(tmp) / f"c{n}"
            sub.mkdir()
            row.update(trio.run(compaction_stall, ledger, sub))
            rows.append(row)
    if args.json:
        print(json.dumps({"floor_update_us": floor_us, "rows": rows}, indent=2))
        return
    print(f"floor: a share+unshare pair on a 10-range ledger, {floor_us:.1f} µs\n")
    print("| ranges | pair µs | x floor | snapshot MB | sent in s | loop worst late ms (idle) | x idle "
          "| whole-record encode ms | reload copy ms | reload walk ms "
          "| compaction s | its loop worst late ms (idle) | document on the loop ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranges']:,} | {r['update_us']:.1f} | {r['update_vs_floor']:.2f} | {r['bytes'] / 1e6:.1f} "
              f"| {r['seconds']:.2f} | {r['busy_max_ms']:.1f} ({r['idle_max_ms']:.1f}) | {r['stall_vs_idle']:.1f} "
              f"| {r['whole_encode_ms']:.0f} | {r['copy_ms']:.2f} | {r['walk_ms']:.0f} "
              f"| {r['compact_s']:.2f} | {r['compact_busy_ms']:.1f} ({r['compact_idle_ms']:.1f}) "
              f"| {r['document_on_loop_ms']:.0f} |")


if __name__ == "__main__":
    main()
