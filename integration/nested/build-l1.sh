#!/bin/bash
# Build L1, the emulated arm64 KVM host: Debian's arm64 cloud kernel (booted
# at EL2 under TCG by L0, the patched qemu-system-aarch64) and a busybox
# initramfs whose /init is integration/nested/l1-init.  The initramfs also
# carries what L1 runs its L2 guests with:
#   /opt/qemu/...                  the arm64 QEMU bundle (--qemu DIR: the
#                                  output of build-qemu-arm64.sh, with
#                                  bin/qemu-system-aarch64), when given
#   /l2/vmlinuz                    the L2 Linux kernel (the same vmlinuz)
#   /l2/linux-initramfs.cpio.gz    the Linux test guest (integration/linux)
#   /l2/guests/*                   the bare-metal test guests (integration/guests)
#
# Output, cached under $HVCPROXYD_CACHE/nested/l1/<key>/ (key: hash of every
# input: kernel, busybox, l1-init, the QEMU bundle's files, the L2 payload,
# this script):
#   vmlinuz          the L1 kernel (symlink into the unpacked .deb)
#   initramfs.cpio   the initramfs, uncompressed: inflating ~40 MB of gzip
#                    under TCG costs more than QEMU loading the bigger file
#   qemu             "yes" or "no": whether /opt/qemu is in it
# Prints the output directory on stdout; progress goes to stderr.
set -euo pipefail
LOG_TAG=nested-l1-build
NESTED_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$NESTED_DIR/../lib.sh"

usage() {
    cat <<USAGE
Usage: integration/nested/build-l1.sh [--qemu DIR] [--gzip] [--help]
  --qemu DIR   put the arm64 QEMU bundle DIR (DIR/bin/qemu-system-aarch64,
               from build-qemu-arm64.sh) under /opt/qemu in the initramfs
  --gzip       write initramfs.cpio.gz instead (slower to boot under TCG)
Prints the output directory (vmlinuz, initramfs.cpio) on stdout.
USAGE
}

QEMU_BUNDLE=""
GZIP=no
while [ $# -gt 0 ]; do
    case "$1" in
    --qemu) [ $# -ge 2 ] || die "--qemu needs a directory"; QEMU_BUNDLE=$2; shift 2 ;;
    --qemu=*) QEMU_BUNDLE=${1#--qemu=}; shift ;;
    --gzip) GZIP=yes; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done
if [ -n "$QEMU_BUNDLE" ]; then
    bundle=$(cd "$QEMU_BUNDLE" 2>/dev/null && pwd -P) || die "no QEMU bundle directory: $QEMU_BUNDLE"
    QEMU_BUNDLE=$bundle
    [ -x "$QEMU_BUNDLE/bin/qemu-system-aarch64" ] ||
        die "$QEMU_BUNDLE/bin/qemu-system-aarch64 missing: not a QEMU bundle"
fi

# The L2 payload first: these take their own locks.
linux_out=$("$INTEGRATION_DIR/linux/build.sh")
guests_out=$("$INTEGRATION_DIR/guests/build.sh")
[ -f "$linux_out/initramfs.cpio.gz" ] || die "no $linux_out/initramfs.cpio.gz"

take_lock nested-l1-build
kernel=$(readlink -f "$HVC_CACHE/debs/vmlinuz-arm64")
busybox=$(readlink -f "$HVC_CACHE/debs/busybox-arm64")
[ -f "$kernel" ] || die "no arm64 kernel at $kernel; run integration/setup.sh"
[ -x "$busybox" ] || die "no arm64 busybox at $busybox; run integration/setup.sh"

# One line per file of a directory tree: type, mode, path, content hash (or
# the target of a symlink), in a fixed order.
tree_digest() {
    ( cd "$1" && find . -mindepth 1 -printf '%y %m %p %l\n' | LC_ALL=C sort |
        while read -r type mode path link; do
            if [ "$type" = f ]; then
                echo "f $mode $path $(sha256_of "$path")"
            else
                echo "$type $mode $path $link"
            fi
        done )
}

key=$( {
    echo "kernel $(sha256_of "$kernel")"
    echo "busybox $(sha256_of "$busybox")"
    echo "l1-init $(sha256_of "$NESTED_DIR/l1-init")"
    echo "build-l1.sh $(sha256_of "$NESTED_DIR/build-l1.sh")"
    echo "l2 linux initramfs $(sha256_of "$linux_out/initramfs.cpio.gz")"
    echo "l2 guests"; tree_digest "$guests_out"
    echo "gzip $GZIP"
    if [ -n "$QEMU_BUNDLE" ]; then echo "qemu bundle"; tree_digest "$QEMU_BUNDLE"; else echo "no qemu"; fi
} | sha256sum | cut -c1-16 )
out="$HVC_CACHE/nested/l1/$key"

if [ -f "$out/done" ]; then
    log "up to date: $out"
else
    log "building the L1 initramfs in $out"
    rm -rf "$out"
    root="$out/root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,l2/guests,opt}
    cp "$busybox" "$root/bin/busybox"
    install -m 0755 "$NESTED_DIR/l1-init" "$root/init"
    cp "$kernel" "$root/l2/vmlinuz"
    cp "$linux_out/initramfs.cpio.gz" "$root/l2/linux-initramfs.cpio.gz"
    find "$guests_out" -maxdepth 1 -type f \( -name '*.bin' -o -name '*.elf' \) \
        -exec cp -t "$root/l2/guests/" {} +
    if [ -n "$QEMU_BUNDLE" ]; then
        cp -a "$QEMU_BUNDLE" "$root/opt/qemu"
        echo yes > "$out/qemu"
    else
        echo no > "$out/qemu"
    fi
    if [ "$GZIP" = yes ]; then name=initramfs.cpio.gz; filter=(gzip -6n); else name=initramfs.cpio; filter=(cat); fi
    ( cd "$root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc --owner=0:0 --quiet ) | "${filter[@]}" > "$out/$name.tmp"
    mv "$out/$name.tmp" "$out/$name"
    ln -sfn "$kernel" "$out/vmlinuz"
    rm -rf "$root"
    log "initramfs: $(du -h "$out/$name" | cut -f1) ($name)"
    date -u +%FT%TZ > "$out/done"
fi
printf '%s\n' "$out"
