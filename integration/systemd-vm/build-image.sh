#!/bin/bash
# Build the systemd-vm image: a Debian 12 (bookworm) amd64 root with systemd as
# PID 1, made with debootstrap from the Debian mirror this machine's apt uses,
# packed into an ext4 disk image with mkfs.ext4 -d (no loop device, no mount).
#
# Usage: integration/systemd-vm/build-image.sh [--force | --print-key]
#
# Output, in ${HVCPROXYD_CACHE:-~/.cache/hvcproxyd}/systemd-vm/<key>/ (key: a hash
# of this script, packages, agent.py, the mirror and debootstrap's version):
#   root.img  the disk (raw ext4, the whole disk is the file system: root=/dev/vda)
#   vmlinuz, initrd.img   the image's own kernel and initramfs, for -kernel/-initrd
# Prints that directory last on stdout; progress goes to stderr.  A warm run
# (the directory is complete) only hashes its inputs.  Runs one at a time (a lock).
#
# The image boots to hvc-agent.service (agent.py): commands come in over the
# virtio-serial port "ctl", so the tests need neither ssh nor a login.
# Needs root (debootstrap, file ownership in the image); installs debootstrap,
# e2fsprogs and qemu-system-x86 + qemu-utils (for the tests) with apt if missing.
set -euo pipefail
LOG_TAG=systemd-vm
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$HERE/../lib.sh"

SUITE=bookworm
IMAGE_SIZE=3G
DEBOOTSTRAP_TIMEOUT=${HVCPROXYD_DEBOOTSTRAP_TIMEOUT:-1200}
HOST_TOOLS=(debootstrap e2fsprogs qemu-system-x86 qemu-utils)

mode=""
case "${1:-}" in
"") ;;
--force|--print-key) mode=$1 ;;
*) die "usage: build-image.sh [--force | --print-key]" ;;
esac

packages() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HERE/packages" | tr -s ' \n' ','; }

key() {
    {
        sha256sum "$HERE/build-image.sh" "$HERE/packages" "$HERE/agent.py" | cut -d' ' -f1
        debian_mirror
        dpkg-query -W -f='${Version}\n' debootstrap 2>/dev/null || true
    } | sha256sum | cut -c1-16
}

if [ "$mode" = --print-key ]; then key; exit 0; fi
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap; the image's files are root's)"

install_host_tools() {
    local missing=() p
    for p in "${HOST_TOOLS[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]} (apt)"
    local aptlog="$HVC_CACHE/apt-install.log"
    mkdir -p "$HVC_CACHE"
    env -u APT_CONFIG apt-get -q update >"$aptlog" 2>&1 || { tail -20 "$aptlog" >&2; die "apt-get update failed"; }
    env -u APT_CONFIG DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends \
        "${missing[@]}" >>"$aptlog" 2>&1 || { tail -20 "$aptlog" >&2; die "apt-get install ${missing[*]} failed"; }
}

install_host_tools
take_lock systemd-vm
k=$(key)
out="$HVC_CACHE/systemd-vm/$k"
if [ "$mode" != --force ] && [ -f "$out/done" ]; then
    log "up to date: $out"
    printf '%s\n' "$out"
    exit 0
fi

mirror=$(debian_mirror)
work="$HVC_CACHE/systemd-vm/work"
debs="$HVC_CACHE/systemd-vm/debs"   # debootstrap's download cache, kept across keys
rm -rf "$work" "$out" "$out.tmp"
mkdir -p "$work" "$debs"
root="$work/root"
start=$(date +%s)

log "debootstrap $SUITE from $mirror into $root (several minutes on a cold cache)"
if ! timeout "$DEBOOTSTRAP_TIMEOUT" debootstrap --variant=minbase --include="$(packages)" \
        --cache-dir="$debs" "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -30 "$work/debootstrap.log" >&2
    tail -30 "$root/debootstrap/debootstrap.log" >&2 2>/dev/null || true
    die "debootstrap failed (log: $work/debootstrap.log)"
fi
log "debootstrap done ($(( $(date +%s) - start ))s)"

log "configuring the image"
echo hvc-systemd-vm > "$root/etc/hostname"
printf '127.0.1.1\thvc-systemd-vm\n' >> "$root/etc/hosts"
printf '/dev/vda / ext4 rw,noatime 0 1\n' > "$root/etc/fstab"
# No password; a root autologin on the serial console, for a person debugging by hand.
chroot "$root" passwd -d root >/dev/null
mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
cat > "$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200 %I $TERM
EOF
install -m755 "$HERE/agent.py" "$root/usr/local/sbin/hvc-agent"
cat > "$root/etc/systemd/system/hvc-agent.service" <<'EOF'
[Unit]
Description=hvcproxyd test agent on the virtio-serial port ctl
DefaultDependencies=no
After=systemd-udevd.service local-fs.target
[Service]
ExecStart=/usr/local/sbin/hvc-agent
Restart=always
RestartSec=1s
StandardOutput=journal+console
[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/hvc-agent.service "$root/etc/systemd/system/multi-user.target.wants/hvc-agent.service"
# Nothing the tests do not need: timers that would wake up under TCG, no network wait.
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
         fstrim.timer man-db.timer systemd-tmpfiles-clean.timer e2scrub_reap.service \
         systemd-networkd-wait-online.service getty@tty1.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done
printf '[Journal]\nStorage=volatile\nRateLimitBurst=100000\n' > "$root/etc/systemd/journald.conf"
# The kvm group QEMU's unit runs in (and the daemon's SupplementaryGroups=kvm).
chroot "$root" getent group kvm >/dev/null || chroot "$root" groupadd --system kvm
# /usr/local/bin gets the patched QEMU at test time (from the 9p share).
# libvirt (libvirt-vm1.xml): no AppArmor confinement of its QEMU.  The kernel has
# AppArmor, but the image has no apparmor package (no apparmor_parser), so the
# per-domain profile that virt-aa-helper writes could not be loaded and every
# domain start would fail; the DAC driver (libvirt-qemu:kvm) still applies.
printf '\n# the systemd-vm image (build-image.sh): no apparmor_parser here\nsecurity_driver = "none"\n' \
    >> "$root/etc/libvirt/qemu.conf"
# Its "default" network would need dnsmasq; the test domain has no network.
rm -f "$root/etc/libvirt/qemu/networks/autostart/default.xml"
rm -f "$root"/var/cache/apt/archives/*.deb
vmlinuz=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -1)
initrd=$(find "$root/boot" -maxdepth 1 -name 'initrd.img-*' | sort | tail -1)
[ -n "$vmlinuz" ] || die "no /boot/vmlinuz-* in the image"
[ -n "$initrd" ] || die "no /boot/initrd.img-* in the image (initramfs-tools did not run)"

log "mkfs.ext4 -d: $IMAGE_SIZE sparse image"
mkdir -p "$out.tmp"
rm -f "$out.tmp/root.img"
truncate -s "$IMAGE_SIZE" "$out.tmp/root.img"
mkfs.ext4 -q -F -L hvcroot -d "$root" "$out.tmp/root.img" >&2 || die "mkfs.ext4 -d failed"
cp "$vmlinuz" "$out.tmp/vmlinuz"
cp "$initrd" "$out.tmp/initrd.img"
cp "$root/debootstrap/debootstrap.log" "$out.tmp/" 2>/dev/null || true
rm -rf "$work"
touch "$out.tmp/done"
mv "$out.tmp" "$out"
log "built $out in $(( $(date +%s) - start ))s"
prune_old "$HVC_CACHE/systemd-vm" "$k"  # an image is about 820 MB
printf '%s\n' "$out"
