#!/bin/bash
# Build the client test kernel: Debian's `linux` source (6.12, bookworm-backports),
# cross-compiled for arm64 from allnoconfig plus integration/linux/kernel.config,
# with integration/linux/patches/*.patch on top, the out-of-tree test modules
# (integration/linux/memshare-test/, integration/linux/ffa-echo-test/) and a
# busybox initramfs whose /init is integration/linux/init-clients, with the
# static TEE client integration/linux/tee-test/ as /bin/tee-test.
#
# Usage: integration/linux/build-kernel.sh [--print-key] [--help]
#   --print-key   print the kernel's cache key and exit (no download, no build)
#
# Environment:
#   HVCPROXYD_CACHE            cache root (default ~/.cache/hvcproxyd)
#   HVCIT_LINUX_SRC_VERSION    Debian source version (default: the pin below)
#   HVCIT_KERNEL_JOBS          make -j (default: nproc)
#   HVCIT_KERNEL_TIMEOUT       seconds the kernel make may take (default 3600)
#
# Cache (outside the repository):
#   kernel/src/linux-<version>/     the unpacked Debian source (debian/patches applied)
#   kernel/work/src-<key>/          hard-linked copy with our patches; work/build is O=
#   kernel/<key>/                   Image, memshare_test.ko, ffa_echo_test.ko, config, build.log
#       key = source version + kernel.config + patches + the modules' source +
#             KERNEL_RECIPE + the cross compiler's version
#   linux-clients/<key>/            Image (symlink), initramfs.cpio.gz, config
#       key = the kernel key + busybox + init-clients + tee-test's source
#             (the kernel key does not cover tee-test: editing it rebuilds only the initramfs)
# Prints the linux-clients directory on stdout; progress goes to stderr.
set -euo pipefail
LOG_TAG=kernel-build
LINUX_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$LINUX_DIR/../lib.sh"
# shellcheck source=kernel-lib.sh
source "$LINUX_DIR/kernel-lib.sh"

# Bump when the steps that make kernel/<key>/ change (not for initramfs-only edits).
KERNEL_RECIPE=1
FRAGMENT="$LINUX_DIR/kernel.config"
# The out-of-tree test modules, each a directory with a Kbuild and <name>.c
# (dashes become underscores), built with M= against the kernel and put into
# the initramfs's /lib/modules.
MODULES=(memshare-test ffa-echo-test)
module_name() { printf '%s' "${1//-/_}"; }
INIT="$LINUX_DIR/init-clients"
TEE_TEST="$LINUX_DIR/tee-test/tee_test.c"

case "${1:-}" in
--help|-h) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
--print-key|"") ;;
*) die "unknown argument: $1 (see --help)" ;;
esac

need_kernel_tools
need cpio cpio
need gzip gzip
[ -f "$FRAGMENT" ] || die "missing config fragment $FRAGMENT"
for m in "${MODULES[@]}"; do
    [ -f "$LINUX_DIR/$m/$(module_name "$m").c" ] || die "missing the source of $LINUX_DIR/$m"
done
[ -f "$INIT" ] || die "missing $INIT"
[ -f "$TEE_TEST" ] || die "missing $TEE_TEST"

