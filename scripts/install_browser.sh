#!/usr/bin/env bash
# Installs what tests/test_app_browser.py needs on Debian: the distribution's Chromium (Playwright
# drives it through executable_path, so `playwright install` and its browser download are never
# needed) and the Playwright Python client. Idempotent: a no-op in about a second when present.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        SUDO=sudo
    else
        SUDO=
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

if ! python3 -c "import playwright" >/dev/null 2>&1; then
    python3 -m pip install -q "playwright>=1.40"
fi

chromium --version 2>/dev/null
