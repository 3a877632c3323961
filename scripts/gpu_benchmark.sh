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
# (timed steps, default 20), XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.95, or
# 80 GB's share of a larger card: the targets are for an 80 GB H100),
# JAX_COMPILATION_CACHE_DIR (default benchmark_results/jax_cache: a rerun skips
# compiling), QUICK=1 (the headline set: the before/after pair of each lever that
# decides a target, each bench killed after BENCH_TIMEOUT seconds, default 55,
# and none started after DEADLINE seconds, default 330: at most 6 minutes of
# benches, so that a rerun fits the same device lease).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/benchmark_results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
LOG="$OUT/log.txt"
PY="${PYTHON:-python}"
STEPS="${STEPS:-20}"
START_S=$SECONDS
if [[ -z "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]]; then
  # Cap a card larger than 80 GB (an H200: 141 GB) at 80 GB, as the H100 targets need.
  total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  if [[ "$total_mib" =~ ^[0-9]+$ ]] && (( total_mib * 1048576 > 82000000000 )); then
    XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk -v t="$total_mib" 'BEGIN { printf "%.3f", 80e9 / (t * 1048576) }')
  else
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
  fi
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$ROOT/benchmark_results/jax_cache}"
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
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
} >"$OUT/host.txt" 2>&1
cat "$OUT/host.txt"

QUICK="${QUICK:-0}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-0}"
DEADLINE="${DEADLINE:-0}"
if [[ "$QUICK" == 1 ]]; then
  [[ "$BENCH_TIMEOUT" == 0 ]] && BENCH_TIMEOUT=55
  [[ "$DEADLINE" == 0 ]] && DEADLINE=330
fi
# bench ARGS...: one `parti-jax benchmark` process; XLA_FLAGS=... before the call
# sets compiler flags for that one (recorded in its JSON line).
bench() {
  local limit="$BENCH_TIMEOUT" left
  if [[ "$DEADLINE" != 0 ]]; then
    left=$(( DEADLINE - (SECONDS - START_S) ))
    if (( left < 20 )); then
      echo "[gpu_benchmark] skipped (DEADLINE ${DEADLINE} s reached): $*" | tee -a "$LOG"
      return
    fi
    (( limit == 0 || left < limit )) && limit=$left
  fi
  echo "[gpu_benchmark] ${XLA_FLAGS:+XLA_FLAGS=$XLA_FLAGS }$*" | tee -a "$LOG"
  local run=("$PY" -m parti_jax.cli.benchmark)
  [[ "$limit" != 0 ]] && run=(timeout -k 5 "$limit" "${run[@]}")
  "${run[@]}" "$@" --output="$RESULTS" >>"$LOG" 2>&1
  local rc=$?
  if [[ $rc == 124 || $rc == 137 ]]; then
    echo "[gpu_benchmark]   -> killed after ${limit} s (BENCH_TIMEOUT / DEADLINE); no result" | tee -a "$LOG"
  elif [[ $rc != 0 ]]; then
    echo "[gpu_benchmark]   -> failed; the reason is the \"error\" field in results.jsonl" | tee -a "$LOG"
  fi
}

GPU=(--dtype=bfloat16 --attention_impl=cudnn)
TRAIN=(train_step "${GPU[@]}" --steps="$STEPS" --warmup=3)
M350=(--gin_file=models/parti_350m.gin --label=parti_350m)
M3B=(--gin_file=models/parti_3b.gin --label=parti_3b)
# The paper's conv-shaped attention (models/parti_*.gin) against full causal attention.
FULL=(--gin.ModelConfig.decoder_attention="'full'")
CONV=(--gin.ModelConfig.decoder_attention="'conv_sparse'")
RBG=(--gin.ModelConfig.dropout_rng_impl="'unsafe_rbg'")
NAMED=(--remat_policy=save_qkv_attention_out_mlp_in)
INT8=(--gin.OptimizerConfig.momentum_dtype="'int8'")
SAMPLE=(sample "${GPU[@]}" "${M350[@]}" --num_prompts=16 --guidance=on --steps=3)
FAST_SAMPLE=(--no-scan_layers --gin.ModelConfig.decode_segments=8)
FUSED=(--gin.ModelConfig.decode_attention_kernel="'fused'")  # cuDNN decode attention
# XLA:GPU command buffers (CUDA graphs), loops and conditionals included: the
# sampling step is ~1.5 ms of many small kernels (BENCHMARKS.md).
CMDBUF="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"

