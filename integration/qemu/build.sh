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
#                               flags, meson, this script, every patch);
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

CONFIGURE_FLAGS=(
    --target-list=aarch64-softmmu
    --without-default-features
    --enable-tcg
    --enable-kvm             # takes effect on an aarch64 host only
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
GIT_ID=(-c user.name=hvcproxyd-build -c user.email=hvcproxyd-build@localhost
        -c commit.gpgsign=false -c core.autocrlf=false)

patch_files() {
    [ "$PATCHES" = yes ] || return 0
    find "$QEMU_DIR/patches" -maxdepth 1 -name '*.patch' | LC_ALL=C sort
}

# Bump when prepare_source() or the build directory's layout changes.
TREE_FORMAT=1

# What a source tree and build directory depend on.
base_key() {
    {
        echo "tarball $QEMU_TARBALL_SHA256"
        echo "configure ${CONFIGURE_FLAGS[*]}"
        echo "meson $MESON_VERSION"
        echo "tree format $TREE_FORMAT"
    } | sha256sum | cut -c1-16
}

# What one binary depends on.
build_key() {
    {
        echo "base $1"
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
        log "the mirror did not deliver a verified tarball; using $QEMU_TARBALL_FALLBACK"
        cp "$QEMU_TARBALL_FALLBACK" "$t.tmp" && mv "$t.tmp" "$t"
    else
        rm -rf "$tmp"
        die "no verified $QEMU_TARBALL (sha256 $QEMU_TARBALL_SHA256): apt-get source failed (see $dir/apt-source.log) and the fallback $QEMU_TARBALL_FALLBACK is missing or differs"
    fi
    rm -rf "$tmp"
    tarball_ok "$t" || die "$t does not match the pinned sha256"
    printf '%s\n' "$t"
}

# Unpack the tarball into a git repository whose first commit is tagged "base".
prepare_source() {
    local tarball=$1 src=$2
    log "extracting $(basename "$tarball")"
    rm -rf "$src" "$src.tmp"
    mkdir -p "$src.tmp"
    tar -C "$src.tmp" --strip-components=1 --no-same-owner -xf "$tarball"
    # Debian's +ds repack drops the prebuilt firmware.  QEMU's build still
    # wants to decompress the EDK2 images when bzip2 exists; give it empty
    # ones (the guests boot with -kernel and need no firmware).
    local f
    for f in $(sed -n '/fds = \[/,/\]/p' "$src.tmp/pc-bios/meson.build" |
               grep -o "'edk2-[^']*'" | tr -d "'"); do
        [ -e "$src.tmp/pc-bios/$f.bz2" ] || bzip2 -c </dev/null >"$src.tmp/pc-bios/$f.bz2"
    done
    git "${GIT_ID[@]}" -C "$src.tmp" init -q
    git "${GIT_ID[@]}" -C "$src.tmp" add -A
    git "${GIT_ID[@]}" -C "$src.tmp" commit -q -m "QEMU $QEMU_VERSION (Debian $QEMU_TARBALL)"
    git -C "$src.tmp" tag base
    mv "$src.tmp" "$src"
}

# Check out base + the patches in $src, touching only files that change.
checkout_patches() {
    local src=$1 patches=() target am="$1.am"
    mapfile -t patches < <(patch_files)
    if [ ${#patches[@]} -eq 0 ]; then
        log "no patches: stock QEMU"
        target=$(git -C "$src" rev-parse base)
    else
        log "applying ${#patches[@]} patch(es) with git am"
        git -C "$src" worktree remove --force "$am" >/dev/null 2>&1 || rm -rf "$am"
        git -C "$src" worktree prune
        git -C "$src" worktree add -q --detach "$am" base
        if ! git "${GIT_ID[@]}" -C "$am" am -q --whitespace=nowarn "${patches[@]}"; then
            git -C "$am" am --show-current-patch=diff 2>/dev/null | head -20 >&2 || true
            die "git am failed; the half-applied tree is in $am"
        fi
        target=$(git -C "$am" rev-parse HEAD)
        git -C "$src" worktree remove --force "$am"
    fi
    git -C "$src" reset -q --hard
    git -C "$src" checkout -q --detach "$target"
    git -C "$src" log --oneline base..HEAD >&2
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
    log "building qemu-system-aarch64 with ninja -j$JOBS (cold: ~5-8 min on 2 cores; log: $build.ninja.log)"
    local start=$SECONDS
    # Progress: ninja's [n/m] counter every 100 steps, and any error.
    if ! ninja -C "$build" -j"$JOBS" qemu-system-aarch64 2>&1 | tee "$build.ninja.log" |
         awk '/^\[[0-9]+\/[0-9]+\]/ { split(substr($1, 2), a, "/");
                                      if (a[1] % 100 == 0 || a[1] == a[2]) {
                                          printf "[qemu-build]   %s\n", $1 > "/dev/stderr" } }
              /error:|FAILED/ { print > "/dev/stderr" }'; then
        die "build failed (log: $build.ninja.log)"
    fi
    log "ninja finished in $((SECONDS - start)) s"
}

# Keep the newest three patched binaries.
prune_old() {
    local keep_key=$1 d n=0
    while read -r d; do
        case "$(basename "$d")" in
        "$keep_key" | stock-* | work) continue ;;
        esac
        n=$((n + 1))
        if [ $n -ge 3 ]; then
            log "removing old build $d"
            rm -rf "$d"
        fi
    done < <(find "$HVC_CACHE/qemu" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' |
             sort -rn | cut -d' ' -f2-)
}

main() {
    "$INTEGRATION_DIR/setup.sh" --host-only >&2
    take_lock qemu-build

    local base key out work bin
    base=$(base_key)
    key=$(build_key "$base")
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
        prune_old "$key"
    fi
    printf '%s\n' "$bin"
}

main
