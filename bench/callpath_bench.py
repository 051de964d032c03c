"""The per-call path: hvcproxyd against a C echo floor, both driven by the same C VMM.

One command builds ``bench/c/`` with gcc (a VMM driver that speaks the wire
protocol as patched QEMU does, and an echo server that answers every CALL with
a REPLY of the same size and nothing else), starts the echo floor and
``hvcproxyd run`` side by side, and measures, in rounds that alternate floor and
daemon so both see the same machine:

- 1 vCPU round trip p50/p99/p99.9 for PSCI_VERSION, AFFINITY_INFO and MEM_SHARE+UNSHARE,
  and an FF-A direct message (DIRECT_REQ2 to the echo partition: x0..x17 both ways);
- throughput with 1, 2, 4 and 8 vCPUs, each with one call in flight;
- fairness: a vCPU calling every 250 µs and every 1 ms, alone and with seven
  vCPUs flooding.  One that asks for at most its eighth of what the daemon
  serves under the flood (measured in the run) is quiet: its p99 flooded must
  stay within 2x of its p99 alone.  One that asks for more cannot keep its
  latency under any fair policy: it must get its eighth (share ≥ 0.9);
- the Python simulator's own cost (it against the C driver, both on the floor);
- the rule table (``rules_bench``): compile and lookup at 10, 1k and 10k rules.

Every daemon figure is a ratio to the floor's figure from the same round (the
median over rounds is shown).  When a target is missed, the daemon runs once
more under cProfile and the top of its profile is printed.

So that the driver never decides a figure, the servers (floor and daemon, one
at a time) run pinned to one CPU and the driver to the others, and in the
fairness cases the driver's I/O thread and its quiet vCPU run SCHED_FIFO while
the flooders stay SCHED_OTHER (see bench/c/vmm_driver.c; refused: said so,
and run without).  The floor's own flooded/alone ratio is the check that this
holds: it is printed, and a run where it is above the target is flagged.

Usage: .venv/bin/python bench/callpath_bench.py [--quick] [--rounds 3] [--seconds 1.0] [--profile] [--json]
                                                [--only fairness] [--no-pin]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from hvcproxyd import wire
from hvcproxyd.vmm.simulator import Simulator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: the repository root, for bench.*
from bench import rules_bench  # noqa: E402

PSCI_VERSION = 0x8400_0000
#: Frame sizes the C programs hard-code (bench/c/proto.h); checked against the codec.
CALL_FRAME, REPLY_FRAME = 168, 56
QUIET_PERIOD_US = 250
#: A second quiet vCPU, every 1 ms.  Which of the two is quiet (asks for at most its
#: eighth of what the daemon serves under the flood) is measured in the run, and
#: decides its target (see table() and bench/README.md).
QUIET_SLOW_US = 1000
TARGETS = {"p50": 1.5, "p99": 2.0, "tput8": 0.8, "fair": 2.0, "fair_share": 0.9}

CONFIG = """\
vm: bench
socket: {sock}
handler_timeout_ms: 1000
versions: {{psci: "1.1"}}
handlers:
  psci: {{type: psci}}
  memshare:
    type: pkvm-memshare
    options: {{socket: {stream}}}
  ffa:
    type: ffa
    options:
      id: 1
      partitions:
        echo: {{type: echo, id: 0x8001, uuids: [a8f3b9e2-5b9c-4c7d-9f0e-3c8e2d6b1a01]}}
rules:
  - {{match: psci, conduit: any, action: psci}}
  - {{match: kvm-vendor, action: memshare}}
  - {{match: ffa, action: ffa}}
"""


# ------------------------------------------------------------------ the programs

def build(out: Path) -> tuple[Path, Path]:
    """gcc the driver and the floor; the sizes they hard-code must be the codec's."""
    call = wire.Call(1, 0, PSCI_VERSION, (0,) * wire.N_ARGS)
    reply = wire.Reply(1, 0, (0, 0, 0, 0))
    if (len(wire.encode(call)), len(wire.encode(reply))) != (CALL_FRAME, REPLY_FRAME):
        raise SystemExit("bench/c/proto.h no longer matches hvcproxyd/wire.py's frame sizes")
    driver, floor = out / "vmm_driver", out / "echo_floor"
    for exe, src, extra in ((driver, "vmm_driver.c", ["-pthread"]), (floor, "echo_floor.c", [])):
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", *extra, "-o", str(exe), str(HERE / "c" / src)],
                       check=True)
    return driver, floor


def wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.02)


def cpu_split(pin: bool) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(the servers' CPU, the driver's CPUs): the lowest CPU this process may use for
    the server, the rest for the driver; (None, None) with fewer than two."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return frozenset(cpus[:1]), frozenset(cpus[1:])


#: SCHED_FIFO priority of the servers with --rt-servers (the driver's threads: 10 and 11, on other CPUs).
SERVER_RT_PRIO = 5


def _pinned(cpus: frozenset[int] | None, rt: bool = False) -> Any:
    """A preexec_fn: the child on those CPUs and, with rt, SCHED_FIFO (refused: said on its stderr)."""
    if cpus is None and not rt:
        return None

    def setup() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if rt:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(SERVER_RT_PRIO))
            except OSError as e:
                os.write(2, f"callpath_bench: SCHED_FIFO refused ({e}): the server runs SCHED_OTHER\n".encode())
    return setup


@contextlib.contextmanager
def server(argv: list[str], sock: Path, what: str, log: Path,
           cpus: frozenset[int] | None = None, rt: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        # Not in the repository: ``python -m`` puts the working directory first on
        # the path, which would shadow a PYTHONPATH tree being timed.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                preexec_fn=_pinned(cpus, rt))
    try:
        wait_socket(sock, proc, what)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Rig:
    driver: Path
    floor_sock: Path
    daemon_sock: Path
    seconds: float
    warmup: float
    #: The driver's CPUs (None: wherever the kernel puts it).
    cpus: frozenset[int] | None = None

    def run(self, target: str, *, vcpus: int = 1, kind: str = "version", quiet: int = 0,
            flooders: int | None = None, rt: bool = False) -> dict[str, float]:
        sock = self.floor_sock if target == "floor" else self.daemon_sock
        argv = [str(self.driver), "-s", str(sock), "-n", str(vcpus), "-k", kind, "-t", str(self.seconds),
                "-w", str(self.warmup)]
        if quiet:
            argv += ["-q", str(quiet)]
        if flooders is not None:
            argv += ["-F", str(flooders)]
        if rt:
            argv += ["-R"]
        if target == "daemon" and kind in ("version", "memshare", "affinity", "ffa"):
            argv += ["-x", "1" if kind in ("version", "ffa") else "0"]  # the daemon's answers are checked
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=self.seconds * 4 + 30,
                             preexec_fn=_pinned(self.cpus))
        res: dict[str, float] = json.loads(out.stdout)
        if res["bad"]:
            raise SystemExit(f"{target} {kind}: {res['bad']} calls got a wrong answer")
        if rt and res["rt"] != 1:
            print(f"# {target}: the driver was refused SCHED_FIFO ({out.stderr.strip()}): this fairness figure "
                  "is the driver's scheduling as much as the server's", file=sys.stderr)
        res["rate"] = res["calls"] / res["seconds"]
        if quiet and flooders:  # vCPU 0's calls against each flooder's: its share of what was served
            res["share"] = res["vcpu0_calls"] / max(1.0, (res["calls"] - res["vcpu0_calls"]) / flooders)
        return res


# ------------------------------------------------------------------ the cases

