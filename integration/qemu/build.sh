#!/bin/bash
# Build QEMU 10.0.2 (aarch64-softmmu) with the hvc-forwarder patch series
# (integration/qemu/patches/*.patch, applied with git am).
#
# The source is Debian's orig tarball from bookworm-backports, fetched with
# "apt-get source --download-only" through a private apt configuration, or
# the copy in ../shared/vendor/ (relative to the repository) when the mirror
# does not deliver it.  Its size and sha256 are pinned.
#
# Cache, under ${HVCPROXYD_CACHE:-~/.cache/hvcproxyd}/qemu/:
#   <key>/qemu-system-aarch64   one binary per key = hash(tarball, configure
#                               flags, meson, this script, source.sh, every
#                               patch);
#                               <key>/work points at its work tree
#   current -> <key>            the last patched build
#   work/{src,build}            the source tree (a git repo: the tarball as
#                               commit "base", the patches on top) and the
#                               build directory; work/base-key records the
#                               tarball, flags and meson they were made for,
#                               and a different one starts them afresh
# An unchanged tree is not rebuilt (well under a second).  When only the
# patches change, the new commits are checked out over the old ones, so that
# only the files that differ are touched and ninja rebuilds just those.
#
# Prints the path of qemu-system-aarch64 on stdout; progress goes to stderr.
# Usage: integration/qemu/build.sh [--force] [--no-patches]
set -euo pipefail
LOG_TAG=qemu-build
QEMU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$QEMU_DIR/../lib.sh"

FORCE=no
PATCHES=yes
for arg in "$@"; do
    case "$arg" in
    --force) FORCE=yes ;;
    --no-patches) PATCHES=no ;;
    *) die "unknown argument: $arg (usage: build.sh [--force] [--no-patches])" ;;
    esac
done

# shellcheck source=source.sh
source "$QEMU_DIR/source.sh"

CONFIGURE_FLAGS=(
    --target-list=aarch64-softmmu
    --without-default-features
    --enable-tcg
    --enable-kvm             # takes effect on an aarch64 host only
    --enable-fdt=system
    --enable-pixman
    "${QEMU_COMMON_FLAGS[@]}"
)

JOBS=$(nproc 2>/dev/null || echo 2)

# Bump when prepare_source() or the build directory's layout changes.
TREE_FORMAT=1

configure_and_build() {
    local src=$1 build=$2
    configure_qemu "$src" "$build"
    log "building qemu-system-aarch64 with ninja -j$JOBS (cold: ~5-8 min on 2 cores; log: $build.ninja.log)"
    ninja_build "$build" "$JOBS"
}

main() {
    "$INTEGRATION_DIR/setup.sh" --host-only >&2
    take_lock qemu-build

    local base key out work bin
    base=$(base_key)
    key=$(build_key "$base" "$QEMU_DIR/build.sh")
    [ "$PATCHES" = yes ] || key="stock-$key"
    out="$HVC_CACHE/qemu/$key"
    work="$HVC_CACHE/qemu/work"
    bin="$out/qemu-system-aarch64"
    [ "$FORCE" = yes ] && rm -rf "$out" "$work"

    if [ -f "$out/done" ] && [ -x "$bin" ]; then
        log "up to date: $bin (key $key)"
    else
        mkdir -p "$HVC_CACHE/qemu"
        if [ "$(cat "$work/base-key" 2>/dev/null)" != "$base" ]; then
            [ -d "$work" ] && log "the work tree is for other sources or flags: starting afresh"
            rm -rf "$work"
        fi
        if [ ! -d "$work/src/.git" ]; then
            prepare_source "$(get_tarball)" "$work/src"
            echo "$base" > "$work/base-key"
        fi
        checkout_patches "$work/src"
        configure_and_build "$work/src" "$work/build"
        [ -x "$work/build/qemu-system-aarch64" ] || die "no qemu-system-aarch64 after the build"
        rm -rf "$out"
        mkdir -p "$out"
        cp "$work/build/qemu-system-aarch64" "$bin.tmp"
        mv "$bin.tmp" "$bin"
        date -u +%FT%TZ > "$out/done"
        log "built $bin"
    fi
    [ -d "$work" ] && ln -sfn "$work" "$out/work"
    if [ "$PATCHES" = yes ]; then
        ln -sfn "$key" "$HVC_CACHE/qemu/current"
        prune_old "$HVC_CACHE/qemu" "$key"
    fi
    printf '%s\n' "$bin"
}

main
