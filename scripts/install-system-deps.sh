#!/bin/sh
# Debian packages the test suite needs beyond the Python venv.  Idempotent:
# installs only what is missing.  Run as root (CI: before the tests).
#   systemd  systemd-analyze, for `verify` and `security` on systemd/*.service
set -eu
need=""
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
if [ -n "$need" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need
fi
