"""What durable state costs per call: each fsync policy against no journal.

Four ``hvcproxyd run`` daemons serve the same config (callpath_bench's), one
without a ``state:`` section (the floor) and one per policy (``never``,
``batch``, ``always``), each with its state directory on the same file system;
the C VMM driver of callpath_bench makes the same calls to each in turn, round
after round, so every ratio pairs figures from the same moment:

- PSCI_VERSION, 1 vCPU: a call that changes nothing, so it must cost no write
  (ratio ~1);
- MEM_SHARE+UNSHARE, 1 vCPU: every call a journal record (and, but for
  ``never``, an fsync before its reply);
- MEM_SHARE+UNSHARE, 8 vCPUs: throughput, where ``batch`` shares one fsync
  among the calls that finish together (group commit).

Usage: .venv/bin/python bench/journal_bench.py [--quick] [--rounds 3] [--seconds 1.0] [--dir DIR] [--json]

``--dir`` puts the state directories on another file system (the fsync cost
is the disk's: tmpfs makes it nearly free, a real disk does not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: the repository root, for bench.*
from bench.callpath_bench import CONFIG, Rig, build, server  # noqa: E402

POLICIES = ("never", "batch", "always")
TARGETS = ("none", *POLICIES)
CASES: list[tuple[str, dict[str, object], tuple[str, ...]]] = [
    ("PSCI_VERSION, 1 vCPU", {"kind": "version"}, ("p50", "rate")),
    ("MEM_SHARE+UNSHARE, 1 vCPU", {"kind": "memshare"}, ("p50", "p99", "rate")),
    ("MEM_SHARE+UNSHARE, 8 vCPUs", {"kind": "memshare", "vcpus": 8}, ("rate",)),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="measured time per run")
    ap.add_argument("--dir", type=Path, help="where the state directories go (default: the temporary directory)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, min(args.seconds, 0.3)
    with tempfile.TemporaryDirectory(prefix="hvc-journal-") as tmpdir:
        tmp = Path(tmpdir)
        state_base = (args.dir or tmp) / f"hvc-journal-state-{Path(tmpdir).name}"
        driver, _floor = build(tmp)
        rigs: dict[str, Rig] = {}
        with contextlib.ExitStack() as stack:
            for target in TARGETS:
                sock = tmp / f"{target}.sock"
                cfg = tmp / f"{target}.yaml"
                text = CONFIG.format(sock=sock, stream=tmp / f"{target}.stream")
                if target != "none":
                    text += f"state: {{dir: {state_base / target}, fsync: {target}}}\n"
                cfg.write_text(text)
                stack.enter_context(server([sys.executable, "-m", "hvcproxyd", "run", str(cfg), "--socket", str(sock)],
                                           sock, f"hvcproxyd ({target})", tmp / f"{target}.log"))
                rigs[target] = Rig(driver, sock, sock, args.seconds, min(0.2, args.seconds / 3))
            rounds: list[dict[str, dict[str, dict[str, float]]]] = []
            for i in range(args.rounds):
                rounds.append({case: {t: rigs[t].run("daemon", **kw) for t in TARGETS}  # type: ignore[arg-type]
                               for case, kw, _figs in CASES})
                print(f"# round {i + 1} done", file=sys.stderr)
        if args.dir is not None:
            with contextlib.suppress(OSError):
                for path in sorted(state_base.rglob("*"), reverse=True):
                    path.rmdir() if path.is_dir() else path.unlink()
                state_base.rmdir()
    if args.json:
        print(json.dumps(rounds, indent=1))
        return 0
    print("| case | figure | no journal | " + " | ".join(f"{p} | {p}: ratio" for p in POLICIES) + " |")
    print("|---|---|---|" + "---|---|" * len(POLICIES))
    for case, _kw, figs in CASES:
        for fig in figs:
            base = statistics.median(r[case]["none"][fig] for r in rounds)
            cells = []
            for p in POLICIES:
                value = statistics.median(r[case][p][fig] for r in rounds)
                ratio = statistics.median(r[case][p][fig] / r[case]["none"][fig] for r in rounds)
                cells.append(f"{value:,.1f} | **{ratio:.2f}x**")
            unit = "calls/s" if fig == "rate" else "µs"
            print(f"| {case} | {fig} ({unit}) | {base:,.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
