#!/usr/bin/env bash
# Command 1: set up the environment and run the main job on the embedded
# default (the shapes-world demo: train everything small on CPU, sample, eval,
# write report/index.html). Extra arguments go to `parti-jax demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" all
cd "$ROOT"
exec parti-jax demo "$@"
