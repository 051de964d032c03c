"""Device-tree helper for Linux guests under QEMU's `virt` machine.

QEMU generates the guest's DTB itself, but some SMCCC clients are found only
through DT nodes QEMU never writes: OP-TEE (``linaro,optee-tz``) and the
``restricted-dma-pool`` a pKVM guest bounces its virtio DMA through.  FF-A
needs nothing: Linux discovers it through SMCCC.

:func:`build_dtb` asks QEMU for the DTB of the same machine (``-machine
dumpdtb=``, with the same ``-M``/``-cpu``/``-smp``/``-m`` and devices, so the
tree matches the one QEMU would generate), decompiles it with ``dtc``, appends
the extra nodes as DTS text (dtc merges a second ``/ { ... };`` into the
first, and ``&{/path} { ... };`` into an existing node) and compiles it
again.  Boot with ``-dtb PATH``: QEMU still fills in ``/chosen`` (bootargs,
initrd) as it does for its own tree.

Needs ``dtc`` (Debian package ``device-tree-compiler``; integration/setup.sh
installs it).  Every subprocess is bounded by a timeout.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

DTC_TIMEOUT = 60
DUMP_TIMEOUT = 60

#: QEMU virt's RAM starts here (hw/arm/virt.c, VIRT_MEM).
VIRT_RAM_BASE = 0x4000_0000

#: QEMU virt's first virtio-mmio transport and the stride between them.
VIRT_MMIO_BASE = 0x0A00_0000
VIRT_MMIO_SIZE = 0x200


def dtc() -> str:
    path = shutil.which("dtc")
    if path is None:
        pytest.fail("dtc not found: install the Debian package device-tree-compiler (integration/setup.sh does)")
    return path


def _run(argv: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish in {timeout:.0f}s: {' '.join(argv)}")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return proc


def dump_dtb(qemu_bin: Path, machine_args: Sequence[str], out: Path) -> Path:
    """QEMU's generated DTB for the machine ``machine_args`` describe (``-M virt,...`` first)."""
    args = list(machine_args)
    try:
        i = args.index("-M")
    except ValueError:
        pytest.fail(f"dump_dtb needs -M in the machine arguments: {args}")
    args[i + 1] += f",dumpdtb={out}"
    _run([str(qemu_bin), *args, "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none"],
         DUMP_TIMEOUT, "qemu dumpdtb")
    if not out.exists():
        pytest.fail(f"QEMU wrote no DTB to {out}")
    return out


def decompile(dtb: Path) -> str:
    return _run([dtc(), "-q", "-I", "dtb", "-O", "dts", str(dtb)], DTC_TIMEOUT, "dtc -I dtb").stdout


def compile_dts(dts: str, out: Path) -> Path:
    src = out.with_suffix(".dts")
    src.write_text(dts)
    _run([dtc(), "-q", "-I", "dts", "-O", "dtb", "-o", str(out), str(src)], DTC_TIMEOUT, "dtc -I dts")
    return out


def node_paths(dts: str, name: str) -> list[str]:
    """Top-level node paths called ``name@ADDR`` in a decompiled tree, by address."""
    found = {int(m[1], 16): f"/{name}@{m[1]}" for m in re.finditer(rf"^\t{re.escape(name)}@([0-9a-f]+) \{{", dts,
                                                                    re.MULTILINE)}
    return [found[a] for a in sorted(found)]


def virtio_mmio_path(index: int) -> str:
    """The DT path of QEMU virt's virtio-mmio transport ``index`` (0 = lowest address)."""
    return f"/virtio_mmio@{VIRT_MMIO_BASE + index * VIRT_MMIO_SIZE:x}"


def first_device_transport(dts: str) -> str:
    """The transport QEMU plugs the first ``-device virtio-*-device`` into: the one with
    the highest address (hw/arm/virt.c creates them so that buses are found in
    decreasing address order)."""
    paths = node_paths(dts, "virtio_mmio")
    if not paths:
        pytest.fail("no virtio_mmio nodes in QEMU's DTB")
    return paths[-1]


@dataclass(frozen=True)
class RestrictedPool:
    """A ``restricted-dma-pool`` in /reserved-memory, attached to DT nodes with ``memory-region``."""

    base: int
    size: int
    devices: tuple[str, ...]
    label: str = "hvc_dma_pool"

    def dts(self) -> str:
        def cells(v: int) -> str:
            return f"{v >> 32:#x} {v & 0xFFFF_FFFF:#x}"

        text = (
            "/ {\n\treserved-memory {\n\t\t#address-cells = <2>;\n\t\t#size-cells = <2>;\n\t\tranges;\n"
            f"\t\t{self.label}: restricted-dma@{self.base:x} {{\n"
            '\t\t\tcompatible = "restricted-dma-pool";\n'
            f"\t\t\treg = <{cells(self.base)} {cells(self.size)}>;\n\t\t}};\n\t}};\n}};\n")
        for dev in self.devices:
            text += f"&{{{dev}}} {{\n\tmemory-region = <&{self.label}>;\n}};\n"
        return text


def optee_node(method: str = "hvc") -> str:
    """The node Linux's OP-TEE SMC-ABI driver binds to (drivers/tee/optee/smc_abi.c)."""
    if method not in ("hvc", "smc"):
        raise ValueError(f"method must be hvc or smc, not {method!r}")
    return f'/ {{\n\tfirmware {{\n\t\toptee {{\n\t\t\tcompatible = "linaro,optee-tz";\n\t\t\tmethod = "{method}";\n' \
           "\t\t};\n\t};\n};\n"


def build_dtb(qemu_bin: Path, machine_args: Sequence[str], workdir: Path, additions: Sequence[str] = (),
              name: str = "guest") -> tuple[Path, str]:
    """Dump QEMU's DTB for ``machine_args``, add ``additions`` (DTS text, e.g.
    :meth:`RestrictedPool.dts`, :func:`optee_node`) and compile it.  Returns the
    DTB's path and the final DTS (for assertions and for the logs)."""
    base = dump_dtb(qemu_bin, machine_args, workdir / f"{name}-qemu.dtb")
    dts = decompile(base)
    # dtc refuses references to labels before the label exists; additions go last, in order.
    final = dts.rstrip("\n") + "\n\n" + "\n".join(additions)
    out = compile_dts(final, workdir / f"{name}.dtb")
    return out, final
