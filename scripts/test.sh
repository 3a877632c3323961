#!/usr/bin/env bash
# Command 2: set up the environment (Python packages from constraints.txt;
# Debian chromium + chromium-driver for the browser tests when we are root and
# apt works) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" all,test
if ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing Debian chromium + chromium-driver for the browser tests"
    (timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 \
      apt-get install -y -qq --no-install-recommends chromium chromium-driver) >/dev/null 2>&1 \
      || echo "[test] could not install chromium; browser tests will be skipped with a message"
  else
    echo "[test] chromedriver not found and not root: browser tests will be skipped"
  fi
fi
cd "$ROOT"
exec python -m pytest -n "${PARTI_JAX_TEST_WORKERS:-2}" --dist loadgroup "$@"
