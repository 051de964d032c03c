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

# The Debian source version, pinned so that a warm cache needs no network and
# a new backports upload does not silently rebuild.  bookworm-backports' 6.12.95
# is the same version as the stock kernel integration/setup.sh downloads.
LINUX_SRC_VERSION="${HVCIT_LINUX_SRC_VERSION:-6.12.95-1~bpo12+1}"
# Bump when the steps that make kernel/<key>/ change (not for initramfs-only edits).
KERNEL_RECIPE=1
JOBS="${HVCIT_KERNEL_JOBS:-$(nproc)}"
MAKE_TIMEOUT="${HVCIT_KERNEL_TIMEOUT:-3600}"
CROSS=aarch64-linux-gnu-
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

need() {  # need COMMAND PACKAGE
    have_cmd "$1" || die "$1 not found: install the Debian package $2 (integration/setup.sh installs it)"
}
need "${CROSS}gcc" gcc-aarch64-linux-gnu
need make make
need flex flex
need bison bison
need bc bc
need perl perl
need dpkg-source dpkg-dev
need apt-get apt
need cpio cpio
need gzip gzip
need timeout coreutils
[ -f "$FRAGMENT" ] || die "missing config fragment $FRAGMENT"
for m in "${MODULES[@]}"; do
    [ -f "$LINUX_DIR/$m/$(module_name "$m").c" ] || die "missing the source of $LINUX_DIR/$m"
done
[ -f "$INIT" ] || die "missing $INIT"
[ -f "$TEE_TEST" ] || die "missing $TEE_TEST"

