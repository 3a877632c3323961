#!/usr/bin/env bash
# Builds dist/parti_jax-<version>-py3-none-any.whl from this checkout (gin files, tasks,
# launch and the data assets inside the package) and puts a copy of constraints.txt next
# to it. `parti-jax launch tpu` copies both to every worker, `launch slurm --venv=...`
# installs them on the shared filesystem, and the Dockerfile installs them into the image:
# always `pip install <wheel> -c constraints.txt` plus the accelerator's jax.
#
#   scripts/build_wheel.sh [OUT_DIR]        (default OUT_DIR: dist/)
#
# PYTHON picks the interpreter that runs `pip wheel` (default: .venv/bin/python, else
# python3.11). The build runs in pip's isolated build environment (setuptools and wheel
# from the package index, as pyproject.toml asks); PARTI_JAX_NO_BUILD_ISOLATION=1 uses the
# interpreter's own setuptools instead (offline).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/dist}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3.11; fi
fi
version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/parti_jax/__init__.py")"
if [ -z "$version" ]; then
  echo "build_wheel: no __version__ = \"...\" line in parti_jax/__init__.py" >&2
  exit 1
fi
wheel="parti_jax-$version-py3-none-any.whl"

# Build from a clean copy of the sources: a stale build/ or *.egg-info in the checkout
# would put files that no longer exist into the wheel.
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf - \
  setup.py pyproject.toml parti_jax gin tasks launch | tar -C "$SRC" -xf -
isolation=()
if [ "${PARTI_JAX_NO_BUILD_ISOLATION:-0}" = 1 ]; then isolation=(--no-build-isolation); fi
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps "${isolation[@]}" \
  --wheel-dir "$SRC/dist" "$SRC"
if [ ! -f "$SRC/dist/$wheel" ]; then
  echo "build_wheel: pip built $(ls "$SRC/dist"), expected $wheel" >&2
  exit 1
fi
cp "$SRC/dist/$wheel" "$OUT/$wheel"
cp "$ROOT/constraints.txt" "$OUT/constraints.txt"
echo "$OUT/$wheel"
echo "$OUT/constraints.txt"