#: (row name, run kwargs, figures) measured on both targets each round.
CASES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("PSCI_VERSION, 1 vCPU", {"kind": "version"}, ("p50", "p99", "p999", "rate")),
    ("AFFINITY_INFO, 1 vCPU", {"kind": "affinity", "vcpus": 2, "flooders": 1}, ("p50", "p99", "p999", "rate")),
    ("MEM_SHARE+UNSHARE, 1 vCPU", {"kind": "memshare"}, ("p50", "p99", "p999", "rate")),
    ("FF-A DIRECT_REQ2 x0..x17 (1 vCPU; no target)", {"kind": "ffa"}, ("p50", "p99", "p999", "rate")),
    *((f"PSCI_VERSION, {n} vCPUs", {"kind": "version", "vcpus": n}, ("rate",)) for n in (2, 4, 8)),
]
#: (quiet vCPU's period, the name of its cases): "<name> alone" and "<name>, 7 flooding".
FAIRNESS = [(QUIET_PERIOD_US, "quiet vCPU"), (QUIET_SLOW_US, f"quiet vCPU ({QUIET_SLOW_US} µs)")]
CASES += [(f"{name}{suffix}", {"vcpus": 8, "quiet": p, "flooders": f, "rt": True},
           ("p50", "p99", "drv_p99", *(("rate", "share") if f else ())))
          for p, name in FAIRNESS for suffix, f in ((" alone", 0), (", 7 flooding", 7))]


@dataclass
class Results:
    rounds: list[dict[str, dict[str, dict[str, float]]]] = field(default_factory=list)

    def median(self, case: str, target: str, figure: str) -> float:
        return statistics.median(r[case][target][figure] for r in self.rounds)

    def ratio(self, case: str, figure: str) -> float:
        """Median over rounds of daemon/floor, each pair from the same round."""
        return statistics.median(r[case]["daemon"][figure] / r[case]["floor"][figure] for r in self.rounds)


