#!/bin/bash
# Install everything the QEMU integration needs, from a bare Debian 12 host.
#
#  - host packages (QEMU build dependencies, the aarch64 cross toolchain,
#    what the client kernel build and the DT helper need)
#  - a private apt configuration with bookworm-backports and arm64
#    (under $HVCPROXYD_CACHE/apt; /etc/apt and dpkg are left alone)
#  - meson >= 1.5 for QEMU 10 in a private venv
#  - the arm64 Debian kernel and busybox-static, downloaded with
#    "apt-get download" and unpacked with "dpkg-deb -x" (never installed)
#
# Idempotent: a second run only checks and takes a few seconds.
# Usage: integration/setup.sh [--host-only]
set -euo pipefail
LOG_TAG=setup
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HOST_ONLY=no
[ "${1:-}" = "--host-only" ] && HOST_ONLY=yes

HOST_PACKAGES=(
    # QEMU build
    build-essential ninja-build pkg-config python3 python3-venv
    libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev flex bison
    xz-utils bzip2 git ca-certificates
    # guests; arm64 kernel headers for qemu/kvm-check.sh
    binutils-aarch64-linux-gnu gcc-aarch64-linux-gnu linux-libc-dev-arm64-cross libc6-dev-arm64-cross
    # initramfs
    cpio gzip
    # the client kernel (linux/build-kernel.sh: apt-get source + dpkg-source, kbuild)
    # and the DT helper (tests/linux_dt.py)
    dpkg-dev bc device-tree-compiler
)

install_host_packages() {
    local missing=() p
    for p in "${HOST_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
            missing+=("$p")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "host packages: all ${#HOST_PACKAGES[@]} present"
        return
    fi
    log "host packages: installing ${missing[*]}"
    local sudo=() aptlog="$HVC_CACHE/apt-install.log"
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    # The system's own apt configuration, not the private one.
    if ! env -u APT_CONFIG "${sudo[@]}" apt-get -q update >"$aptlog" 2>&1; then
        tail -20 "$aptlog" >&2
        die "apt-get update failed (log: $aptlog)"
    fi
    if ! env -u APT_CONFIG DEBIAN_FRONTEND=noninteractive "${sudo[@]}" \
            apt-get -q install -y --no-install-recommends "${missing[@]}" >>"$aptlog" 2>&1; then
        tail -20 "$aptlog" >&2
        die "apt-get install failed for: ${missing[*]} (log: $aptlog)"
    fi
    log "host packages: installed"
}

MESON_VENV="$HVC_CACHE/meson-venv"
install_meson() {
    if [ -x "$MESON_VENV/bin/meson" ] &&
       [ "$("$MESON_VENV/bin/meson" --version 2>/dev/null)" = "$MESON_VERSION" ]; then
        log "meson $MESON_VERSION: present in $MESON_VENV"
        return
    fi
    log "meson $MESON_VERSION: creating $MESON_VENV (Debian 12's meson 1.0 is too old for QEMU 10)"
    rm -rf "$MESON_VENV"
    python3 -m venv "$MESON_VENV"
    "$MESON_VENV/bin/pip" install -q --disable-pip-version-check \
        "meson==$MESON_VERSION" "pycotap>=1.1.0" ||
        die "pip could not install meson==$MESON_VERSION"
}

# Download one arm64 package (name[:arch][/release] or name[:arch]=version)
# into $HVC_CACHE/debs and unpack it into $HVC_CACHE/debs/<basename>/.
# Prints the unpack directory.
fetch_arm64_deb() {
    local spec=$1 dir="$HVC_CACHE/debs" deb
    mkdir -p "$dir"
    # From an empty directory: apt-get prints nothing for a file already here.
    local empty
    empty=$(mktemp -d)
    deb=$( cd "$empty" && apt-get download --print-uris "$spec" 2>/dev/null |
           awk '{ print $2 }' | head -1 )
    rmdir "$empty"
    [ -n "$deb" ] || die "apt-get download: no such package: $spec"
    if [ ! -s "$dir/$deb" ]; then
        log "downloading $spec -> $deb"
        ( cd "$dir" && apt-get -q download "$spec" >/dev/null ) ||
            die "apt-get download $spec failed"
    fi
    local out="$dir/${deb%.deb}"
    if [ ! -f "$out/.unpacked" ]; then
        rm -rf "$out"
        dpkg-deb -x "$dir/$deb" "$out"
        touch "$out/.unpacked"
    fi
    printf '%s\n' "$out"
}

# The newest bookworm-backports 6.12 cloud kernel, else bookworm's 6.1.
fetch_arm64_kernel() {
    local dep
    dep=$(apt-cache show 'linux-image-cloud-arm64:arm64/bookworm-backports' 2>/dev/null |
          awk -F': ' '/^Depends:/ { split($2, a, " "); print a[1]; exit }')
    if [ -z "$dep" ]; then
        log "no bookworm-backports kernel; using bookworm's cloud kernel"
        dep=$(apt-cache show 'linux-image-cloud-arm64:arm64/bookworm' 2>/dev/null |
              awk -F': ' '/^Depends:/ { split($2, a, " "); print a[1]; exit }')
    fi
    [ -n "$dep" ] || die "cannot resolve linux-image-cloud-arm64:arm64"
    local d vmlinuz
    d=$(fetch_arm64_deb "$dep:arm64")
    vmlinuz=$(find "$d/boot" -name 'vmlinuz-*' | head -1)
    [ -n "$vmlinuz" ] || die "no /boot/vmlinuz-* in $dep"
    ln -sfn "$vmlinuz" "$HVC_CACHE/debs/vmlinuz-arm64"
    log "arm64 kernel: $vmlinuz"
}

fetch_arm64_busybox() {
    local d
    d=$(fetch_arm64_deb 'busybox-static:arm64')
    [ -x "$d/bin/busybox" ] || die "busybox-static:arm64 has no /bin/busybox"
    ln -sfn "$d/bin/busybox" "$HVC_CACHE/debs/busybox-arm64"
    log "arm64 busybox: $d/bin/busybox"
}

main() {
    take_lock setup
    log "cache: $HVC_CACHE"
    install_host_packages
    install_meson
    [ "$HOST_ONLY" = yes ] && return
    # A failing update with lists already present is tolerated; downloads
    # below fail loudly if the lists are missing.
    PRIVATE_APT_UPDATED=no
    private_apt_update || true
    # Resolve the packages again only when the lists changed (or a link is gone).
    if [ "$PRIVATE_APT_UPDATED" = no ] &&
       [ -e "$HVC_CACHE/debs/vmlinuz-arm64" ] && [ -e "$HVC_CACHE/debs/busybox-arm64" ]; then
        log "arm64 kernel and busybox: present ($(readlink "$HVC_CACHE/debs/vmlinuz-arm64" | xargs basename))"
    else
        fetch_arm64_kernel
        fetch_arm64_busybox
    fi
    log "done"
}

main "$@"
