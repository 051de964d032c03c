#!/bin/bash
# Build the bare-metal test guests into $HVCPROXYD_CACHE/guests/<key>/ (key:
# hash of the sources) and print that directory.  Needs the aarch64 cross
# toolchain from integration/setup.sh.
set -euo pipefail
LOG_TAG=guests-build
GUESTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$GUESTS_DIR/../lib.sh"

have_cmd aarch64-linux-gnu-gcc || "$INTEGRATION_DIR/setup.sh" --host-only >&2
have_cmd aarch64-linux-gnu-gcc || die "aarch64-linux-gnu-gcc missing (gcc-aarch64-linux-gnu)"

take_lock guests-build
key=$( cd "$GUESTS_DIR" &&
       sha256sum Makefile build.sh guest.ld ./*.S ./*.h | sha256sum | cut -c1-16 )
out="$HVC_CACHE/guests/$key"
if [ -f "$out/done" ]; then
    log "up to date: $out"
else
    log "building guests in $out"
    rm -rf "$out"
    make -s -C "$GUESTS_DIR" O="$out" >&2 || die "building the guests failed"
    rm -f "$out"/*.o
    touch "$out/done"
fi
printf '%s\n' "$out"
