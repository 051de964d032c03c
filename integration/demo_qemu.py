"""``./dev demo --qemu``: the same daemon as ``hvcproxyd demo``, behind the real
patched QEMU.

Boots the SMP bare-metal test guest (integration/guests/smp.S) on 4 vCPUs,
with PSCI served by hvcproxyd, printing each call the daemon answers and the
guest's own UART transcript.  It uses what ``./dev test`` (or the
integration scripts) built and says how to build it when it is missing.

Repository tooling, not part of the installed package: it needs the
repository's guests, build scripts and cache layout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from hvcproxyd.cli.demo import print_call
from hvcproxyd.config import ConfigError
from hvcproxyd.core.vmconfig import load_config
from hvcproxyd.ops.logsetup import configure
from hvcproxyd.server.daemon import Daemon

REPO = Path(__file__).resolve().parent.parent
GUEST_CONFIG = REPO / "integration" / "configs" / "guests.yaml"
BUILD_HINT = ("build it first with:\n"
              "    integration/setup.sh && integration/qemu/build.sh && integration/guests/build.sh\n"
              "(./dev test does all of this too), then run `./dev demo --qemu` again")
GUEST_TIMEOUT = 120.0


def cache_dir() -> Path:
    return Path(os.environ.get("HVCPROXYD_CACHE") or Path.home() / ".cache" / "hvcproxyd")


def find_qemu() -> Path | None:
    path = cache_dir() / "qemu" / "current" / "qemu-system-aarch64"
    return path if path.is_file() else None


def find_guests() -> Path | None:
    """The guests' build directory, from the build script (content-hash cached, seconds
    when warm); None when the cross toolchain it needs is not installed."""
    script = REPO / "integration" / "guests" / "build.sh"
    if not script.is_file() or shutil.which("aarch64-linux-gnu-gcc") is None:
        return None
    done = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    out = Path(done.stdout.strip().splitlines()[-1])
    return out if (out / "smp.elf").is_file() else None


async def _run(config_path: Path, qemu: Path, guest: Path, tmp: Path) -> int:
    socket = tmp / "vm.sock"
    config = load_config(config_path, socket=str(socket))
    daemon = Daemon(config)
    daemon.vm.observers.append(print_call)
    argv = [str(qemu), "-M", "virt", "-cpu", "max", "-smp", "4", "-m", "256M", "-nodefaults",
            "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio", "-nic", "none",
            "-chardev", f"socket,id=hvc0,path={socket},reconnect-ms=200",
            "-object", f"hvc-forwarder,id=hf0,chardev=hvc0,vm-name={config.name}",
            "-kernel", str(guest)]
    print("hvcproxyd demo: " + " ".join(argv), flush=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        with trio.move_on_after(GUEST_TIMEOUT) as scope:
            proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=None,
                                                    stdin=subprocess.DEVNULL)
            assert proc.stdout is not None
            buf = b""
            async for chunk in proc.stdout:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    print(f"  guest: {line.decode(errors='replace').rstrip()}", flush=True)
            status = await proc.wait()
        if scope.cancelled_caught:
            proc.kill()
            print(f"demo --qemu: the guest did not finish within {GUEST_TIMEOUT:.0f}s", file=sys.stderr)
            status = 1
        daemon.stop()
    return status


def run_qemu_demo(args: argparse.Namespace) -> int:
    qemu = find_qemu()
    if qemu is None:
        print(f"./dev demo --qemu: the patched QEMU is not built ({cache_dir() / 'qemu/current'} is missing);\n"
              f"{BUILD_HINT}", file=sys.stderr)
        return 1
    guests = find_guests()
    if guests is None:
        print(f"./dev demo --qemu: the test guests are not built (they need aarch64-linux-gnu-gcc);\n"
              f"{BUILD_HINT}", file=sys.stderr)
        return 1
    config_path = args.config or GUEST_CONFIG
    with tempfile.TemporaryDirectory(prefix="hvcdemo-", dir="/tmp") as tmp:  # AF_UNIX paths are short
        try:
            status = trio.run(_run, config_path, qemu, guests / "smp.elf", Path(tmp))
        except ConfigError as err:
            print(f"demo --qemu: {config_path} has errors:\n{err}", file=sys.stderr)
            return 1
    print(f"demo --qemu: QEMU exited with status {status}")
    return 0 if status == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="./dev demo --qemu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None,
                        help=f"config to serve (default: {GUEST_CONFIG.relative_to(REPO)})")
    configure("INFO", "text")
    return run_qemu_demo(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
