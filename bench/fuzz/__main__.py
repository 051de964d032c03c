"""Coverage-guided fuzzing of every parser that reads untrusted input: the VMM
wire decoder, the config loader, and the handlers' guest-facing parsers.

    .venv/bin/python -m bench.fuzz                 # 10^6 inputs over all targets
    .venv/bin/python -m bench.fuzz --short         # CI's budget: a smoke run of the same targets
    .venv/bin/python -m bench.fuzz --targets wire --runs 500000

Each target runs under atheris (libFuzzer) in its own process
(``bench.fuzz.worker``), from a seed corpus of valid inputs plus the corpus
earlier runs grew (kept in ``$HVCPROXYD_CACHE/fuzz/<target>``, outside the
repo).  An input that crashes a target (an exception its interface does not
document, a broken invariant, a hang past ``--timeout`` or memory past
``--rss-mb``) is copied to ``bench/fuzz/regressions/<target>/``, where
``tests/test_fuzz_regressions.py`` replays it on every test run: commit it
with the fix.  Exits 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REGRESSIONS = HERE / "regressions"
#: How the full budget of 10^6 inputs is shared: a config load costs ~20x a frame decode.
SHARES = {"wire": 0.25, "memshare": 0.2, "state": 0.15, "ffa-descriptor": 0.15, "optee-arg": 0.1,
          "optee-pagelist": 0.1, "config": 0.05}
FULL_BUDGET = 1_000_000
SHORT_BUDGET = 20_000


@dataclass
class Outcome:
    target: str
    runs: int
    seconds: float
    coverage: str
    crash: Path | None
    why: str = ""

    @property
    def rate(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0


def cache_dir() -> Path:
    return Path(os.environ.get("HVCPROXYD_CACHE", Path.home() / ".cache" / "hvcproxyd")) / "fuzz"


def fuzz(target: str, runs: int, *, timeout_s: int, rss_mb: int) -> Outcome:
    corpus = cache_dir() / target
    corpus.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"hvcproxyd-fuzz-{target}-") as tmp:
        seeds, artifacts = Path(tmp) / "seeds", Path(tmp) / "artifacts"
        seeds.mkdir()
        artifacts.mkdir()
        for i, seed in enumerate(TARGETS[target].seeds()):
            (seeds / f"seed-{i}").write_bytes(seed)
        for old in sorted((REGRESSIONS / target).glob("*")):  # what broke before is where to look again
            shutil.copy(old, seeds / f"regression-{old.name}")
        cmd = [sys.executable, "-m", "bench.fuzz.worker", target, f"-runs={runs}", f"-timeout={timeout_s}",
               f"-rss_limit_mb={rss_mb}", "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
               str(corpus), str(seeds)]
        print(f"[fuzz] {target}: {runs:,} inputs", file=sys.stderr, flush=True)
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, errors="replace", check=False)
        seconds = time.monotonic() - start
        log = proc.stdout + proc.stderr
        executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
        cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
        outcome = Outcome(target, int(executed.group(1)) if executed else 0, seconds,
                          f"{cov[-1][0]} edges, {cov[-1][1]} features" if cov else "?", None)
        found = sorted(artifacts.iterdir())
        if proc.returncode != 0 or found:
            keep = REGRESSIONS / target
            keep.mkdir(parents=True, exist_ok=True)
            if found:
                outcome.crash = keep / found[0].name
                shutil.copy(found[0], outcome.crash)
            outcome.why = _reason(log) or f"worker exited {proc.returncode}"
            (cache_dir() / f"{target}.last-crash.log").write_text(log)
        return outcome


def _reason(log: str) -> str:
    """The line of libFuzzer's or atheris's report that says what happened."""
    for pattern in (r"=== Uncaught Python exception: ===\n(?:Traceback[^\n]*\n(?:\s+[^\n]*\n)*)?([^\n]+)",
                    r"==\d+== ERROR: libFuzzer: ([^\n]+)"):
        found = re.search(pattern, log)
        if found:
            return found.group(1).strip()
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated (default: %(default)s)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, help="inputs per target (default: 10^6 shared over the targets)")
    budget.add_argument("--short", action="store_true", help=f"{SHORT_BUDGET:,} inputs shared over the targets")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take (default: %(default)s)")
    parser.add_argument("--rss-mb", type=int, default=2048, help="memory a worker may use (default: %(default)s)")
    args = parser.parse_args()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    total = SHORT_BUDGET if args.short else FULL_BUDGET
    weight = sum(SHARES.get(n, 0.1) for n in names)
    outcomes = [fuzz(n, args.runs or max(1, round(total * SHARES.get(n, 0.1) / weight)),
                     timeout_s=args.timeout, rss_mb=args.rss_mb) for n in names]
    print("| target | inputs | inputs/s | coverage | crashes |")
    print("|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.target} | {o.runs:,} | {o.rate:,.0f} | {o.coverage} | {0 if not o.why else 1} |")
    print(f"total: {sum(o.runs for o in outcomes):,} inputs in {sum(o.seconds for o in outcomes):.0f} s")
    crashed = [o for o in outcomes if o.why]
    for o in crashed:
        print(f"CRASH {o.target}: {o.why}; input {o.crash or '(none written)'}; "
              f"log {cache_dir() / (o.target + '.last-crash.log')}", file=sys.stderr)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
