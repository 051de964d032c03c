#!/bin/bash
# Build the L1 host kernel: Debian's `linux` source (6.12, bookworm-backports,
# the same tree as integration/linux/build-kernel.sh), cross-compiled for arm64
# from allnoconfig plus integration/kernel/l1.config, with the KVM series
# integration/kernel/patches/*.patch (KVM_REG_ARM_SMCCC_VERSION) on top, and
# the series' KVM selftests (aarch64/smccc_version, get-reg-list) linked
# statically for arm64, to run in L1 (integration/nested).
#
# Usage: integration/kernel/build-l1-kernel.sh [--print-key] [--help]
#   --print-key   print the kernel's cache key and exit (no download, no build)
#
# Environment:
#   HVCPROXYD_CACHE            cache root (default ~/.cache/hvcproxyd)
#   HVCIT_LINUX_SRC_VERSION    Debian source version (default: integration/linux/kernel-lib.sh's pin)
#   HVCIT_KERNEL_JOBS          make -j (default: nproc)
#   HVCIT_KERNEL_TIMEOUT       seconds each make may take (default 3600)
#
# Cache (outside the repository):
#   kernel/src/linux-<version>/  the unpacked Debian source (shared with build-kernel.sh)
#   kernel/work-l1/src/          hard-linked copy with the series applied, at a
#                                fixed path so that work-l1/build (O=) and
#                                work-l1/selftests rebuild incrementally when the
#                                series changes: the files any series touched are
#                                real copies, newer than their objects
#   kernel/l1-<key>/             Image, config, smccc_version, get-reg-list,
#                                build.log, info
#       key = source version + patches (not the cover letter) + l1.config +
#             KERNEL_RECIPE + the cross compiler's version
# Prints the kernel/l1-<key> directory on stdout; progress goes to stderr.
set -euo pipefail
LOG_TAG=l1-kernel-build
KERNEL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$KERNEL_DIR/../lib.sh"
# shellcheck source=../linux/kernel-lib.sh
source "$KERNEL_DIR/../linux/kernel-lib.sh"

# Bump when the steps that make kernel/l1-<key>/ change (SELFTESTS too).
KERNEL_RECIPE=1
FRAGMENT="$KERNEL_DIR/l1.config"
SELFTESTS=(aarch64/smccc_version get-reg-list)

case "${1:-}" in
--help|-h) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
--print-key|"") ;;
*) die "unknown argument: $1 (see --help)" ;;
esac

need_kernel_tools
[ -f "$FRAGMENT" ] || die "missing config fragment $FRAGMENT"
[ -e /usr/aarch64-linux-gnu/lib/libc.a ] ||
    die "no static arm64 C library for the selftests: install libc6-dev-arm64-cross"

