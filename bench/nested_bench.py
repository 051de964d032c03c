"""Under KVM, in the nested tier: what forwarding a call to hvcproxyd costs.

L2 runs ``integration/guests/timing.S`` (``timing-short.elf``: 300 timed calls
of each) under L1's KVM (integration/nested/): PSCI_VERSION, forwarded to
hvcproxyd on this machine through L1's QEMU, its second UART, L0 and the line
adapter; then SMCCC_VERSION, which KVM answers in the kernel.  Both are timed by
the guest with the generic timer in the same run, so the ratio needs no other
floor; this tier is slow by nature (every forwarded byte crosses an emulated
UART), the figure says what the round trip costs against a call that exits to
the host kernel and no further.

Usage: .venv/bin/python bench/nested_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "integration" / "tests"), str(REPO / "integration" / "nested")]
from nested import L1Host, build_l1, line_adapter  # noqa: E402
from qemu_harness import GUESTS_CONFIG, _run_build  # noqa: E402

from tests.process import DaemonProcess  # noqa: E402

LINE = re.compile(r"^(TIMING|TIMING_LOCAL) calls=0x([0-9a-f]+) ticks=0x([0-9a-f]+) freq=0x([0-9a-f]+)"
                  r" x0=0x([0-9a-f]+)", re.MULTILINE)
L2 = ("timeout 600 qemu-system-aarch64 -M virt -accel kvm -cpu host -m 128 -nodefaults -no-user-config"
      " -display none -monitor none -nic none -serial mon:stdio -chardev serial,id=fw,path=/dev/ttyAMA1"
      " -object hvc-forwarder,id=hf0,chardev=fw,vm-name=guests -kernel /l2/guests/timing-short.elf")


def per_call_us(out: str) -> dict[str, float]:
    """µs per call of each timed loop, as the guest measured it."""
    found = {m[1]: int(m[3], 16) / int(m[4], 16) / int(m[2], 16) * 1e6 for m in LINE.finditer(out)}
    if set(found) != {"TIMING", "TIMING_LOCAL"}:
        raise SystemExit(f"the guest did not print both timings:\n{out[-3000:]}")
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    qemu = _run_build("qemu/build.sh")
    image = build_l1(_run_build("nested/build-qemu-arm64.sh"))
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="hvc-nested-", dir="/tmp") as tmpdir:
        tmp = Path(tmpdir)
        line = tmp / "line.sock"
        with line_adapter(line, tmp / "vm.sock", tmp / "adapter.log") as sock, \
                DaemonProcess(GUESTS_CONFIG, socket=sock, log_path=tmp / "daemon.log") as daemon, \
                L1Host(qemu, image, tmp, line=line) as l1:
            daemon.wait_listening()
            for i in range(args.rounds):
                status, out = l1.run(L2, timeout=700)
                if status:
                    raise SystemExit(f"L2 exited with {status}:\n{out[-3000:]}")
                rounds.append(per_call_us(out))
                print(f"# round {i + 1}: {rounds[-1]}", file=sys.stderr)
    fwd = statistics.median(r["TIMING"] for r in rounds)
    local = statistics.median(r["TIMING_LOCAL"] for r in rounds)
    ratio = statistics.median(r["TIMING"] / r["TIMING_LOCAL"] for r in rounds)
    print("| answered by (L2 under L1's KVM) | µs per call (guest's timer) | vs KVM |\n|---|---|---|")
    print(f"| KVM in L1's kernel (SMCCC_VERSION) | {local:.1f} | 1.00x |")
    print(f"| hvcproxyd through the line (PSCI_VERSION) | {fwd:.1f} | {ratio:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
