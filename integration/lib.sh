# Shared helpers for the integration scripts.  Source it; do not run it.
# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this

INTEGRATION_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$INTEGRATION_DIR/.." && pwd)"
HVC_CACHE="${HVCPROXYD_CACHE:-$HOME/.cache/hvcproxyd}"

# QEMU source: Debian's repacked upstream tarball (bookworm-backports).
QEMU_VERSION=10.0.2
QEMU_TARBALL="qemu_${QEMU_VERSION}+ds.orig.tar.xz"
QEMU_TARBALL_SIZE=39449628
QEMU_TARBALL_SHA256=0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1
# Fallback copy, relative to the repository (CI clones next to shared/).
QEMU_TARBALL_FALLBACK="$REPO_ROOT/../shared/vendor/$QEMU_TARBALL"

# Meson version QEMU 10.0 wants (pythondeps.toml: >= 1.5.0).
MESON_VERSION=1.5.2

log() { printf '[%s %s] %s\n' "$(date -u +%H:%M:%S)" "${LOG_TAG:-integration}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

have_cmd() { command -v "$1" >/dev/null 2>&1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Print the URI of the Debian mirror the system's apt is configured with.
# Reads both one-line (.list) and deb822 (.sources) files and returns the
# first URI that serves the "bookworm" suite from a .../debian archive.
debian_mirror() {
    local f uri=""
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(awk '$1 == "deb" && $0 ~ / bookworm( |$)/ {
                     for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit }
                   }' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ]; then
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -r "$f" ] || continue
            uri=$(awk 'BEGIN { RS = ""; FS = "\n" }
                       /(^|\n)Suites:[^\n]*bookworm( |\n|$)/ && !/debian-security/ {
                         for (i = 1; i <= NF; i++)
                           if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); print a[2]; exit }
                       }' "$f")
            [ -n "$uri" ] && break
        done
    fi
    [ -n "$uri" ] || die "could not find the Debian mirror in /etc/apt/sources.list*"
    printf '%s\n' "${uri%/}"
}

# A private apt configuration that adds bookworm-backports (deb + deb-src)
# and the arm64 architecture without touching /etc/apt or dpkg's state.
PRIVATE_APT="$HVC_CACHE/apt"
export_private_apt() {
    local mirror
    mirror=$(debian_mirror)
    local key=/usr/share/keyrings/debian-archive-keyring.gpg signed=""
    [ -r "$key" ] && signed=" signed-by=$key"
    mkdir -p "$PRIVATE_APT"/{lists/partial,archives/partial,sourceparts,prefs}
    cat > "$PRIVATE_APT/sources.list" <<EOF
deb [arch=amd64,arm64$signed] $mirror bookworm main
deb [arch=amd64,arm64$signed] $mirror bookworm-backports main
deb-src ${signed:+[${signed# }] }$mirror bookworm-backports main
EOF
    cat > "$PRIVATE_APT/apt.conf" <<EOF
Dir::Etc::sourcelist "$PRIVATE_APT/sources.list";
Dir::Etc::sourceparts "$PRIVATE_APT/sourceparts";
Dir::Etc::preferencesparts "$PRIVATE_APT/prefs";
Dir::State::lists "$PRIVATE_APT/lists";
Dir::Cache "$PRIVATE_APT";
Dir::Cache::archives "$PRIVATE_APT/archives";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT::Architecture "amd64";
APT::Architectures { "amd64"; "arm64"; };
Acquire::Languages "none";
APT::Sandbox::User "root";
EOF
    export APT_CONFIG="$PRIVATE_APT/apt.conf"
}

# apt-get update for the private config, at most once every 12 hours.
private_apt_update() {
    export_private_apt
    local stamp="$PRIVATE_APT/updated" sources_sum
    sources_sum=$(sha256sum "$PRIVATE_APT/sources.list" "$PRIVATE_APT/apt.conf" | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sources_sum" ] &&
       [ -n "$(find "$stamp" -mmin -720 2>/dev/null)" ]; then
        return 0
    fi
    log "apt-get update (private config: bookworm + bookworm-backports, amd64 + arm64)"
    if apt-get -q -o Debug::NoLocking=1 update >"$PRIVATE_APT/update.log" 2>&1; then
        printf '%s\n' "$sources_sum" > "$stamp"
        PRIVATE_APT_UPDATED=yes
    else
        log "private apt-get update failed (see $PRIVATE_APT/update.log); continuing with what is cached"
        tail -5 "$PRIVATE_APT/update.log" >&2 || true
        return 1
    fi
}

# Serialize runs that share the cache (two test sessions, ./dev test beside a
# manual build): take an exclusive lock held until the script exits.
take_lock() {
    local name=$1 fd
    mkdir -p "$HVC_CACHE"
    exec {fd}>"$HVC_CACHE/.$name.lock"
    if ! flock -n "$fd"; then
        log "waiting for another $name run to finish (lock $HVC_CACHE/.$name.lock)"
        flock "$fd"
    fi
}

# Keep the newest three builds (cache directories named by key) in $1 besides
# $2; the work tree, stock builds, downloads and the KVM check's headers are not
# builds.
prune_old() {
    local root=$1 keep_key=$2 d n=0
    while read -r d; do
        case "$(basename "$d")" in
        "$keep_key" | stock-* | work | debs | kvm-check-include) continue ;;
        esac
        n=$((n + 1))
        if [ $n -ge 3 ]; then
            log "removing old build $d"
            rm -rf "$d"
        fi
    done < <(find "$root" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' |
             sort -rn | cut -d' ' -f2-)
}
