#!/bin/bash
# Build QEMU 10.0.2 (aarch64-softmmu) with the hvc-forwarder patch series.
#
# The source is Debian's orig tarball from bookworm-backports, fetched with
# "apt-get source --download-only" through a private apt configuration, or
# the copy in ../shared/vendor/ when the mirror does not answer.  Its size
# and sha256 are pinned.
#
# Everything lives under ${HVCPROXYD_CACHE:-~/.cache/hvcproxyd}/qemu/<key>/,
# where <key> hashes the tarball, the patches, the configure flags and this
# script.  An unchanged tree is not rebuilt.  On success the path of
# qemu-system-aarch64 is printed on stdout (progress goes to stderr) and
# $HVCPROXYD_CACHE/qemu/current points at the build.
#
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
    *) die "unknown argument: $arg" ;;
    esac
done

CONFIGURE_FLAGS=(
    --target-list=aarch64-softmmu
    --without-default-features
    --enable-tcg
    --enable-kvm             # only takes effect on an aarch64 host
    --enable-fdt=system
    --enable-pixman
    --disable-docs
    --disable-tools
    --disable-user
    --disable-debug-info
    --disable-install-blobs
    --disable-download
)

JOBS=$(nproc 2>/dev/null || echo 2)

patch_files() {
    [ "$PATCHES" = yes ] || return 0
    find "$QEMU_DIR/patches" -maxdepth 1 -name '*.patch' | LC_ALL=C sort
}

compute_key() {
    {
        echo "tarball $QEMU_TARBALL_SHA256"
        echo "configure ${CONFIGURE_FLAGS[*]}"
        echo "meson $MESON_VERSION"
        echo "build.sh $(sha256_of "$QEMU_DIR/build.sh")"
        local p
        while read -r p; do
            [ -n "$p" ] && echo "patch $(basename "$p") $(sha256_of "$p")"
        done < <(patch_files)
    } | sha256sum | cut -c1-16
}

tarball_ok() {
    [ -f "$1" ] &&
    [ "$(stat -c %s "$1")" = "$QEMU_TARBALL_SIZE" ] &&
    [ "$(sha256_of "$1")" = "$QEMU_TARBALL_SHA256" ]
}

# Print the path of a verified tarball, fetching it if needed.
get_tarball() {
    local dir="$HVC_CACHE/src" t
    t="$dir/$QEMU_TARBALL"
    mkdir -p "$dir"
    if tarball_ok "$t"; then
        printf '%s\n' "$t"
        return
    fi
    rm -f "$t"
    log "fetching $QEMU_TARBALL with apt-get source (bookworm-backports)"
    local tmp
    tmp=$(mktemp -d "$dir/apt-source.XXXXXX")
    # The .dsc and the Debian diff may 404 on the mirror: only the orig
    # tarball matters, so apt-get's exit status is not trusted either way.
    if private_apt_update; then
        ( cd "$tmp" && apt-get -q source --download-only qemu/bookworm-backports ) \
            >"$dir/apt-source.log" 2>&1 || true
    fi
    if tarball_ok "$tmp/$QEMU_TARBALL"; then
        mv "$tmp/$QEMU_TARBALL" "$t"
        log "got $QEMU_TARBALL from the Debian mirror"
    elif tarball_ok "$QEMU_TARBALL_FALLBACK"; then
        log "mirror did not deliver a verified tarball; using $QEMU_TARBALL_FALLBACK"
        cp "$QEMU_TARBALL_FALLBACK" "$t.tmp" && mv "$t.tmp" "$t"
    else
        rm -rf "$tmp"
        die "no verified $QEMU_TARBALL (sha256 $QEMU_TARBALL_SHA256): apt-get source failed (see $dir/apt-source.log) and the fallback $QEMU_TARBALL_FALLBACK is missing or differs"
    fi
    rm -rf "$tmp"
    tarball_ok "$t" || die "$t does not match the pinned sha256"
    printf '%s\n' "$t"
}

