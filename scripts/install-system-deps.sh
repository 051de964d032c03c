#!/bin/sh
# Debian packages the test suite needs beyond the Python venv.  Idempotent:
# installs only what is missing (apt through sudo when not root).
#   systemd  systemd-analyze, for `verify` and `security` on systemd/*.service
set -eu
need=""
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
[ -n "$need" ] || exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need
