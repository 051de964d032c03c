# The patched QEMU source, shared by integration/qemu/build.sh (the host
# binary) and integration/nested/build-qemu-arm64.sh (the static aarch64
# one): fetch and verify the pinned QEMU tarball, unpack it into a git work
# tree with commit "base", check out the patch series over it; the cache
# keys, the configure and ninja steps, and the pruning of old builds.
#
# Source it after ../lib.sh; it only defines functions and QEMU_COMMON_FLAGS.  The sourcing script
# sets LOG_TAG, QEMU_DIR (this directory), CONFIGURE_FLAGS, TREE_FORMAT and,
# optionally, PATCHES (yes, the default, or no for stock QEMU).  The build
# key hashes this file, so a change here makes both scripts rebuild.
# shellcheck shell=bash

# Configure flags both builds end with: no docs, tools, user-mode emulators,
# debug info, firmware blobs or downloads.
# shellcheck disable=SC2034  # used by the scripts that source this file
QEMU_COMMON_FLAGS=(
    --disable-docs
    --disable-tools
    --disable-user
    --disable-debug-info
    --disable-install-blobs
    --disable-download
)

# git with a fixed identity, for the commits of the source tree.
build_git() {
    git -c user.name=hvcproxyd-build -c user.email=hvcproxyd-build@localhost \
        -c commit.gpgsign=false -c core.autocrlf=false "$@"
}

patch_files() {
    [ "${PATCHES:-yes}" = yes ] || return 0
    find "$QEMU_DIR/patches" -maxdepth 1 -name '*.patch' | LC_ALL=C sort
}

# What a source tree and build directory depend on: the tarball, the
# configure flags, the script's own inputs given as arguments (one line
# each), meson and $TREE_FORMAT.
base_key() {
    {
        echo "tarball $QEMU_TARBALL_SHA256"
        echo "configure ${CONFIGURE_FLAGS[*]}"
        [ $# -eq 0 ] || printf '%s\n' "$@"
        echo "meson $MESON_VERSION"
        echo "tree format $TREE_FORMAT"
    } | sha256sum | cut -c1-16
}

# What one binary depends on: the base key $1, the building script $2, this
# file and every patch.
build_key() {
    {
        echo "base $1"
        echo "$(basename "$2") $(sha256_of "$2")"
        echo "source.sh $(sha256_of "$QEMU_DIR/source.sh")"
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

# Print the path of a verified tarball, fetching it if needed.  The tarball
# ($HVC_CACHE/src) serves both scripts; a fetched one is moved into place
# whole.
get_tarball() {
    local dir="$HVC_CACHE/src" t
    t="$dir/$QEMU_TARBALL"
    mkdir -p "$dir"
    if tarball_ok "$t"; then
        printf '%s\n' "$t"
        return
    fi
    log "fetching $QEMU_TARBALL with apt-get source (bookworm-backports)"
    local tmp
    tmp=$(mktemp -d "$dir/apt-source.XXXXXX")
    # The .dsc and the Debian diff may 404 on the mirror: only the orig
    # tarball matters, so apt-get's exit status is not trusted either way.
    if private_apt_update || [ -d "$PRIVATE_APT/lists" ]; then
        ( cd "$tmp" && apt-get -q source --download-only qemu/bookworm-backports ) \
            >"$dir/apt-source.log" 2>&1 || true
    fi
    if tarball_ok "$tmp/$QEMU_TARBALL"; then
        mv "$tmp/$QEMU_TARBALL" "$t"
        log "got $QEMU_TARBALL from the Debian mirror"
    elif tarball_ok "$QEMU_TARBALL_FALLBACK"; then
        log "the mirror did not deliver a verified tarball; using $QEMU_TARBALL_FALLBACK"
        cp "$QEMU_TARBALL_FALLBACK" "$tmp/copy" && mv "$tmp/copy" "$t"
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
    build_git -C "$src.tmp" init -q
    build_git -C "$src.tmp" add -A
    build_git -C "$src.tmp" commit -q -m "QEMU $QEMU_VERSION (Debian $QEMU_TARBALL)"
    git -C "$src.tmp" tag base
    mv "$src.tmp" "$src"
}

# Check out base + the patches in $src, touching only files that change.
checkout_patches() {
    local src=$1 patches=() target am="$1.am"
    mapfile -t patches < <(patch_files)
    if [ ${#patches[@]} -eq 0 ]; then
        if [ "${PATCHES:-yes}" = yes ]; then
            log "no patches in $QEMU_DIR/patches: stock QEMU"
        else
            log "no patches: stock QEMU"
        fi
        target=$(git -C "$src" rev-parse base)
    else
        log "applying ${#patches[@]} patch(es) with git am"
        git -C "$src" worktree remove --force "$am" >/dev/null 2>&1 || rm -rf "$am"
        git -C "$src" worktree prune
        git -C "$src" worktree add -q --detach "$am" base
        if ! build_git -C "$am" am -q --whitespace=nowarn "${patches[@]}"; then
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

# Configure $1 (the source) into $2 (the build directory) with
# $CONFIGURE_FLAGS unless it is configured already; any further arguments
# are VAR=value for configure's environment.
configure_qemu() {
    local src=$1 build=$2
    shift 2
    [ ! -f "$build/build.ninja" ] || return 0
    log "configuring: ${CONFIGURE_FLAGS[*]}"
    rm -rf "$build"
    mkdir -p "$build"
    ( cd "$build" && env "$@" "$src/configure" \
          --python="$HVC_CACHE/meson-venv/bin/python3" "${CONFIGURE_FLAGS[@]}" ) \
        >"$build.configure.log" 2>&1 || {
        tail -30 "$build.configure.log" >&2
        rm -f "$build/build.ninja"
        die "configure failed (full log: $build.configure.log)"
    }
}

# Build qemu-system-aarch64 in $1 with ninja -j$2; any further arguments are
# a command that runs ninja (nice -n 5).
ninja_build() {
    local build=$1 jobs=$2 start=$SECONDS
    shift 2
    # Progress: ninja's [n/m] counter every 100 steps, and any error.
    if ! "$@" ninja -C "$build" -j"$jobs" qemu-system-aarch64 2>&1 | tee "$build.ninja.log" |
         awk -v tag="$LOG_TAG" '
              /^\[[0-9]+\/[0-9]+\]/ { split(substr($1, 2), a, "/");
                                      if (a[1] % 100 == 0 || a[1] == a[2]) {
                                          printf "[%s]   %s\n", tag, $1 > "/dev/stderr" } }
              /error:|FAILED/ { print > "/dev/stderr" }'; then
        die "build failed (log: $build.ninja.log)"
    fi
    log "ninja finished in $((SECONDS - start)) s"
}

