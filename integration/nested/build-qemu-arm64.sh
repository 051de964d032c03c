#!/bin/bash
# Cross-build the patched QEMU 10.0.2 (aarch64-softmmu, KVM only) as a
# static aarch64 Linux executable, to run inside an arm64 Linux VM (the "L1"
# host of the nested setup: Debian's arm64 cloud kernel, a busybox
# initramfs, no libc) as
#   qemu-system-aarch64 -M virt -accel kvm -cpu host -nographic -nic none \
#       -kernel X -initrd Y -serial mon:stdio -chardev serial,id=c,path=/dev/ttyAMA1 ...
#
# Same source and patches as ../qemu/build.sh, with the same steps
# (../qemu/source.sh): Debian's orig tarball (size and sha256 pinned in
# ../lib.sh), ../qemu/patches/*.patch applied with git am onto a git
# repository of the tarball.  The arm64 libraries (glib,
# pcre2, zlib, libfdt) come from Debian arm64 -dev packages fetched with
# "apt-get download" through the private apt configuration (../lib.sh) and
# unpacked with "dpkg-deb -x" into a sysroot: dpkg's state is left alone.
# The compiler is gcc-aarch64-linux-gnu; configure's --cross-prefix makes
# the meson cross file (build/config-meson.cross), whose pkg-config is a
# wrapper confined to the sysroot.
#
# Cache, under ${HVCPROXYD_CACHE:-~/.cache/hvcproxyd}/nested/qemu-arm64/:
#   <key>/bin/qemu-system-aarch64  the static binary; key = hash(tarball,
#                                  configure flags, device config, arm64
#                                  packages, meson, this script,
#                                  ../qemu/source.sh, every patch)
#   current -> <key>               the last build
#   work/{src,build,sysroot}       source tree (git: "base" + the patches),
#                                  build directory and sysroot, kept for
#                                  incremental rebuilds; work/base-key says
#                                  what they were made for
#   debs/                          the downloaded arm64 packages
# Unchanged inputs: no rebuild (well under a second).  Only the patches
# changed: the new commits are checked out over the old ones and ninja
# rebuilds what differs.
#
# Prints the output directory on stdout; progress goes to stderr.
set -euo pipefail
LOG_TAG=qemu-arm64
NESTED_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$NESTED_DIR/../lib.sh"
QEMU_DIR="$INTEGRATION_DIR/qemu"
SELF="$NESTED_DIR/$(basename "${BASH_SOURCE[0]}")"

