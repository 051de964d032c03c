#!/bin/bash
# Build the Linux test guest: Debian's arm64 cloud kernel and a busybox
# initramfs whose /init is integration/linux/init.
#
# Output, cached under $HVCPROXYD_CACHE/linux/<key>/ (key: hash of the
# kernel, busybox, init and this script):
#   vmlinuz            the kernel (symlink into the unpacked .deb)
#   initramfs.cpio.gz  the initramfs
# Prints the output directory on stdout.
set -euo pipefail
LOG_TAG=linux-build
LINUX_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$LINUX_DIR/../lib.sh"

take_lock linux-build
# Kernel and busybox come from setup.sh (apt-get download + dpkg-deb -x).
if [ ! -e "$HVC_CACHE/debs/vmlinuz-arm64" ] || [ ! -e "$HVC_CACHE/debs/busybox-arm64" ]; then
    "$INTEGRATION_DIR/setup.sh" >&2
fi
kernel=$(readlink -f "$HVC_CACHE/debs/vmlinuz-arm64")
busybox=$(readlink -f "$HVC_CACHE/debs/busybox-arm64")
[ -f "$kernel" ] || die "no arm64 kernel at $kernel; run integration/setup.sh"
[ -x "$busybox" ] || die "no arm64 busybox at $busybox; run integration/setup.sh"

key=$( {
    echo "kernel $(sha256_of "$kernel")"
    echo "busybox $(sha256_of "$busybox")"
    echo "init $(sha256_of "$LINUX_DIR/init")"
    echo "build.sh $(sha256_of "$LINUX_DIR/build.sh")"
} | sha256sum | cut -c1-16 )
out="$HVC_CACHE/linux/$key"

if [ -f "$out/done" ]; then
    log "up to date: $out"
else
    log "building initramfs in $out"
    rm -rf "$out"
    mkdir -p "$out/root"/{bin,dev,proc,sys,tmp}
    cp "$busybox" "$out/root/bin/busybox"
    install -m 0755 "$LINUX_DIR/init" "$out/root/init"
    ( cd "$out/root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet ) | gzip -9n > "$out/initramfs.cpio.gz"
    ln -sfn "$kernel" "$out/vmlinuz"
    rm -rf "$out/root"
    date -u +%FT%TZ > "$out/done"
fi
printf '%s\n' "$out"
