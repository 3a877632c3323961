#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment in .venv with the exact
# pins from constraints.txt. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PARTI_JAX_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
EXTRAS="${1:-all}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.parti_jax_installed_$EXTRAS"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ] || [ "$ROOT/constraints.txt" -nt "$stamp" ]; then
  echo "[env] installing parti_jax[$EXTRAS] with constraints.txt (a few minutes on a fresh machine)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import parti_jax, jax, flax" || { echo "[env] install failed" >&2; exit 1; }
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
