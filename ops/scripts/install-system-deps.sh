#!/usr/bin/env bash
# Installs the system packages the tests and the dev stack use (Debian): pgbouncer, and chromium for the ops
# page's browser test (tests/e2e/test_ops_page_browser.py).
# Idempotent: does nothing when everything is already there.
set -euo pipefail
missing=()
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