shopt -s nullglob
PATCHES=("$LINUX_DIR"/patches/*.patch)
shopt -u nullglob

hash_files() { local f; for f in "$@"; do printf '%s %s\n' "$(basename "$f")" "$(sha256_of "$f")"; done; }
short_key() { sha256sum | cut -c1-16; }

src_key=$( {
    echo "debian-source linux $LINUX_SRC_VERSION"
    hash_files "${PATCHES[@]}"
} | short_key )
kernel_key=$( {
    echo "src $src_key"
    hash_files "$FRAGMENT"
    for m in "${MODULES[@]}"; do
        echo "module $m"
        hash_files "$LINUX_DIR/$m"/*
    done
    echo "recipe $KERNEL_RECIPE"
    echo "cc $("${CROSS}gcc" --version | head -1)"
} | short_key )
if [ "${1:-}" = --print-key ]; then
    printf '%s\n' "$kernel_key"
    exit 0
fi

take_lock kernel-build
KROOT="$HVC_CACHE/kernel"
safe_version=${LINUX_SRC_VERSION//\~/-}
pristine="$KROOT/src/linux-$safe_version"
worksrc="$KROOT/work/src-$src_key"
build="$KROOT/work/build"
kout="$KROOT/$kernel_key"
mkdir -p "$KROOT/src" "$KROOT/work"

# ---------------------------------------------------------------- source
fetch_source() {
    [ -f "$pristine/.hvc-done" ] && return
    local dl="$HVC_CACHE/src/linux" dsc
    dsc="$dl/linux_${LINUX_SRC_VERSION#*:}.dsc"
    if [ ! -f "$dsc" ]; then
        private_apt_update || true
        mkdir -p "$dl"
        log "apt-get source --download-only linux=$LINUX_SRC_VERSION (~150 MB)"
        if ! ( cd "$dl" && timeout 1800 apt-get -q source --download-only "linux=$LINUX_SRC_VERSION" ) \
                >"$dl/download.log" 2>&1; then
            tail -5 "$dl/download.log" >&2
            local avail
            avail=$(apt-cache showsrc linux 2>/dev/null | awk '/^Version: 6\.12/ { print $2 }' | sort -V | tail -3 | xargs)
            die "could not download Debian's linux source $LINUX_SRC_VERSION (log $dl/download.log);" \
                "versions available: ${avail:-none}; set HVCIT_LINUX_SRC_VERSION or update the pin in $0"
        fi
    fi
    [ -f "$dsc" ] || die "apt-get source left no $dsc"
    log "unpacking $(basename "$dsc") with dpkg-source (applies debian/patches; ~1.5 min)"
    rm -rf "$pristine" "$pristine.tmp"
    ( cd "$KROOT/src" && timeout 1800 dpkg-source --require-strong-checksums -x "$dsc" "$(basename "$pristine.tmp")" ) \
        >"$KROOT/src/unpack.log" 2>&1 || { tail -5 "$KROOT/src/unpack.log" >&2; die "dpkg-source -x $dsc failed"; }
    mv "$pristine.tmp" "$pristine"
    touch "$pristine/.hvc-done"
}

# A hard-linked copy of the pristine tree with our patches applied (GNU patch
# writes a new file and renames it, so the pristine tree is never modified).
prepare_worksrc() {
    [ -f "$worksrc/.hvc-done" ] && return
    local d p
    for d in "$KROOT"/work/src-*; do
        [ "$d" = "$worksrc" ] || rm -rf "$d"
    done
    rm -rf "$worksrc" "$build"
    log "work tree $worksrc (${#PATCHES[@]} patches)"
    cp -al "$pristine" "$worksrc"
    rm -f "$worksrc/.hvc-done"
    for p in "${PATCHES[@]}"; do
        log "  applying $(basename "$p")"
        patch -d "$worksrc" -p1 --quiet --no-backup-if-mismatch --forward < "$p" ||
            die "patch $(basename "$p") does not apply to linux $LINUX_SRC_VERSION"
    done
    touch "$worksrc/.hvc-done"
}

kmake() {
    timeout "$MAKE_TIMEOUT" make -C "$worksrc" O="$build" ARCH=arm64 CROSS_COMPILE="$CROSS" \
        KBUILD_BUILD_USER=hvcproxyd KBUILD_BUILD_HOST=integration "$@"
}

# Every option of the fragment must be in the final .config with its value.
check_config() {
    local line opt bad=()
    while IFS= read -r line; do
        case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$build/.config" || bad+=("$line") ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }; opt=${opt%% *}
            grep -q "^$opt=" "$build/.config" && bad+=("$line") ;;
        esac
    done < "$FRAGMENT"
    [ ${#bad[@]} -eq 0 ] ||
        die "kernel.config options not in the final .config (a dependency is missing): ${bad[*]}"
}

build_kernel() {
    [ -f "$kout/done" ] && { log "kernel up to date: $kout"; return; }
    fetch_source
    prepare_worksrc
    mkdir -p "$build"
    local blog="$KROOT/work/build.log" t0 t1
    t0=$(date +%s)
    log "configuring: allnoconfig + $(basename "$FRAGMENT") (KCONFIG_ALLCONFIG)"
    kmake -s KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >"$blog" 2>&1 ||
        { tail -20 "$blog" >&2; die "make allnoconfig failed (log $blog)"; }
    check_config
    log "building Image with -j$JOBS (~3-4 min cold on 2 cores; log $blog)"
    # "modules" (none in-tree) runs modpost on vmlinux: the Module.symvers the test modules link against.
    kmake -j"$JOBS" Image modules >>"$blog" 2>&1 ||
        { tail -30 "$blog" >&2; die "kernel build failed (log $blog)"; }
    rm -rf "$kout.tmp"
    mkdir -p "$kout.tmp"
    local m
    for m in "${MODULES[@]}"; do
        log "building the test module $m (M=)"
        rm -rf "${KROOT:?}/work/$m"
        cp -r "$LINUX_DIR/$m" "$KROOT/work/$m"
        kmake M="$KROOT/work/$m" modules >>"$blog" 2>&1 ||
            { tail -30 "$blog" >&2; die "test module $m failed to build (log $blog)"; }
        cp "$KROOT/work/$m/$(module_name "$m").ko" "$kout.tmp/"
    done
    t1=$(date +%s)
    cp "$build/arch/arm64/boot/Image" "$kout.tmp/Image"
    cp "$build/.config" "$kout.tmp/config"
    cp "$blog" "$kout.tmp/build.log"
    printf 'linux %s\nbuild_seconds %s\njobs %s\n' "$LINUX_SRC_VERSION" "$((t1 - t0))" "$JOBS" > "$kout.tmp/info"
    date -u +%FT%TZ > "$kout.tmp/done"
    rm -rf "$kout"
    mv "$kout.tmp" "$kout"
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