if [[ "$QUICK" == 1 ]]; then
  # The headline set, before/after in one run: each lever beside its baseline.
  QTRAIN=(train_step "${GPU[@]}" --steps=10 --warmup=2)
  bench "${QTRAIN[@]}" "${M350[@]}" --batch_size=32 --remat_policy=none "${FULL[@]}"
  bench "${QTRAIN[@]}" "${M350[@]}" --batch_size=32 --remat_policy=none "${FULL[@]}" "${RBG[@]}" --label=parti_350m_rbg
  bench "${SAMPLE[@]}" "${FULL[@]}"
  XLA_FLAGS="${XLA_FLAGS:-} $CMDBUF" bench "${SAMPLE[@]}" "${FULL[@]}" "${FAST_SAMPLE[@]}" --label=parti_350m_unscanned_seg8_cmdbuf
  bench "${QTRAIN[@]}" "${M350[@]}" --batch_size=32 --remat_policy=none "${CONV[@]}" "${RBG[@]}" --label=parti_350m_conv_rbg
  BENCH_TIMEOUT=0 bench "${QTRAIN[@]}" "${M3B[@]}" --batch_size=16 "${NAMED[@]}" "${INT8[@]}" "${CONV[@]}" "${RBG[@]}" --label=parti_3b_named_int8_conv_rbg
else
# 1. Parti-350M training (target >= 45% MFU at 128 text / 1024 image tokens).
for b in 8 16 32 64; do bench "${TRAIN[@]}" "${M350[@]}" --batch_size=$b --remat_policy=none "${FULL[@]}"; done
for b in 64 128; do
  bench "${TRAIN[@]}" "${M350[@]}" --batch_size=$b --remat_policy=dots_with_no_batch_dims_saveable "${FULL[@]}"
done
for b in 128 256; do bench "${TRAIN[@]}" "${M350[@]}" --batch_size=$b --remat_policy=full "${FULL[@]}"; done
# Levers, one at a time against batch 32 above: unrolled layers, XLA attention,
# no dropout, cheaper dropout generators, conv-shaped attention (cuDNN sliding
# window; and the blocked XLA path), bf16 logits (float32 loss math), XLA's
# dynamic-slice fusion for the scanned layers, then the best combination.
bench "${TRAIN[@]}" "${M350[@]}" --batch_size=32 --no-scan_layers "${FULL[@]}"
bench "${TRAIN[@]}" "${M350[@]}" --batch_size=32 "${FULL[@]}" --gin.ModelConfig.dropout_rate=0.0 --label=parti_350m_nodrop
for impl in rbg unsafe_rbg; do
  bench "${TRAIN[@]}" "${M350[@]}" --batch_size=32 "${FULL[@]}" --gin.ModelConfig.dropout_rng_impl="'$impl'" --label=parti_350m_$impl
done
bench "${TRAIN[@]}" "${M350[@]}" --batch_size=32 "${CONV[@]}" --label=parti_350m_conv
bench "${TRAIN[@]}" "${M350[@]}" --batch_size=32 "${FULL[@]}" --gin.ModelConfig.logits_dtype="'bfloat16'" \
  --label=parti_350m_bf16_logits
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_dynamic_slice_fusion=true" \
  bench "${TRAIN[@]}" "${M350[@]}" --batch_size=32 "${FULL[@]}" --label=parti_350m_dynamic_slice_fusion
bench train_step --dtype=bfloat16 --attention_impl=xla --steps="$STEPS" --warmup=3 \
  "${M350[@]}" --batch_size=32 "${CONV[@]}" --label=parti_350m_conv_xla_banded
bench train_step --dtype=bfloat16 --attention_impl=xla --steps="$STEPS" --warmup=3 \
  "${M350[@]}" --batch_size=32 "${FULL[@]}"
bench "${TRAIN[@]}" "${M350[@]}" --batch_size=64 --remat_policy=dots_with_no_batch_dims_saveable \
  "${CONV[@]}" "${RBG[@]}" --label=parti_350m_conv_rbg
# Profile of the step (kernel time by category in the JSON line's "profile";
# the trace itself in profile_350m/ for xprof / TensorBoard / Perfetto).
bench train_step "${GPU[@]}" --steps=3 --warmup=2 "${M350[@]}" --batch_size=32 "${FULL[@]}" \
  --profile_dir="$OUT/profile_350m"

