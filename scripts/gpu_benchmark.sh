#!/usr/bin/env bash
# The one command that measures every GPU figure of BENCHMARKS.md (issue 8):
#
#   scripts/gpu_benchmark.sh [OUT_DIR]        # default OUT_DIR: benchmark_results/<UTC time>
#
# Needs jax[cuda], flax, optax, orbax-checkpoint and numpy; no TensorFlow. What
# else the benchmark imports (gin-config, sentencepiece) and parti_jax itself
# (this checkout, editable, no dependencies; its build takes setuptools, wheel and
# packaging) are installed when missing, offline, from the wheelhouse .whl/ in
# the checkout (git-ignored). Make it there beforehand, on a machine that reaches
# the package registry (pins from constraints.txt; sentencepiece is a compiled
# wheel, for x86-64 Linux):
#
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --no-deps -d .whl gin-config==0.5.0 sentencepiece==0.2.3 setuptools wheel packaging
#
# Runs each configuration in its own process, so a batch that does not fit is
# recorded as a JSON line with an "error" field and the sweep goes on. About
# 30-45 minutes on one H100 (most of it compilation).
#
# Writes OUT_DIR/results.jsonl (one JSON object per figure: device, versions,
# knobs, median times, examples/s, tokens/s, MFU, bandwidth-floor ratio),
# OUT_DIR/log.txt (everything else), OUT_DIR/host.txt (nvidia-smi, jax devices),
# OUT_DIR/profile_350m/ (a jax.profiler trace of three Parti-350M train steps:
# open with TensorBoard's profile plugin or xprof) and prints a summary table.
#
# Environment: PYTHON (default python), PIP_ARGS (extra `pip install` flags, e.g.
# --user --break-system-packages for an externally managed system Python), STEPS
# (timed steps, default 20), XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.95),
# QUICK=1 (only the headline figure of each target, each bench killed after
# BENCH_TIMEOUT seconds, default 150: about 8 minutes on one H200, for a short
# device lease).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/benchmark_results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/log.txt"
PY="${PYTHON:-python}"
STEPS="${STEPS:-20}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
cd "$ROOT"