shopt -s nullglob
PATCHES=("$LINUX_DIR"/patches/*.patch)
shopt -u nullglob

src_key=$(series_key "${PATCHES[@]}")
module_files=()
for m in "${MODULES[@]}"; do
    module_files+=("$LINUX_DIR/$m"/*)
done
kernel_key=$(build_key "$FRAGMENT" "${module_files[@]}")
if [ "${1:-}" = --print-key ]; then
    printf '%s\n' "$kernel_key"
    exit 0
fi

take_lock kernel-build
worksrc="$KROOT/work/src-$src_key"
build="$KROOT/work/build"
kout="$KROOT/$kernel_key"
mkdir -p "$KROOT/src" "$KROOT/work"

# A hard-linked copy of the pristine tree with our patches applied (GNU patch
# writes a new file and renames it, so the pristine tree is never modified).
prepare_worksrc() {
    [ -f "$worksrc/.hvc-done" ] && return
    local d
    for d in "$KROOT"/work/src-*; do
        [ "$d" = "$worksrc" ] || rm -rf "$d"
    done
    rm -rf "$worksrc" "$build"
    log "work tree $worksrc (${#PATCHES[@]} patches)"
    cp -al "$pristine" "$worksrc"
    rm -f "$worksrc/.hvc-done"
    apply_patches "$worksrc" "${PATCHES[@]}"
    touch "$worksrc/.hvc-done"
}

build_kernel() {
    [ -f "$kout/done" ] && { log "kernel up to date: $kout"; return; }
    fetch_source
    prepare_worksrc
    mkdir -p "$build"
    local blog="$KROOT/work/build.log" t0 t1
    t0=$(date +%s)
    configure_kernel "$blog"
    log "building Image with -j$JOBS (~3-4 min cold on 2 cores; log $blog)"
    # "modules" (none in-tree) runs modpost on vmlinux: the Module.symvers the test modules link against.
    kmake -j"$JOBS" Image modules >>"$blog" 2>&1 ||
        { tail -30 "$blog" >&2; die "kernel build failed (log $blog)"; }
    local m kos=()
    for m in "${MODULES[@]}"; do
        log "building the test module $m (M=)"
        rm -rf "${KROOT:?}/work/$m"
        cp -r "$LINUX_DIR/$m" "$KROOT/work/$m"
        kmake M="$KROOT/work/$m" modules >>"$blog" 2>&1 ||
            { tail -30 "$blog" >&2; die "test module $m failed to build (log $blog)"; }
        kos+=("$KROOT/work/$m/$(module_name "$m").ko")
    done
    t1=$(date +%s)
    publish_kernel "$kout" "$(printf 'linux %s\nbuild_seconds %s\njobs %s' "$LINUX_SRC_VERSION" "$((t1 - t0))" "$JOBS")" \
        "$build/arch/arm64/boot/Image" "${kos[@]}" "$blog"
    log "kernel built in $((t1 - t0)) s: $kout ($(stat -c %s "$kout/Image") bytes)"
}

build_initramfs() {
    if [ ! -e "$HVC_CACHE/debs/busybox-arm64" ]; then
        "$INTEGRATION_DIR/setup.sh" >&2
    fi
    local busybox
    busybox=$(readlink -f "$HVC_CACHE/debs/busybox-arm64")
    [ -x "$busybox" ] || die "no arm64 busybox at $busybox; run integration/setup.sh"
    local key out
    key=$( {
        echo "kernel $kernel_key"
        echo "busybox $(sha256_of "$busybox")"
        hash_files "$INIT" "$LINUX_DIR/build-kernel.sh" "$TEE_TEST"
    } | short_key )
    out="$HVC_CACHE/linux-clients/$key"
    if [ -f "$out/done" ]; then
        log "initramfs up to date: $out"
    else
        log "building initramfs in $out"
        rm -rf "$out"
        mkdir -p "$out/root"/{bin,dev,proc,sys,tmp,lib/modules}
        cp "$busybox" "$out/root/bin/busybox"
        install -m 0755 "$INIT" "$out/root/init"
        for m in "${MODULES[@]}"; do
            cp "$kout/$(module_name "$m").ko" "$out/root/lib/modules/"
        done
        # A static TEE client (TEE_IOC_* only, like libteec) for the OP-TEE test.
        "${CROSS}gcc" -static -O2 -Wall -Wextra -Werror -o "$out/root/bin/tee-test" "$TEE_TEST" 2>"$out/tee-test.log" ||
            { cat "$out/tee-test.log" >&2; die "cannot build $TEE_TEST static for arm64" \
                "(the static C library is Debian's libc6-dev-arm64-cross; integration/setup.sh installs it)"; }
        "${CROSS}strip" "$out/root/bin/tee-test"
        ( cd "$out/root" && find . -print0 | LC_ALL=C sort -z |
            cpio --null -o -H newc --owner=0:0 --quiet ) | gzip -9n > "$out/initramfs.cpio.gz"
        rm -rf "$out/root"
        ln -sfn "$kout/Image" "$out/Image"
        ln -sfn "$kout/config" "$out/config"
        ln -sfn "$kout/info" "$out/info"
        echo "$kernel_key" > "$out/kernel-key"
        date -u +%FT%TZ > "$out/done"
    fi
    printf '%s\n' "$out"
}

build_kernel
build_initramfs