# The series as git format-patch writes it; the cover letter has no diff.
shopt -s nullglob
PATCHES=()
for p in "$KERNEL_DIR"/patches/*.patch; do
    [ "$(basename "$p")" = 0000-cover-letter.patch ] || PATCHES+=("$p")
done
shopt -u nullglob
[ ${#PATCHES[@]} -gt 0 ] || die "no patches in $KERNEL_DIR/patches"

src_key=$(series_key "${PATCHES[@]}")
kernel_key=$(build_key "$FRAGMENT")
if [ "${1:-}" = --print-key ]; then
    printf '%s\n' "$kernel_key"
    exit 0
fi

take_lock l1-kernel-build
work="$KROOT/work-l1"
worksrc="$work/src"
build="$work/build"
kout="$KROOT/l1-$kernel_key"
mkdir -p "$work"

# The files a series creates or modifies (its "+++ b/..." lines).
patched_files() { sed -n 's,^+++ b/\([^\t]*\).*,\1,p' "$@" | sort -u; }

# $worksrc = $pristine + the series.  The tree is recreated at the same path;
# the files the previous or the current series touch are copied rather than
# linked (a fresh mtime, also for a file a dropped patch no longer changes),
# so make rebuilds exactly what depends on them; a file whose content is the
# same as in the previous tree gets that tree's mtime back (a new commit
# message or another patch does not rebuild it).  Only these copies are
# touched: the rest are links to $pristine.
prepare_worksrc() {
    [ -f "$worksrc/.hvc-done" ] && [ "$(cat "$worksrc/.hvc-done")" = "$src_key" ] && return
    local f touched old="$worksrc.old"
    touched=$( { cat "$work/patched-files" 2>/dev/null || true; patched_files "${PATCHES[@]}"; } | sort -u)
    rm -rf "$old"
    if [ -f "$worksrc/.hvc-done" ]; then mv "$worksrc" "$old"; else rm -rf "$worksrc"; fi
    log "work tree $worksrc (${#PATCHES[@]} patches)"
    cp -al "$pristine" "$worksrc"
    rm -f "$worksrc/.hvc-done"
    while IFS= read -r f; do
        [ -n "$f" ] && [ -f "$pristine/$f" ] && cp --remove-destination "$pristine/$f" "$worksrc/$f"
    done <<< "$touched"
    apply_patches "$worksrc" "${PATCHES[@]}"
    while IFS= read -r f; do
        [ -n "$f" ] && [ -f "$worksrc/$f" ] && [ -f "$old/$f" ] && cmp -s "$old/$f" "$worksrc/$f" &&
            touch -r "$old/$f" "$worksrc/$f"
    done <<< "$touched"
    rm -rf "$old"
    patched_files "${PATCHES[@]}" > "$work/patched-files"
    printf '%s\n' "$src_key" > "$worksrc/.hvc-done"
}

# The KVM selftests, static, against the uapi headers of this tree.
build_selftests() {
    local out="$work/selftests" t targets=()
    for t in "${SELFTESTS[@]}"; do targets+=("$out/$t"); done
    kmake -s headers >>"$blog" 2>&1 || { tail -30 "$blog" >&2; die "make headers failed (log $blog)"; }
    mkdir -p "$out/tools"
    timeout "$MAKE_TIMEOUT" make -C "$worksrc/tools/testing/selftests/kvm" -j"$JOBS" \
        ARCH=arm64 CROSS_COMPILE="$CROSS" OUTPUT="$out" abs_objdir="$out" \
        KHDR_INCLUDES="-isystem $build/usr/include" EXTRA_CFLAGS=-static "${targets[@]}" >>"$blog" 2>&1 ||
        { tail -30 "$blog" >&2; die "KVM selftests build failed (log $blog)"; }
    for t in "${targets[@]}"; do
        file "$t" | grep -q 'statically linked' || die "$t is not statically linked"
    done
}

build_kernel() {
    [ -f "$kout/done" ] && { log "L1 kernel up to date: $kout"; return; }
    fetch_source
    prepare_worksrc
    mkdir -p "$build"
    blog="$work/build.log"
    local t0 t1
    t0=$(date +%s)
    configure_kernel "$blog"
    log "building Image with -j$JOBS (log $blog)"
    kmake -j"$JOBS" Image >>"$blog" 2>&1 || { tail -30 "$blog" >&2; die "kernel build failed (log $blog)"; }
    log "building the KVM selftests: ${SELFTESTS[*]}"
    build_selftests
    t1=$(date +%s)
    publish_kernel "$kout" "$(printf 'linux %s\nbuild_seconds %s\njobs %s\npatches %s' "$LINUX_SRC_VERSION" \
        "$((t1 - t0))" "$JOBS" "$(for p in "${PATCHES[@]}"; do basename "$p"; done | xargs)")" \
        "$build/arch/arm64/boot/Image" "$blog" "${SELFTESTS[@]/#/$work/selftests/}"
    log "L1 kernel built in $((t1 - t0)) s: $kout ($(stat -c %s "$kout/Image") bytes)"
}

build_kernel
printf '%s\n' "$kout"
