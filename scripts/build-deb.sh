#!/bin/bash
# Build hvcproxyd's Debian package (debian/) from this checkout.
#
# Usage: scripts/build-deb.sh [--no-apt] OUTDIR
#        scripts/build-deb.sh [--no-apt] --cached
#        scripts/build-deb.sh --print-key | --help
#   OUTDIR        write hvcproxyd_<version>_<arch>.deb (and its .buildinfo/.changes) there
#   --cached      build into ${HVCPROXYD_CACHE:-~/.cache/hvcproxyd}/deb/<key>/ unless
#                 a build of the same inputs is already there
#   --print-key   print that key and exit: a hash of every file the package is built
#                 from (the checkout's tracked and untracked-but-not-ignored files, less
#                 tests/, bench/, integration/) and the build's Python and dpkg versions
#   --no-apt      do not install missing build dependencies, fail naming them
#
# Installs what is missing of the build dependencies with apt-get (as root, or
# through sudo): dpkg-dev debhelper python3 python3-venv ca-certificates.
# Needs PyPI: the venv's pinned wheels come from there (debian/requirements.txt).
# Builds in a copy of the checkout, so the repository gets no build debris.
# Prints the .deb's path on stdout; progress goes to stderr.
#
# Environment: HVCPROXYD_DEB_TIMEOUT  seconds dpkg-buildpackage may take (default 1800)
set -euo pipefail
LOG_TAG=build-deb
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../integration/lib.sh
source "$SCRIPTS_DIR/../integration/lib.sh"
BUILD_TIMEOUT="${HVCPROXYD_DEB_TIMEOUT:-1800}"
BUILD_DEPS=(dpkg-dev debhelper python3 python3-venv ca-certificates)

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
apt=yes mode="" out=""
while [ $# -gt 0 ]; do
    case "$1" in
    --help|-h) usage; exit 0 ;;
    --no-apt) apt=no ;;
    --cached|--print-key) mode=$1 ;;
    -*) die "unknown option: $1 (see --help)" ;;
    *) [ -z "$out" ] || die "one OUTDIR only (see --help)"; out=$1 ;;
    esac
    shift
done
[ -n "$mode" ] || [ -n "$out" ] || die "give OUTDIR or --cached (see --help)"

have_cmd git || die "git not found: install the Debian package git (the file list is the checkout's)"
have_cmd timeout || die "timeout not found: install the Debian package coreutils"
cd "$REPO_ROOT"

# The package's inputs: what a clean checkout of this tree would hold.
input_files() {
    git ls-files -z --cached --others --exclude-standard -- . ':!tests' ':!bench' ':!integration' |
        while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done
}
key() {
    {
        input_files | LC_ALL=C sort -z | xargs -0 sha256sum
        /usr/bin/python3 -VV 2>&1 || true
        dpkg-buildpackage --version 2>/dev/null | head -1 || true
        dpkg --print-architecture
    } | sha256sum | cut -c1-16
}
if [ "$mode" = --print-key ]; then key; exit 0; fi

missing_deps() {
    local p
    for p in "${BUILD_DEPS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || printf '%s ' "$p"
    done
}
need=$(missing_deps)
if [ -n "$need" ]; then
    [ "$apt" = yes ] || die "missing build dependencies (Debian packages): $need"
    log "installing the build dependencies: $need"
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    timeout 600 "${sudo[@]}" apt-get -q update >&2
    # shellcheck disable=SC2086  # a word list
    timeout 1200 "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -q install -y --no-install-recommends $need >&2
    need=$(missing_deps)
    [ -z "$need" ] || die "apt-get did not install: $need"
fi

if [ "$mode" = --cached ]; then
    out="$HVC_CACHE/deb/$(key)"
    take_lock deb-build
    if [ -f "$out/.done" ]; then
        log "cached: $out"
        cat "$out/.done"
        exit 0
    fi
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

work=$(mktemp -d "${TMPDIR:-/tmp}/hvcproxyd-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
src="$work/hvcproxyd"
mkdir "$src"
log "copying the checkout to $src"
input_files | timeout 120 cpio -0 -pdm --quiet "$src"
log "dpkg-buildpackage -us -uc -b (log $out/build.log)"
if ! ( cd "$src" && timeout "$BUILD_TIMEOUT" dpkg-buildpackage -us -uc -b ) >"$out/build.log" 2>&1; then
    tail -30 "$out/build.log" >&2
    die "dpkg-buildpackage failed (log $out/build.log)"
fi
shopt -s nullglob
debs=("$work"/hvcproxyd_*.deb)
[ ${#debs[@]} -eq 1 ] || die "expected one hvcproxyd_*.deb in $work, found ${#debs[@]}"
cp "$work"/hvcproxyd_*.deb "$work"/hvcproxyd_*.buildinfo "$work"/hvcproxyd_*.changes "$out"/
deb="$out/$(basename "${debs[0]}")"
[ "$mode" != --cached ] || printf '%s\n' "$deb" > "$out/.done"
log "built $deb"
printf '%s\n' "$deb"
