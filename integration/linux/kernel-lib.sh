# Shared steps of the kernel builds (build-kernel.sh, ../kernel/build-l1-kernel.sh):
# Debian's linux source, our patches on a hard-linked copy, make, the config check.
# Source it after ../lib.sh; do not run it.
# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
#
# The sourcing script sets, before calling these functions:
#   KROOT      the cache directory of the kernel builds ($HVC_CACHE/kernel)
#   pristine   the unpacked Debian tree (kernel_pristine_dir sets it)
#   worksrc    the patched hard-linked copy make runs in
#   build      make's O= directory
#   FRAGMENT   the config fragment (check_config)

# The Debian source version, pinned so that a warm cache needs no network and
# a new backports upload does not silently rebuild.  bookworm-backports' 6.12.95
# is the same version as the stock kernel integration/setup.sh downloads.
LINUX_SRC_VERSION="${HVCIT_LINUX_SRC_VERSION:-6.12.95-1~bpo12+1}"
JOBS="${HVCIT_KERNEL_JOBS:-$(nproc)}"
MAKE_TIMEOUT="${HVCIT_KERNEL_TIMEOUT:-3600}"
CROSS=aarch64-linux-gnu-
KROOT="$HVC_CACHE/kernel"
pristine="$KROOT/src/linux-${LINUX_SRC_VERSION//\~/-}"

need() {  # need COMMAND PACKAGE
    have_cmd "$1" || die "$1 not found: install the Debian package $2 (integration/setup.sh installs it)"
}

# What every kernel build needs.
need_kernel_tools() {
    need "${CROSS}gcc" gcc-aarch64-linux-gnu
    need make make
    need flex flex
    need bison bison
    need bc bc
    need perl perl
    need dpkg-source dpkg-dev
    need apt-get apt
    need timeout coreutils
}

hash_files() { local f; for f in "$@"; do printf '%s %s\n' "$(basename "$f")" "$(sha256_of "$f")"; done; }
short_key() { sha256sum | cut -c1-16; }
# The key of a patched source tree: the Debian version and the patches.
series_key() {
    {
        echo "debian-source linux $LINUX_SRC_VERSION"
        hash_files "$@"
    } | short_key
}

# The key of a build: $src_key, the given files, $KERNEL_RECIPE and the compiler.
build_key() {
    {
        echo "src $src_key"
        hash_files "$@"
        echo "recipe $KERNEL_RECIPE"
        echo "cc $("${CROSS}gcc" --version | head -1)"
    } | short_key
}

# Download (once) and unpack (once) Debian's source into $pristine.
fetch_source() {
    [ -f "$pristine/.hvc-done" ] && return
    mkdir -p "$KROOT/src"
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

# apply_patches DIR PATCH...: GNU patch writes a new file and renames it, so
# on a hard-linked copy of $pristine the pristine tree is never modified.
apply_patches() {
    local dir=$1 p
    shift
    for p in "$@"; do
        log "  applying $(basename "$p")"
        patch -d "$dir" -p1 --quiet --no-backup-if-mismatch --forward < "$p" ||
            die "patch $(basename "$p") does not apply to linux $LINUX_SRC_VERSION"
    done
}

kmake() {
    timeout "$MAKE_TIMEOUT" make -C "$worksrc" O="$build" ARCH=arm64 CROSS_COMPILE="$CROSS" \
        KBUILD_BUILD_USER=hvcproxyd KBUILD_BUILD_HOST=integration "$@"
}

# Every option of $FRAGMENT must be in the final .config with its value.
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
        die "$(basename "$FRAGMENT") options not in the final .config (a dependency is missing): ${bad[*]}"
}

# allnoconfig + $FRAGMENT, then check_config; LOG is make's log.
configure_kernel() {
    local blog=$1
    log "configuring: allnoconfig + $(basename "$FRAGMENT") (KCONFIG_ALLCONFIG)"
    kmake -s KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >"$blog" 2>&1 ||
        { tail -20 "$blog" >&2; die "make allnoconfig failed (log $blog)"; }
    check_config
}

# publish_kernel OUT INFO FILE...: OUT gets the FILEs, the .config as config,
# INFO as info and a done stamp, all at once (built in OUT.tmp, then renamed).
publish_kernel() {
    local out=$1 info=$2
    shift 2
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp"
    cp "$@" "$out.tmp/"
    cp "$build/.config" "$out.tmp/config"
    printf '%s\n' "$info" > "$out.tmp/info"
    date -u +%FT%TZ > "$out.tmp/done"
    rm -rf "$out"
    mv "$out.tmp" "$out"
}