usage() {
    cat <<USAGE
Usage: integration/nested/build-qemu-arm64.sh [--force] [--help]

Cross-builds QEMU $QEMU_VERSION with integration/qemu/patches/*.patch as a
static aarch64 Linux qemu-system-aarch64 (KVM only, virt machine) and prints
the output directory, which holds bin/qemu-system-aarch64.

  --force   forget the cached build, work tree and sysroot; build afresh
  --help    this text

Cache: \$HVCPROXYD_CACHE (default ~/.cache/hvcproxyd)/nested/qemu-arm64/
USAGE
}

FORCE=no
for arg in "$@"; do
    case "$arg" in
    --force) FORCE=yes ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $arg" ;;
    esac
done

ROOT="$HVC_CACHE/nested/qemu-arm64"
WORK="$ROOT/work"
SYSROOT="$WORK/sysroot"
CROSS=aarch64-linux-gnu-
TRIPLET=aarch64-linux-gnu

# Debian arm64 packages unpacked into the sysroot: the static libraries
# (and headers) of what QEMU links.  The runtime packages are not needed
# for a static link.
SYSROOT_PACKAGES=(libglib2.0-dev libpcre2-dev zlib1g-dev libfdt-dev)

# configs/devices/aarch64-softmmu/$DEVICES.mak, written into the source
# tree.  With --without-default-devices, Kconfig "imply" lines are not
# followed, so HVC_FORWARDER (implied by ARM_VIRT) is named explicitly.
DEVICES=hvc-nested
DEVICES_MAK='# hvcproxyd nested L1 host: the virt machine (PL011, GICv3, fdt) and
# the hvc-forwarder object; nothing implied (PCI devices, TPM, VFIO ...)
CONFIG_ARM_VIRT=y
CONFIG_HVC_FORWARDER=y'

# shellcheck source=../qemu/source.sh
source "$QEMU_DIR/source.sh"

CONFIGURE_FLAGS=(
    --cross-prefix=$CROSS
    # ${CROSS}gcc --sysroot=\$SYSROOT: libfdt has no .pc file, and meson
    # looks for it in the compiler's own search directories
    "--cc=$WORK/${CROSS}gcc"
    --target-list=aarch64-softmmu
    --without-default-features
    --without-default-devices
    --with-devices-aarch64=$DEVICES
    --enable-kvm
    --disable-tcg
    --enable-fdt=system
    --static
    "${QEMU_COMMON_FLAGS[@]}"
)


# Bump when prepare_source(), the sysroot or the build layout changes.
TREE_FORMAT=1

# The device configuration in the source tree (untracked; rewritten only
# when it differs).
write_devices_mak() {
    local mak="$1/configs/devices/aarch64-softmmu/$DEVICES.mak"
    if [ "$(cat "$mak" 2>/dev/null)" != "$DEVICES_MAK" ]; then
        printf '%s\n' "$DEVICES_MAK" > "$mak"
    fi
}

# --- the arm64 sysroot ---

# Download one arm64 package into $ROOT/debs; print the .deb's path.
fetch_deb() {
    local spec=$1 dir="$ROOT/debs" deb empty
    mkdir -p "$dir"
    # From an empty directory: apt-get prints nothing for a file already here.
    empty=$(mktemp -d)
    deb=$( cd "$empty" && apt-get download --print-uris "$spec" 2>/dev/null |
           awk '{ print $2 }' | head -1 ) || true
    rmdir "$empty"
    [ -n "$deb" ] || return 1
    if [ ! -s "$dir/$deb" ]; then
        log "downloading $spec -> $deb"
        ( cd "$dir" && apt-get -q download "$spec" >/dev/null 2>&1 ) || return 1
    fi
    printf '%s\n' "$dir/$deb"
}

make_sysroot() {
    local sysroot=$1 p deb missing=() debs=()
    export_private_apt
    [ -d "$PRIVATE_APT/lists" ] && ls "$PRIVATE_APT/lists"/*binary-arm64_Packages* >/dev/null 2>&1 ||
        private_apt_update || true
    for p in "${SYSROOT_PACKAGES[@]}"; do
        if deb=$(fetch_deb "$p:arm64"); then
            debs+=("$deb")
        else
            missing+=("$p:arm64")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        # Perhaps the lists are stale: update once and retry those.
        private_apt_update || true
        local still=()
        for p in "${missing[@]}"; do
            if deb=$(fetch_deb "$p"); then debs+=("$deb"); else still+=("$p"); fi
        done
        [ ${#still[@]} -eq 0 ] ||
            die "cannot download these arm64 packages with the private apt configuration ($APT_CONFIG): ${still[*]}"
    fi
    log "unpacking ${#debs[@]} arm64 package(s) into the sysroot"
    rm -rf "$sysroot" "$sysroot.tmp"
    mkdir -p "$sysroot.tmp"
    for deb in "${debs[@]}"; do
        dpkg-deb -x "$deb" "$sysroot.tmp" || die "dpkg-deb -x $deb failed"
        basename "$deb" >> "$sysroot.tmp/.packages"
    done
    # Check that every static library the link needs is there.
    local a libdir="$sysroot.tmp/usr/lib/$TRIPLET" absent=()
    for a in libglib-2.0.a libgmodule-2.0.a libpcre2-8.a libz.a libfdt.a; do
        [ -f "$libdir/$a" ] || absent+=("$a")
    done
    [ ${#absent[@]} -eq 0 ] ||
        die "the arm64 packages (${SYSROOT_PACKAGES[*]}) lack: ${absent[*]} (in $libdir)"
    mv "$sysroot.tmp" "$sysroot"
}

# The cross compiler with the sysroot, and pkg-config confined to it (both
# are named in the meson cross file).
write_wrappers() {
    local sysroot=$1 out=$2/pkg-config cc=$2/${CROSS}gcc
    cat > "$cc.tmp" <<CC
#!/bin/sh
# ${CROSS}gcc with the arm64 sysroot (made by build-qemu-arm64.sh)
exec ${CROSS}gcc --sysroot='$sysroot' "\$@"
CC
    chmod +x "$cc.tmp"
    mv "$cc.tmp" "$cc"
    cat > "$out.tmp" <<PC
#!/bin/sh
# pkg-config for the arm64 sysroot (made by build-qemu-arm64.sh)
PKG_CONFIG_SYSROOT_DIR='$sysroot'
PKG_CONFIG_LIBDIR='$sysroot/usr/lib/$TRIPLET/pkgconfig:$sysroot/usr/share/pkgconfig'
export PKG_CONFIG_SYSROOT_DIR PKG_CONFIG_LIBDIR
unset PKG_CONFIG_PATH
exec pkg-config "\$@"
PC
    chmod +x "$out.tmp"
    mv "$out.tmp" "$out"
}

# --- build ---

check_tools() {
    local t missing=()
    for t in ${CROSS}gcc ${CROSS}ar ${CROSS}strip ${CROSS}readelf ninja pkg-config \
             dpkg-deb apt-get git tar bzip2 flock; do
        have_cmd "$t" || missing+=("$t")
    done
    [ -x "$HVC_CACHE/meson-venv/bin/python3" ] || missing+=("$HVC_CACHE/meson-venv (integration/setup.sh)")
    [ -f "/usr/$TRIPLET/lib/libc.a" ] || missing+=("/usr/$TRIPLET/lib/libc.a (libc6-dev-arm64-cross)")
    [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]}"
}

configure_and_build() {
    local src=$1 build=$2
    configure_qemu "$src" "$build" PKG_CONFIG="$WORK/pkg-config"
    log "building qemu-system-aarch64 with nice ninja -j2 (log: $build.ninja.log)"
    ninja_build "$build" 2 nice -n 5
}

install_output() {
    local build=$1 out=$2 bin info
    bin="$build/qemu-system-aarch64"
    [ -x "$bin" ] || die "no qemu-system-aarch64 after the build"
    info=$(LC_ALL=C ${CROSS}readelf -h -l "$bin")
    grep -q 'Machine:.*AArch64' <<<"$info" || die "$bin is not an AArch64 executable"
    ! grep -q 'INTERP' <<<"$info" || die "$bin is not static (it has a program interpreter)"
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp/bin"
    ${CROSS}strip -o "$out.tmp/bin/qemu-system-aarch64" "$bin"
    {
        echo "QEMU $QEMU_VERSION + integration/qemu/patches, static aarch64 (KVM only)"
        echo "configure: ${CONFIGURE_FLAGS[*]}"
        echo "devices: $(grep -v '^#' <<<"$DEVICES_MAK" | tr '\n' ' ')"
        echo "patches:"
        git -C "$WORK/src" log --reverse --format='  %s' base..HEAD
        echo "arm64 packages: $(tr '\n' ' ' < "$WORK/sysroot/.packages")"
        echo "built: $(date -u +%FT%TZ)"
    } > "$out.tmp/BUILDINFO"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    date -u +%FT%TZ > "$out/done"
}

main() {
    local base key out
    base=$(base_key "devices $DEVICES_MAK" "packages ${SYSROOT_PACKAGES[*]}")
    key=$(build_key "$base" "$SELF")
    out="$ROOT/$key"
    if [ "$FORCE" = no ] && [ -f "$out/done" ] && [ -x "$out/bin/qemu-system-aarch64" ]; then
        log "up to date: $out (key $key)"
        ln -sfn "$key" "$ROOT/current"
        printf '%s\n' "$out"
        return
    fi

    "$INTEGRATION_DIR/setup.sh" --host-only >&2
    check_tools
    mkdir -p "$ROOT"
    take_lock nested-qemu-arm64
    [ "$FORCE" = yes ] && rm -rf "$out" "$WORK"
    if [ -f "$out/done" ] && [ -x "$out/bin/qemu-system-aarch64" ]; then
        log "built meanwhile by another run: $out"
    else
        if [ "$(cat "$WORK/base-key" 2>/dev/null)" != "$base" ]; then
            [ -d "$WORK" ] && log "the work tree is for other sources, flags or packages: starting afresh"
            rm -rf "$WORK"
        fi
        mkdir -p "$WORK"
        [ -f "$SYSROOT/.packages" ] || make_sysroot "$SYSROOT"
        write_wrappers "$SYSROOT" "$WORK"
        if [ ! -d "$WORK/src/.git" ]; then
            prepare_source "$(get_tarball)" "$WORK/src"
        fi
        echo "$base" > "$WORK/base-key"
        checkout_patches "$WORK/src"
        write_devices_mak "$WORK/src"
        configure_and_build "$WORK/src" "$WORK/build"
        install_output "$WORK/build" "$out"
        log "built $out/bin/qemu-system-aarch64 ($(du -h "$out/bin/qemu-system-aarch64" | cut -f1), static)"
    fi
    ln -sfn "$key" "$ROOT/current"
    prune_old "$ROOT" "$key"
    printf '%s\n' "$out"
}

main