# Offline installs from .whl/ of what is missing. `import gin.config` fails for the
# namespace package that ./gin/ (the gin files) makes when gin-config is absent.
WHL="$ROOT/.whl"
PIP=("$PY" -m pip install --no-index --find-links "$WHL" ${PIP_ARGS:-})
wheelhouse_hint() {
  echo "[gpu_benchmark] $1; make the wheelhouse on a machine with registry access:" >&2
  sed -n '/^#   pip download/,/wheel packaging$/s/^#   //p' "${BASH_SOURCE[0]}" >&2
  exit 1
}
missing=()
"$PY" -c "import gin.config" 2>/dev/null || missing+=(gin-config)
"$PY" -c "import sentencepiece" 2>/dev/null || missing+=(sentencepiece)
if (( ${#missing[@]} )); then
  [[ -d "$WHL" ]] || wheelhouse_hint "${missing[*]} missing and no $WHL"
  "${PIP[@]}" "${missing[@]}" || wheelhouse_hint "installing ${missing[*]} from $WHL failed"
fi
if ! "$PY" -c "import parti_jax.launch" 2>/dev/null; then  # parti_jax not installed from here
  "${PIP[@]}" --no-deps -e "$ROOT" || wheelhouse_hint "installing parti_jax failed"
fi

{
  date -u
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || true
  nvidia-smi 2>/dev/null || echo "nvidia-smi not found"
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
} >"$OUT/host.txt" 2>&1
cat "$OUT/host.txt"

QUICK="${QUICK:-0}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-0}"
[[ "$QUICK" == 1 && "$BENCH_TIMEOUT" == 0 ]] && BENCH_TIMEOUT=150
bench() {
  echo "[gpu_benchmark] $*" | tee -a "$LOG"
  local run=("$PY" -m parti_jax.cli.benchmark)
  [[ "$BENCH_TIMEOUT" != 0 ]] && run=(timeout -k 5 "$BENCH_TIMEOUT" "${run[@]}")
  "${run[@]}" "$@" --output="$RESULTS" >>"$LOG" 2>&1
  local rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then
    echo "[gpu_benchmark]   -> killed after ${BENCH_TIMEOUT} s (BENCH_TIMEOUT); no result" | tee -a "$LOG"
  elif [[ $rc != 0 ]]; then
    echo "[gpu_benchmark]   -> failed; the reason is the \"error\" field in results.jsonl" | tee -a "$LOG"
  fi
}

GPU=(--dtype=bfloat16 --attention_impl=cudnn)
TRAIN=(train_step "${GPU[@]}" --steps="$STEPS" --warmup=3)
M350=(--gin_file=models/parti_350m.gin --label=parti_350m)
M3B=(--gin_file=models/parti_3b.gin --label=parti_3b)

if [[ "$QUICK" == 1 ]]; then
  # The headline figure of each target, cheapest first.
  bench "${TRAIN[@]}" "${M350[@]}" --batch_size=32 --remat_policy=none
  bench vqgan "${GPU[@]}" --gin_file=vqgan/small.gin --label=vqgan_small --vqgan_batch_size=256 --steps=10
  bench sample "${GPU[@]}" "${M350[@]}" --num_prompts=16 --guidance=both --steps=3
  bench "${TRAIN[@]}" "${M350[@]}" --batch_size=64 --remat_policy=dots_with_no_batch_dims_saveable
  bench "${TRAIN[@]}" "${M3B[@]}" --batch_size=8 --remat_policy=full
else
# 1. Parti-350M training (target >= 45% MFU at 128 text / 1024 image tokens).
for b in 8 16 32 64; do bench "${TRAIN[@]}" "${M350[@]}" --batch_size=$b --remat_policy=none; done
for b in 64 128; do
  bench "${TRAIN[@]}" "${M350[@]}" --batch_size=$b --remat_policy=dots_with_no_batch_dims_saveable
done
for b in 128 256; do bench "${TRAIN[@]}" "${M350[@]}" --batch_size=$b --remat_policy=full; done
# Levers, one at a time against batch 32 above: unrolled layers, XLA attention,
# no dropout (the cost of drawing dropout masks with the default threefry PRNG).
bench "${TRAIN[@]}" "${M350[@]}" --batch_size=32 --no-scan_layers
bench "${TRAIN[@]}" "${M350[@]}" --batch_size=32 --gin.ModelConfig.dropout_rate=0.0 --label=parti_350m_nodrop
bench train_step --dtype=bfloat16 --attention_impl=xla --steps="$STEPS" --warmup=3 \
  "${M350[@]}" --batch_size=32
# Profile of the step (what limits it: open profile_350m in xprof / TensorBoard).
bench train_step "${GPU[@]}" --steps=3 --warmup=2 "${M350[@]}" --batch_size=32 \
  --profile_dir="$OUT/profile_350m"

# 2. Parti-3B on one 80 GB GPU with remat (target: fits, >= 50% MFU).
for b in 8 16 32; do bench "${TRAIN[@]}" "${M3B[@]}" --batch_size=$b --remat_policy=full; done
for b in 8 16; do
  bench "${TRAIN[@]}" "${M3B[@]}" --batch_size=$b --remat_policy=dots_with_no_batch_dims_saveable
done

# 3. Parti-350M sampling of full 32x32 grids, with and without guidance
#    (target: batch 16 with guidance within 2x the memory-bandwidth floor).
for p in 1 16; do bench sample "${GPU[@]}" "${M350[@]}" --num_prompts=$p --guidance=both --steps=3; done

# 4. ViT-VQGAN encode / decode at 256px (target: Small decode >= 2000 images/s).
for size in small base large; do
  for b in 64 256; do
    bench vqgan "${GPU[@]}" --gin_file=vqgan/$size.gin --label=vqgan_$size --vqgan_batch_size=$b --steps=10
  done
done

fi

# 5. Input pipeline (CPU; needs parti_jax installed with its [data] extras: TensorFlow, SeqIO).
if "$PY" -c "import tensorflow, seqio, parti_jax.tasks" >/dev/null 2>&1; then
  bench input --gin_file=models/parti_350m.gin --label=parti_350m --input_batch_size=256 \
    --input_examples=8192 --steps=50
else
  echo "[gpu_benchmark] input: skipped (TensorFlow/SeqIO or an installed parti_jax missing)" | tee -a "$LOG"
fi

# Summary.
"$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\n{len(rows)} results in {sys.argv[1]}")
for r in rows:
    head = f"{r['benchmark']:<10} {r.get('model', ''):<12}"
    if "error" in r:
        print(f"{head} ERROR {r['error'][:100]}")
    elif r["benchmark"] == "train_step":
        mfu = r["mfu"]
        print(f"{head} b={r['batch_size']:<4} remat={r['remat_policy']:<34} scan={r['scan_layers']!s:<5} "
              f"attn={r['attention_impl']:<5} {r['step_time_s']*1e3:8.1f} ms  "
              f"{r['examples_per_s']:8.1f} ex/s  MFU {'-' if mfu is None else f'{mfu:.1%}'}  "
              f"peak mem {r.get('peak_bytes_in_use', 0)/2**30:.1f} GiB")
    elif r["benchmark"] == "sample":
        ratio = r["floor_ratio"]
        print(f"{head} prompts={r['num_prompts']:<3} guidance={r['guidance_scale']!s:<5} "
              f"{r['seconds_per_batch']:8.3f} s/batch  floor {r['floor_s'] or 0:.3f} s  "
              f"ratio {'-' if ratio is None else f'{ratio:.2f}'}")
    elif r["benchmark"] == "vqgan":
        print(f"{head} {r['op']:<6} b={r['batch_size']:<4} {r['images_per_s']:10.1f} images/s")
    else:
        print(f"{head} b={r['batch_size']:<4} {r['examples_per_s']:10.1f} examples/s")
EOF