prepare_source() {
    local tarball=$1 src=$2
    log "extracting $(basename "$tarball")"
    rm -rf "$src" "$src.tmp"
    mkdir -p "$src.tmp"
    tar -C "$src.tmp" --strip-components=1 -xf "$tarball"
    # Debian's +ds repack drops the prebuilt firmware.  QEMU's build still
    # wants to decompress the EDK2 images when bzip2 exists; give it empty
    # ones (we boot guests with -kernel and need no firmware).
    local f
    for f in $(sed -n '/fds = \[/,/\]/p' "$src.tmp/pc-bios/meson.build" |
               grep -o "'edk2-[^']*'" | tr -d "'"); do
        [ -e "$src.tmp/pc-bios/$f.bz2" ] || bzip2 -c </dev/null >"$src.tmp/pc-bios/$f.bz2"
    done
    local git=(git -C "$src.tmp" -c user.name=hvcproxyd-build
               -c user.email=hvcproxyd-build@localhost -c commit.gpgsign=false)
    "${git[@]}" init -q
    "${git[@]}" add -A
    "${git[@]}" commit -q -m "QEMU $QEMU_VERSION (Debian $QEMU_TARBALL)"
    local patches=()
    mapfile -t patches < <(patch_files)
    if [ ${#patches[@]} -gt 0 ]; then
        log "applying ${#patches[@]} patch(es) with git am"
        "${git[@]}" am -q --whitespace=nowarn "${patches[@]}" ||
            die "git am failed in $src.tmp; see 'git -C $src.tmp am --show-current-patch'"
    else
        log "no patches to apply (stock QEMU)"
    fi
    mv "$src.tmp" "$src"
}

configure_and_build() {
    local src=$1 build=$2
    if [ ! -f "$build/build.ninja" ]; then
        log "configuring: ${CONFIGURE_FLAGS[*]}"
        rm -rf "$build"
        mkdir -p "$build"
        ( cd "$build" && "$src/configure" --python="$HVC_CACHE/meson-venv/bin/python3" \
              "${CONFIGURE_FLAGS[@]}" ) >"$build.configure.log" 2>&1 || {
            tail -30 "$build.configure.log" >&2
            rm -f "$build/build.ninja"
            die "configure failed (full log: $build.configure.log)"
        }
    fi
    log "building qemu-system-aarch64 with ninja -j$JOBS (cold: ~7-10 min on 2 cores; log: $build.ninja.log)"
    local start=$SECONDS
    # Progress: print ninja's [n/m] counter every 100 steps.
    if ! ninja -C "$build" -j"$JOBS" qemu-system-aarch64 2>&1 | tee "$build.ninja.log" |
         awk '/^\[[0-9]+\/[0-9]+\]/ { split(substr($1, 2), a, "/");
                                      if (a[1] % 100 == 0 || a[1] == a[2]) {
                                          printf "[qemu-build]   %s\n", $1 > "/dev/stderr" } }
              /error:|FAILED/ { print > "/dev/stderr" }'; then
        die "build failed (log: $build.ninja.log)"
    fi
    log "build finished in $((SECONDS - start)) s"
}

main() {
    "$INTEGRATION_DIR/setup.sh" --host-only >&2

    local key dir
    key=$(compute_key)
    [ "$PATCHES" = yes ] || key="stock-$key"
    dir="$HVC_CACHE/qemu/$key"
    local bin="$dir/build/qemu-system-aarch64"
    [ "$FORCE" = yes ] && rm -rf "$dir"
    if [ -f "$dir/done" ] && [ -x "$bin" ]; then
        log "up to date: $bin (key $key)"
    else
        mkdir -p "$dir"
        if [ ! -d "$dir/src" ]; then
            prepare_source "$(get_tarball)" "$dir/src"
        fi
        configure_and_build "$dir/src" "$dir/build"
        [ -x "$bin" ] || die "no $bin after the build"
        date -u +%FT%TZ > "$dir/done"
    fi
    if [ "$PATCHES" = yes ]; then
        ln -sfn "$key" "$HVC_CACHE/qemu/current"
        prune_old "$key"
    fi
    printf '%s\n' "$bin"
}

# Keep the newest three patched builds (and any stock build).
prune_old() {
    local keep=$1 d n=0
    while read -r d; do
        [ "$(basename "$d")" = "$keep" ] && continue
        n=$((n + 1))
        if [ $n -ge 3 ]; then
            log "removing old build $d"
            rm -rf "$d"
        fi
    done < <(find "$HVC_CACHE/qemu" -mindepth 1 -maxdepth 1 -type d ! -name 'stock-*' \
                  -printf '%T@ %p\n' | sort -rn | cut -d' ' -f2-)
}

main