# 2. Parti-3B on one 80 GB GPU with remat (target: fits, >= 50% MFU).
for b in 8 16 32; do bench "${TRAIN[@]}" "${M3B[@]}" --batch_size=$b --remat_policy=full "${FULL[@]}"; done
for b in 8 16; do
  bench "${TRAIN[@]}" "${M3B[@]}" --batch_size=$b --remat_policy=dots_with_no_batch_dims_saveable "${FULL[@]}"
  bench "${TRAIN[@]}" "${M3B[@]}" --batch_size=$b "${NAMED[@]}" "${FULL[@]}" --label=parti_3b_named
  bench "${TRAIN[@]}" "${M3B[@]}" --batch_size=$b "${NAMED[@]}" "${INT8[@]}" "${FULL[@]}" --label=parti_3b_named_int8
  bench "${TRAIN[@]}" "${M3B[@]}" --batch_size=$b "${NAMED[@]}" "${INT8[@]}" "${CONV[@]}" "${RBG[@]}" \
    --label=parti_3b_named_int8_conv_rbg
done

# 3. Parti-350M sampling of full 32x32 grids, with and without guidance
#    (target: batch 16 with guidance within 2x the memory-bandwidth floor), then
#    the levers one at a time: unscanned layers, static prefix segments, command
#    buffers, one fused (cuDNN) attention per step, conv-shaped attention (reads
#    its window only).
for p in 1 16; do bench sample "${GPU[@]}" "${M350[@]}" --num_prompts=$p --guidance=both --steps=3 "${FULL[@]}"; done
bench "${SAMPLE[@]}" "${FULL[@]}" --no-scan_layers --label=parti_350m_unscanned
for s in 4 8 16; do
  bench "${SAMPLE[@]}" "${FULL[@]}" --gin.ModelConfig.decode_segments=$s --label=parti_350m_seg$s
done
XLA_FLAGS="${XLA_FLAGS:-} $CMDBUF" bench "${SAMPLE[@]}" "${FULL[@]}" --label=parti_350m_cmdbuf
XLA_FLAGS="${XLA_FLAGS:-} $CMDBUF" bench "${SAMPLE[@]}" "${FULL[@]}" "${FAST_SAMPLE[@]}" --label=parti_350m_unscanned_seg8_cmdbuf
bench "${SAMPLE[@]}" "${FULL[@]}" "${FUSED[@]}" --label=parti_350m_fused
XLA_FLAGS="${XLA_FLAGS:-} $CMDBUF" bench "${SAMPLE[@]}" "${FULL[@]}" "${FAST_SAMPLE[@]}" "${FUSED[@]}" \
  --label=parti_350m_unscanned_seg8_fused_cmdbuf
bench "${SAMPLE[@]}" "${CONV[@]}" --label=parti_350m_conv
XLA_FLAGS="${XLA_FLAGS:-} $CMDBUF" bench "${SAMPLE[@]}" "${CONV[@]}" --no-scan_layers --label=parti_350m_conv_unscanned_cmdbuf

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
              f"attn={r['attention_impl']:<5} {r.get('decoder_attention', ''):<11} "
              f"rng={r.get('dropout_rng_impl', ''):<10} m={r.get('momentum_dtype', ''):<8} "
              f"{r['step_time_s']*1e3:8.1f} ms  "
              f"{r['examples_per_s']:8.1f} ex/s  MFU {'-' if mfu is None else f'{mfu:.1%}'}  "
              f"peak mem {r.get('peak_bytes_in_use', 0)/2**30:.1f} GiB")
    elif r["benchmark"] == "sample":
        ratio = r["floor_ratio"]
        print(f"{head} prompts={r['num_prompts']:<3} guidance={r['guidance_scale']!s:<5} "
              f"scan={r['scan_layers']!s:<5} seg={r.get('decode_segments', 1):<3} "
              f"{r.get('decoder_attention', ''):<11} cmdbuf={'command_buffer' in r.get('xla_flags', '')!s:<5} "
              f"{r['seconds_per_batch']:8.3f} s/batch  floor {r['floor_s'] or 0:.3f} s  "
              f"ratio {'-' if ratio is None else f'{ratio:.2f}'}")
    elif r["benchmark"] == "vqgan":
        print(f"{head} {r['op']:<6} b={r['batch_size']:<4} {r['images_per_s']:10.1f} images/s")
    else:
        print(f"{head} b={r['batch_size']:<4} {r['examples_per_s']:10.1f} examples/s")
EOF
