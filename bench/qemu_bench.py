"""Through real QEMU (TCG): a guest times PSCI_VERSION calls with the generic timer.

Three machines boot the same guest (``integration/guests/timing.S``: 100
warm-up calls, then 20 000 timed by CNTVCT_EL0) in each round:

- ``stock``: no forwarder, QEMU's own PSCI answers (for scale);
- ``floor``: the patched QEMU's hvc-forwarder to the C echo floor of
  callpath_bench (it forwards PSCI_VERSION only and answers with a REPLY of
  hvcproxyd's size);
- ``hvcproxyd``: the same forwarder to ``hvcproxyd run`` with the psci handler.

Each figure is µs per call as the guest measured it; hvcproxyd's is also a
ratio to the floor of the same round (target ≤ 1.5x).  Builds the patched
QEMU and the guests through integration/ (cached), the C floor with gcc.

Usage: .venv/bin/python bench/qemu_bench.py [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: the repository root, for bench.*
from bench import callpath_bench as cb  # noqa: E402

INTEGRATION = HERE.parent / "integration"
TIMING = re.compile(r"^TIMING calls=0x([0-9a-f]+) ticks=0x([0-9a-f]+) freq=0x([0-9a-f]+) x0=0x([0-9a-f]+)",
                    re.MULTILINE)
PSCI_1_1 = 0x10001


def built(script: str) -> Path:
    """An integration build script's artifact (it prints the path last)."""
    out = subprocess.run([str(INTEGRATION / script)], check=True, capture_output=True, text=True, timeout=3600)
    return Path(out.stdout.strip().splitlines()[-1])


def guest_run(qemu: Path, guest: Path, forwarder: Path | None) -> float:
    """µs per call as the guest timed them."""
    argv = [str(qemu), "-M", "virt", "-cpu", "max", "-m", "256M", "-nodefaults", "-no-user-config",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-nic", "none", "-kernel", str(guest)]
    if forwarder is not None:
        argv += ["-chardev", f"socket,id=hvc0,path={forwarder},reconnect-ms=200",
                 "-object", "hvc-forwarder,id=hf0,chardev=hvc0,vm-name=bench"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    m = TIMING.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"guest run failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    calls, ticks, freq, x0 = (int(g, 16) for g in m.groups())
    if x0 != PSCI_1_1:
        raise SystemExit(f"PSCI_VERSION answered {x0:#x}, not {PSCI_1_1:#x}")
    return ticks / freq / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one round")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    qemu, guest = built("qemu/build.sh"), built("guests/build.sh") / "timing.elf"
    with tempfile.TemporaryDirectory(prefix="hvc-qemu-", dir="/tmp") as tmpdir:
        tmp = Path(tmpdir)
        _driver, floor = cb.build(tmp)
        cfg, dsock, fsock = tmp / "bench.yaml", tmp / "d.sock", tmp / "f.sock"
        cfg.write_text(cb.CONFIG.format(sock=dsock, stream=tmp / "stream.sock"))
        res: dict[str, list[float]] = {"stock": [], "floor": [], "hvcproxyd": []}
        with cb.server([str(floor), str(fsock)], fsock, "the echo floor", tmp / "floor.log"), \
                cb.server([sys.executable, "-m", "hvcproxyd", "run", str(cfg), "--socket", str(dsock)], dsock,
                          "hvcproxyd", tmp / "daemon.log"):
            for i in range(rounds):
                res["stock"].append(guest_run(qemu, guest, None))
                res["floor"].append(guest_run(qemu, guest, fsock))
                res["hvcproxyd"].append(guest_run(qemu, guest, dsock))
                print(f"# round {i + 1} done", file=sys.stderr)
    ratio = statistics.median(d / f for d, f in zip(res["hvcproxyd"], res["floor"], strict=True))
    print("| answered by | µs per call (guest's timer) | vs floor |\n|---|---|---|")
    for name, values in res.items():
        rel = statistics.median(v / f for v, f in zip(values, res["floor"], strict=True))
        print(f"| {name} | {statistics.median(values):.1f} | {rel:.2f}x |")
    print(f"\nhvcproxyd / floor behind the same forwarder: {ratio:.2f}x (target ≤ 1.5x): "
          + ("met" if ratio <= 1.5 else "missed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
