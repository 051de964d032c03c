"""Rule compilation: compile_rules on 1k/10k(/50k) rules of a realistic mix against a
sort of the same number of tuples, load_config end to end on a 10k-rule YAML file,
and the event loop's scheduling latency while that file is loaded on the loop vs.
in a worker thread (as Daemon.reload does).

The mix (deterministic for a seed): single IDs, short ranges, per-conduit pairs
(hvc to a handler, smc denied), IDs split over disjoint vCPU sets, denied and
KVM-left ranges, over SiP, OEM, standard, standard-hyp and trusted-app owners,
both fast 32/64 halves and yielding calls; each SiP/OEM owner's discovery
queries go to a discovery handler.  A second set shifts every rule onto its
neighbours, so nearly every rule overlaps an earlier one: the time to refuse it.

Usage: .venv/bin/python bench/rules_bench.py [--sizes 1000,10000] [--big] [--repeat 5]
                                            [--yaml-rules 10000] [--skip-yaml] [--seed 1] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

import hvcproxyd
from hvcproxyd.config import ConfigError, Problem
from hvcproxyd.config.source import Mark
from hvcproxyd.core import vmconfig
from hvcproxyd.core.vmconfig import load_config
from hvcproxyd.rules.checks import compile_rules
from hvcproxyd.rules.parse import RuleSpec
from hvcproxyd.rules.targets import BUILTIN_ACTIONS, ToHandler
from hvcproxyd.server.daemon import Daemon
from hvcproxyd.smccc import Conduit

#: (fast/yielding 32/64 block bases, by owner) the generator fills; services' own IDs stay clear.
BLOCKS = (0x8200_0000, 0xC200_0000, 0x8300_0000, 0xC300_0000, 0x8400_0000, 0xC400_0000, 0xC500_0000,
          0xB000_0000, 0xF000_0000, 0x3000_0000, 0x7000_0000)
FIRST_FN, LAST_FN = 0x1000, 0xFEFF
HANDLERS = [f"h{i}" for i in range(6)]
CONDUITS = {"hvc": frozenset({Conduit.HVC}), "smc": frozenset({Conduit.SMC}),
            "any": frozenset({Conduit.HVC, Conduit.SMC})}
PERIOD = 0.001  # the ticker's sleep, seconds


# ------------------------------------------------------------------ the rules

def generate(n: int, seed: int, overlapping: bool = False) -> list[dict[str, Any]]:
    """n rules as the YAML would hold them (match, conduit, vcpus, action)."""
    rnd = random.Random(seed)
    rules: list[dict[str, Any]] = [{"match": [b | 0xFF00, b | 0xFF03], "action": "disc"}
                                   for b in (0x8200_0000, 0x8300_0000)]
    cursor = dict.fromkeys(BLOCKS, FIRST_FN)
    while len(rules) < n:
        block = rnd.choice(BLOCKS)
        lo = block | cursor[block]
        kind = rnd.random()
        length = 1 if kind < 0.55 or rnd.random() < 0.5 else rnd.randint(2, 32)
        hi = lo + length - 1
        if hi > (block | LAST_FN):
            continue
        cursor[block] += length + rnd.randint(0, 8)
        match: int | list[int] = lo if lo == hi else [lo, hi]
        if kind < 0.70:
            rules.append({"match": match, "action": rnd.choice(HANDLERS)})
        elif kind < 0.80:
            rules.append({"match": match, "conduit": "hvc", "action": rnd.choice(HANDLERS)})
            rules.append({"match": match, "conduit": "smc", "action": "deny"})
        elif kind < 0.90:
            cpus = list(range(16))
            rnd.shuffle(cpus)
            parts = rnd.randint(2, 4)
            for i in range(parts):
                rules.append({"match": match, "vcpus": sorted(cpus[i::parts]), "action": rnd.choice(HANDLERS)})
        elif kind < 0.95:
            rules.append({"match": match, "action": "deny"})
        else:
            rules.append({"match": match, "action": "kvm"})
    rules = rules[:n]
    if overlapping:  # every rule also covers its block's next 24 IDs: it runs into its neighbours
        for r in rules:
            m = r["match"]
            lo, hi = (m, m) if isinstance(m, int) else m
            r["match"] = [lo, min(hi + 24, lo | 0xFFFF)]
    return rules


def to_specs(rules: list[dict[str, Any]]) -> list[RuleSpec]:
    """What parse_rule would make of them (checked against load_config below)."""
    out = []
    for i, r in enumerate(rules):
        m = r["match"]
        lo, hi = (m, m) if isinstance(m, int) else m
        vcpus = frozenset(r["vcpus"]) if "vcpus" in r else None
        action = BUILTIN_ACTIONS.get(r["action"]) or ToHandler(r["action"])
        out.append(RuleSpec(i, ((lo, hi),), CONDUITS[r.get("conduit", "any")], vcpus, action,
                            Mark("bench", i + 1, 1)))
    return out


BENCH_MARK = Mark("bench", 1, 1)


@dataclass(frozen=True)
class Facts:
    """HandlerFacts for a handler of type static (or discovery)."""

    name: str
    type_name: str = "static"
    mark: Mark = BENCH_MARK
    answers_discovery: bool = False
    per_call_warning: str | None = None

    def provided_versions(self, service: str) -> tuple[str, ...]:
        return ()


FACTS: dict[str, Facts] = {**{h: Facts(h) for h in HANDLERS},
                           "disc": Facts("disc", "discovery", answers_discovery=True)}


def to_yaml(rules: list[dict[str, Any]]) -> str:
    lines = ["vm: bench", "handlers:",
             "  disc: {type: discovery, options: {uid: 28b46fb6-2ec5-11e9-a9ca-4b564d003a74}}"]
    lines += [f"  {h}: {{type: static, options: {{regs: [0, {i}]}}}}" for i, h in enumerate(HANDLERS)]
    lines.append("rules:")
    for r in rules:
        m = r["match"]
        parts = [f"match: {m:#x}" if isinstance(m, int) else f"match: [{m[0]:#x}, {m[1]:#x}]"]
        if "conduit" in r:
            parts.append(f"conduit: {r['conduit']}")
        if "vcpus" in r:
            parts.append(f"vcpus: {r['vcpus']}")
        parts.append(f"action: {r['action']}")
        lines.append(f"  - {{{', '.join(parts)}}}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ timing

def median_time(fn: Callable[[], object], repeat: int, cpu: list[float] | None = None,
                best: list[float] | None = None) -> float:
    """Median wall time of ``repeat`` runs; appends the median CPU time and the best
    wall time to ``cpu`` and ``best`` (CPU time and the least disturbed run say more
    than the median on a shared machine)."""
    walls, cpus = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if cpu is not None:
        cpu.append(statistics.median(cpus))
    if best is not None:
        best.append(min(walls))
    return statistics.median(walls)


def bench_compile(n: int, seed: int, repeat: int) -> dict[str, Any]:
    specs = to_specs(generate(n, seed))
    bad = to_specs(generate(n, seed, overlapping=True))
    problems: list[Problem] = []
    table = compile_rules(specs, FACTS, {}, problems)
    errors = [p for p in problems if not p.warning]
    if table is None:
        raise SystemExit(f"the generated {n}-rule set does not compile: {errors[:3]}")
    refused: list[Problem] = []
    if compile_rules(bad, FACTS, {}, refused) is not None and n >= 100:  # a dozen rules may miss each other
        raise SystemExit("the overlapping set compiled")
    rnd = random.Random(seed)
    tuples = [(lo, hi, i) for i, r in enumerate(specs) for lo, hi in r.ranges]
    rnd.shuffle(tuples)
    cpu: list[float] = []
    best: list[float] = []
    floor_sort = median_time(lambda: sorted(tuples), repeat, cpu, best)
    floor_dict = median_time(lambda: {t[0]: t for t in tuples}, repeat)
    t_ok = median_time(lambda: compile_rules(specs, FACTS, {}, []), repeat, cpu, best)
    t_bad = median_time(lambda: compile_rules(bad, FACTS, {}, []), repeat, cpu, best)
    return {"rules": n, "intervals": len(table.starts), "warnings": len(problems) - len(errors),
            "refused_reports": sum(not p.warning for p in refused),
            "floor_sort_s": floor_sort, "floor_dict_s": floor_dict, "floor_sort_cpu_s": cpu[0],
            "compile_s": t_ok, "compile_best_s": best[1], "compile_cpu_s": cpu[1],
            "compile_us_per_rule": t_ok / n * 1e6, "compile_vs_sort": t_ok / floor_sort,
            "compile_cpu_vs_sort_cpu": cpu[1] / cpu[0],
            "refuse_s": t_bad, "refuse_best_s": best[2], "refuse_cpu_s": cpu[2],
            "refuse_us_per_rule": t_bad / n * 1e6, "refuse_vs_sort": t_bad / floor_sort}


def bench_lookup(n: int, seed: int, lookups: int) -> dict[str, Any]:
    """Mean cost of one ``RuleTable.lookup`` (what dispatch does per call) on the
    compiled n-rule table, over IDs drawn from its intervals; a bisect, so it
    should grow only with log(n)."""
    table = compile_rules(to_specs(generate(n, seed)), FACTS, {}, [])
    assert table is not None
    rnd = random.Random(seed)
    ids = [rnd.choice(table.starts) for _ in range(1000)]
    lookup = table.lookup
    rounds = max(1, lookups // len(ids))

    def run() -> None:
        for _ in range(rounds):
            for fid in ids:
                lookup(fid, 0, 1)

    best: list[float] = []
    median_time(run, 5, best=best)  # the best of 5: a lookup is ns, a neighbour's burst is ms
    return {"lookup_ns": best[0] / (rounds * len(ids)) * 1e9}


def bench_yaml(path: Path, n: int, seed: int, repeat: int, sock: str) -> dict[str, Any]:
    config = load_config(path, socket=sock)
    want = to_specs(generate(n, seed))
    got = [(r.ranges, r.conduits, r.vcpus, r.action) for r in config.rules]
    if got != [(r.ranges, r.conduits, r.vcpus, r.action) for r in want]:
        raise SystemExit("load_config read different rules than the generator wrote")
    # Time the phases inside the same load_config calls: wrap what it calls.
    spent = {"yaml": 0.0, "compile": 0.0}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
        return run

    names = vars(vmconfig)  # what load_config looks these up in
    saved = {"yaml": names["read_document"], "compile": names["compile_rules"]}
    names["read_document"], names["compile_rules"] = timed("yaml", saved["yaml"]), timed("compile", saved["compile"])
    try:
        t_load = median_time(lambda: load_config(path, socket=sock), repeat)
    finally:
        names["read_document"], names["compile_rules"] = saved["yaml"], saved["compile"]
    yaml_s, compile_s = spent["yaml"] / repeat, spent["compile"] / repeat
    return {"rules": n, "bytes": path.stat().st_size, "load_config_s": t_load, "yaml_s": yaml_s,
            "compile_s": compile_s, "rest_s": t_load - yaml_s - compile_s}


async def _loop_latency(path: Path, sock: str, mode: str) -> dict[str, Any]:
    """Max and p99 lateness of a 1 ms ticker while the config loads in ``mode``, and
    the longest garbage collection meanwhile (a collection holds the GIL, so it
    stalls the loop from whichever thread it runs in)."""
    lateness: list[float] = []
    done = trio.Event()
    gc_pauses: list[float] = []
    gc_started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.append(time.perf_counter() - gc_started[0])

    async def ticker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while not done.is_set():
            t0 = time.perf_counter()
            await trio.sleep(PERIOD)
            lateness.append(time.perf_counter() - t0 - PERIOD)

    daemon = Daemon(load_config(path, socket=sock)) if mode == "Daemon.reload" else None
    async with trio.open_nursery() as nursery:
        await nursery.start(ticker)
        await trio.sleep(0.05)
        lateness.clear()
        gc.callbacks.append(on_gc)
        t0 = time.perf_counter()
        if mode == "idle":
            await trio.sleep(0.3)
        elif mode == "on the loop":
            load_config(path, socket=sock)
        elif mode == "to_thread":
            await trio.to_thread.run_sync(lambda: load_config(path, socket=sock))
        else:
            assert daemon is not None
            if not await daemon.reload(path):
                raise SystemExit("reload refused (the daemon's log says why)")
        took = time.perf_counter() - t0
        gc.callbacks.remove(on_gc)
        await trio.sleep(2 * PERIOD)  # the tick that spans the end of the load
        done.set()
    lateness.sort()
    return {"mode": mode, "load_s": took, "ticks": len(lateness), "max_late_ms": lateness[-1] * 1e3,
            "p99_late_ms": lateness[int(0.99 * (len(lateness) - 1))] * 1e3,
            "gc_runs": len(gc_pauses), "max_gc_ms": max(gc_pauses, default=0.0) * 1e3}


def bench_loop(path: Path, sock: str, runs_each: int) -> list[dict[str, Any]]:
    out = []
    for mode in ("idle", "on the loop", "to_thread", "Daemon.reload"):
        runs = [trio.run(_loop_latency, path, sock, mode) for _ in range(runs_each)]
        runs.sort(key=lambda r: r["max_late_ms"])
        out.append(runs[len(runs) // 2])  # the median run by max lateness
    return out


# ------------------------------------------------------------------ report

def rows(results: dict[str, Any]) -> Iterator[str]:
    yield f"hvcproxyd from {Path(hvcproxyd.__file__).parent}; Python {sys.version.split()[0]}, trio {trio.__version__}"
    yield ""
    yield "compile_rules (median wall of --repeat runs; CPU = process time; vs sort = against sorting the same"
    yield "number of (lo, hi, index) tuples, measured in the same run):"
    yield ("  rules intervals  sort floor   compile (ok)   us/rule  vs sort   CPU (best wall)"
           "   refuse (overlaps)  us/rule  vs sort  reports")
    for r in results["compile"]:
        yield (f"{r['rules']:>7} {r['intervals']:>9} {r['floor_sort_s'] * 1e3:>8.2f} ms"
               f" {r['compile_s'] * 1e3:>10.1f} ms {r['compile_us_per_rule']:>9.1f} {r['compile_vs_sort']:>7.0f}x"
               f" {r['compile_cpu_s'] * 1e3:>6.0f} ms ({r['compile_best_s'] * 1e3:.0f} ms)"
               f" {r['refuse_s'] * 1e3:>13.1f} ms {r['refuse_us_per_rule']:>8.1f} {r['refuse_vs_sort']:>7.0f}x"
               f" {r['refused_reports']:>8}")
    for r in results["compile"]:
        if r["rules"] == 10_000:
            verdict = "well under a second" if r["compile_s"] < 0.5 else "NOT well under a second"
            yield (f"10000 rules compile in {r['compile_s']:.3f} s (median wall; best {r['compile_best_s']:.3f} s, "
                   f"CPU {r['compile_cpu_s']:.3f} s): {verdict}")
    y = results.get("yaml")
    if y:
        yield ""
        yield (f"load_config, {y['rules']} rules ({y['bytes'] / 1e6:.1f} MB of YAML): {y['load_config_s']:.2f} s"
               f" (median); on average YAML {y['yaml_s']:.2f} s + compile {y['compile_s']:.3f} s"
               f" + the rest (settings, handlers, parse_rule) {y['rest_s']:.2f} s")
    if results.get("loop"):
        yield ""
        yield f"event-loop lateness of a {PERIOD * 1e3:.0f} ms ticker while that file loads:"
        for r in results["loop"]:
            yield (f"  {r['mode']:<14} load {r['load_s']:6.2f} s   max late {r['max_late_ms']:8.1f} ms   "
                   f"p99 {r['p99_late_ms']:6.1f} ms   ({r['ticks']} ticks; longest of {r['gc_runs']} GC runs "
                   f"{r['max_gc_ms']:.1f} ms)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000",
                    help="rule counts to compile, comma-separated\n(default: %(default)s)")
    ap.add_argument("--big", action="store_true", help="also 50000 rules")
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs per measurement, median reported\n(default: %(default)s)")
    ap.add_argument("--yaml-rules", type=int, default=10_000,
                    help="rules in the load_config file\n(default: %(default)s)")
    ap.add_argument("--loop-runs", type=int, default=1,
                    help="event-loop runs per mode, the median (by max lateness)\nreported (default: %(default)s)")
    ap.add_argument("--skip-yaml", action="store_true", help="only compile_rules, no YAML file, no event loop")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([50_000] if args.big else [])
    results: dict[str, Any] = {"compile": [bench_compile(n, args.seed, args.repeat) for n in sizes]}
    if not args.skip_yaml:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.yaml"
            path.write_text(to_yaml(generate(args.yaml_rules, args.seed)))
            sock = str(Path(tmp) / "vm.sock")
            try:
                results["yaml"] = bench_yaml(path, args.yaml_rules, args.seed, max(1, args.repeat // 2), sock)
            except ConfigError as err:
                raise SystemExit(f"the generated YAML does not load:\n{err}") from err
            results["loop"] = bench_loop(path, sock, args.loop_runs)
    print(json.dumps(results, indent=2) if args.json else "\n".join(rows(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
