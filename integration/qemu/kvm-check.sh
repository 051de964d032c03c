#!/bin/bash
# Compile-check the KVM side of the patch series on an x86_64 host.
#
# QEMU builds target/arm/kvm.c only on an aarch64 host, so the x86_64 build
# from build.sh never compiles the KVM_EXIT_HYPERCALL handler or the SMCCC
# filter code.  This script compiles those files again with the flags of
# that build plus CONFIG_KVM, against the arm64 kernel uAPI headers (QEMU's
# linux-headers/asm-arm64 over linux-libc-dev-arm64-cross), with
# -fsyntax-only -Werror: every type, constant and call is checked, nothing
# is linked.  The real KVM run is a separate, nested-virtualization test.
#
# Usage: integration/qemu/kvm-check.sh   (exit 0: the KVM code compiles)
set -euo pipefail
LOG_TAG=kvm-check
QEMU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$QEMU_DIR/../lib.sh"

bin=$("$QEMU_DIR/build.sh")
work=$(readlink -f "$(dirname "$bin")/work")
src="$work/src"
build="$work/build"
[ -f "$build/compile_commands.json" ] || die "no $build/compile_commands.json; run integration/qemu/build.sh"
[ -f "$src/hw/arm/hvc-forwarder.c" ] ||
    die "the work tree $src is not the patched one (was build.sh --no-patches run last?); run integration/qemu/build.sh --force"
[ -f /usr/aarch64-linux-gnu/include/asm/ptrace.h ] ||
    die "arm64 kernel headers missing: apt-get install linux-libc-dev-arm64-cross (integration/setup.sh does)"

# <asm/...> for arm64: the cross toolchain's, then QEMU's own kvm.h and friends.
asm="$HVC_CACHE/qemu/kvm-check-include"
rm -rf "$asm"
mkdir -p "$asm/asm"
cp -r /usr/aarch64-linux-gnu/include/asm/. "$asm/asm/"
cp -r "$src/linux-headers/asm-arm64/." "$asm/asm/"

log "checking target/arm/kvm.c, arm-powerctl.c and hw/arm/hvc-forwarder.c with CONFIG_KVM"
python3 - "$build" "$asm" "$src" <<'EOF'
import json, shlex, subprocess, sys
build, asm, src = sys.argv[1], sys.argv[2], sys.argv[3]
commands = json.load(open(f"{build}/compile_commands.json"))
ref = next(e for e in commands if e["file"].endswith("hw/arm/hvc-forwarder.c"))
argv, skip = [], False
for a in shlex.split(ref["command"]):
    if skip:
        skip = False
        continue
    if a in ("-MQ", "-MF", "-o"):
        skip = True
        continue
    if a in ("-MD", "-c") or a.endswith(".c"):
        continue
    argv.append(a)
argv = [argv[0], "-isystem", asm, *argv[1:], "-DCONFIG_KVM=1", "-fsyntax-only", "-Werror"]
rc = 0
for f in ("target/arm/kvm.c", "target/arm/arm-powerctl.c", "hw/arm/hvc-forwarder.c"):
    r = subprocess.run(argv + [f"{src}/{f}"], cwd=build, capture_output=True, text=True)
    print(f"[kvm-check] {f}: {'OK' if r.returncode == 0 else 'FAILED'}", file=sys.stderr)
    if r.returncode:
        print(r.stderr[-6000:], file=sys.stderr)
        rc = 1
sys.exit(rc)
EOF
log "the KVM code compiles"
