#!/usr/bin/env bash
# Installs the system packages the tests and the dev stack use (Debian): pgbouncer, chromium for the ops
# page's browser test (tests/e2e/test_ops_page_browser.py), and libfuse2 for the power-loss filesystem under the
# fault test's PostgreSQL (tests/e2e/power_loss_fs.py).
# Idempotent: does nothing when everything is already there.
set -euo pipefail
missing=()
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ldconfig -p 2>/dev/null | grep -c 'libfuse\.so\.2 ' >/dev/null || missing+=(libfuse2)  # -c reads it all: no SIGPIPE
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