def simulator_cost(sock: Path, seconds: float) -> dict[str, float]:
    """The Python simulator's round trip on the floor: what bench/ measured before
    this C driver, reported apart so it is never mixed into a daemon figure."""
    lat: list[float] = []

    async def prog(cpu: Any, _x0: int) -> None:
        end = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < end:
            await cpu.call(PSCI_VERSION)
            lat.append(time.perf_counter() - t0)

    async def main() -> None:
        sim = Simulator(sock, n_vcpus=1, name="bench", boot=prog)
        try:
            await sim.run(timeout=seconds + 30)
        finally:
            sim.close()

    trio.run(main)
    lat.sort()
    return {"p50": lat[len(lat) // 2] * 1e6, "calls": len(lat), "rate": len(lat) / seconds}


def rules_figures(quick: bool) -> list[dict[str, Any]]:
    out = []
    for n in (10, 1000, 10_000):
        c = rules_bench.bench_compile(n, 1, 1 if quick else 3)
        c.update(rules_bench.bench_lookup(n, 1, 20_000 if quick else 100_000))
        out.append(c)
    return out


_START_UP = ("builtins.exec", "__build_class__", "posix.stat", "marshal.loads", "builtins.compile", "io.open_code",
             "_io.BufferedReader", "posix.listdir", "_imp.")


def profile_daemon(rig: Rig, cfg: Path, sock: Path, tmp: Path) -> str:
    """One 1-vCPU and one 8-vCPU run under cProfile: where the daemon's time goes."""
    prof = tmp / "daemon.prof"
    argv = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "hvcproxyd", "run", str(cfg),
            "--socket", str(sock)]
    profiled = dataclasses.replace(rig, daemon_sock=sock)
    with server(argv, sock, "hvcproxyd under cProfile", tmp / "profile.log"):
        r1 = profiled.run("daemon")
        r8 = profiled.run("daemon", vcpus=8)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    # Every call the daemon answered, warm-up included (the driver counts only the window).
    calls = max((nc for (file, _line, fn), (_cc, nc, *_rest) in raw.items()
                 if fn == "dispatch" and file.endswith("service.py")), default=r1["calls"] + r8["calls"])
    # The per-call path only: functions called at least once per 10 calls, less what
    # start-up does (a short run makes few calls); cProfile's times are wall and its
    # overhead inflates them, so read the shares, not the absolute µs.
    rows = sorted(((tt, nc, ct, f"{Path(file).name}:{line}({fn})" if file != "~" else fn)
                   for (file, line, fn), (_cc, nc, tt, ct, _callers) in raw.items()
                   if nc * 10 >= calls and not any(s in fn for s in _START_UP)),
                  reverse=True)[:16]
    total = sum(tt for tt, *_ in rows)
    out = [f"cProfile of hvcproxyd over {calls:,} calls (a 1-vCPU and an 8-vCPU run), per call:",
           "| function | calls per call | own µs | incl. µs | share of the listed own time |",
           "|---|---|---|---|---|"]
    out += [f"| {name} | {nc / calls:.1f} | {tt / calls * 1e6:.1f} | {ct / calls * 1e6:.1f} | {tt / total:.0%} |"
            for tt, nc, ct, name in rows]
    return "\n".join(out)


# ------------------------------------------------------------------ output

def table(res: Results, sim: dict[str, float], rules: list[dict[str, Any]],
          cases: list[tuple[str, dict[str, Any], tuple[str, ...]]] = CASES) -> tuple[list[str], list[str]]:
    lines = ["| case | figure | floor | hvcproxyd | ratio | target |", "|---|---|---|---|---|---|"]
    missed = []
    for case, _kw, figures in cases:
        for fig in figures:
            f, d, r = res.median(case, "floor", fig), res.median(case, "daemon", fig), res.ratio(case, fig)
            unit = {"rate": "calls/s", "share": "vCPU 0's calls / a flooder's"}.get(fig, "µs")
            target = ""
            if case.endswith(", 1 vCPU") and fig in ("p50", "p99"):
                target = f"≤ {TARGETS[fig]}x"
                if r > TARGETS[fig]:
                    missed.append(f"{case} {fig}")
            elif case == "PSCI_VERSION, 8 vCPUs":
                target = f"≥ {TARGETS['tput8']}x"
                if r < TARGETS["tput8"]:
                    missed.append(f"{case} throughput")
            lines.append(f"| {case} | {fig} ({unit}) | {f:,.1f} | {d:,.1f} | {r:.2f}x | {target} |")
    for period, name in FAIRNESS:
        if f"{name} alone" not in res.rounds[0]:
            continue
        fair = fairness(res, name)
        # Which target applies is measured, not chosen: a vCPU that asks for at most
        # its eighth of what the daemon served under the flood is quiet, and must
        # keep its latency (≤ 2x alone); one that asks for more cannot, under any
        # fair policy, and must get its eighth (share ≥ 0.9 of a flooder's).
        served = res.median(f"{name}, 7 flooding", "daemon", "rate")
        share = res.median(f"{name}, 7 flooding", "daemon", "share")
        quiet = 1e6 / period <= served / 8
        if quiet:
            target = f"≤ {TARGETS['fair']}x (hvcproxyd; asks {1e6 / period:,.0f}/s ≤ its eighth, {served / 8:,.0f}/s)"
        else:
            target = (f"none: asks {1e6 / period:,.0f}/s > its eighth ({served / 8:,.0f}/s); "
                      f"its share must be ≥ {TARGETS['fair_share']} of a flooder's: {share:.2f}")
        # The ratio column: how much less fair than the floor on the same machine (the
        # floor's own figure is the driver and the CPUs, which no server can beat).
        lines.append(f"| fairness, every {period} µs | quiet p99 flooded / alone | {fair['floor']:.2f}x | "
                     f"{fair['daemon']:.2f}x | {fair['daemon'] / fair['floor']:.2f}x | {target} |")
        if quiet and fair["daemon"] > TARGETS["fair"]:
            missed.append(f"fairness every {period} µs")
        if not quiet and share < TARGETS["fair_share"]:
            missed.append(f"fair share every {period} µs")
        if fair["floor"] > TARGETS["fair"]:
            missed.append(f"fairness every {period} µs: the floor's own ratio is {fair['floor']:.2f}x, so the driver "
                          "or the machine, not the server, decided this run")
    if "PSCI_VERSION, 1 vCPU" not in res.rounds[0]:
        return lines, missed
    c_p50 = res.median("PSCI_VERSION, 1 vCPU", "floor", "p50")
    lines += ["", "| Python simulator on the floor | p50 | C driver p50 | ratio |", "|---|---|---|---|",
              f"| PSCI_VERSION, 1 vCPU | {sim['p50']:.1f} µs | {c_p50:.1f} µs | {sim['p50'] / c_p50:.2f}x |"]
    small = rules[0]
    lines += ["", "| rules | intervals | compile | vs sort | lookup | lookup vs 10 rules |",
              "|---|---|---|---|---|---|"]
    for row in rules:
        ratio = row["lookup_ns"] / small["lookup_ns"]
        lines.append(f"| {row['rules']:,} | {row['intervals']:,} | {row['compile_s'] * 1e3:.1f} ms | "
                     f"{row['compile_vs_sort']:.0f}x | {row['lookup_ns']:.0f} ns | {ratio:.2f}x |")
        if row["rules"] == 10_000:
            if row["compile_s"] >= 1.0:
                missed.append("10k rules compile")
            if ratio >= 2.0:
                missed.append("10k rules lookup")
    return lines, missed


def fairness(res: Results, name: str) -> dict[str, float]:
    """Per target, the median over rounds of the quiet vCPU's p99 flooded / alone."""
    return {t: statistics.median(r[f"{name}, 7 flooding"][t]["p99"] / r[f"{name} alone"][t]["p99"]
                                 for r in res.rounds)
            for t in ("floor", "daemon")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round (a smoke run, ~15 s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="measured time per run")
    ap.add_argument("--profile", action="store_true", help="profile the daemon even if every target is met")
    ap.add_argument("--no-profile", action="store_true", help="never profile")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", choices=["fairness"], help="only the fairness cases (no simulator, rules or profile)")
    ap.add_argument("--no-pin", action="store_true", help="leave the servers and the driver unpinned")
    ap.add_argument("--rt-servers", action="store_true",
                    help="the floor and the daemon SCHED_FIFO too: other work on the machine cannot preempt them")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, min(args.seconds, 0.3)
    warmup = min(0.2, args.seconds / 3)
    with tempfile.TemporaryDirectory(prefix="hvc-callpath-") as tmpdir:
        tmp = Path(tmpdir)
        driver, floor = build(tmp)
        cfg = tmp / "bench.yaml"
        daemon_sock, floor_sock = tmp / "daemon.sock", tmp / "floor.sock"
        cfg.write_text(CONFIG.format(sock=daemon_sock, stream=tmp / "stream.sock"))
        server_cpus, driver_cpus = cpu_split(not args.no_pin)
        rig = Rig(driver, floor_sock, daemon_sock, args.seconds, warmup, driver_cpus)
        res = Results()
        daemon_argv = [sys.executable, "-m", "hvcproxyd", "run", str(cfg), "--socket", str(daemon_sock)]
        pins = (f"servers on CPU {sorted(server_cpus)}, driver on CPUs {sorted(driver_cpus)}"
                if server_cpus and driver_cpus else "unpinned")
        if args.rt_servers:
            pins += "; servers SCHED_FIFO"
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"# tree: {Path(wire.__file__).parent.parent}; {args.rounds} round(s) of {args.seconds} s per run; "
              f"{pins}; load average {load}", file=sys.stderr)
        cases = [c for c in CASES if not args.only or c[1].get("quiet")]
        rts = args.rt_servers
        with server([str(floor), str(floor_sock)], floor_sock, "the echo floor", tmp / "floor.log", server_cpus, rts), \
                server(daemon_argv, daemon_sock, "hvcproxyd", tmp / "daemon.log", server_cpus, rts):
            for i in range(args.rounds):
                rnd: dict[str, dict[str, dict[str, float]]] = {}
                for case, kw, _figs in cases:
                    rnd[case] = {t: rig.run(t, **kw) for t in ("floor", "daemon")}
                res.rounds.append(rnd)
                print(f"# round {i + 1} done", file=sys.stderr)
            sim = {} if args.only else simulator_cost(floor_sock, args.seconds)
        rules = [] if args.only else rules_figures(args.quick)
        lines, missed = table(res, sim, rules, cases)
        if args.json:
            print(json.dumps({"rounds": res.rounds, "simulator": sim, "rules": rules, "missed": missed}, indent=1))
        else:
            print("\n".join(lines))
            print("\ntargets missed: " + (", ".join(missed) if missed else "none"), flush=True)
        if not args.no_profile and not args.only and (args.profile or (missed and not args.quick)):
            profile = profile_daemon(rig, cfg, tmp / "profiled.sock", tmp)
            print("\nwhere the daemon's time goes (targets missed or --profile):\n" + profile,
                  file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
