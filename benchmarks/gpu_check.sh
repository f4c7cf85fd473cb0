#!/usr/bin/env bash
# One-shot check for the GPU machine (H200, python3 with jax 0.11.2, no network).
#
#   PYTHONPATH=. benchmarks/gpu_check.sh OUT_DIR        # full check, < 8 min
#   SMOKE=1 benchmarks/gpu_check.sh OUT_DIR             # tiny, runs on CPU too
#
# OUT_DIR (else $OUT) receives at most 9 flat files: env.txt (nvidia-smi,
# versions), gpu_check.log (everything), tests.xml (junit), mosaic.json and
# mosaic.png (the Mosaic GPU kernels' table: mosaic vs pallas vs cudnn vs
# tokamax, `swajax bench mosaic`), attention.json, attention.png,
# tiles.json (Pallas BlockSizes sweep), summary.txt (phase exit codes).
# Kernel tests (the Mosaic ones too) run compiled (interpret=None resolves to
# compiled on GPU), without the slow marker. The phases after the tests and
# the Mosaic table get what is left of TOTAL_S seconds (default 450): the
# attention benchmark at most 200 s, the tile sweep the rest.
set -u
OUT_DIR=${1:-${OUT:-}}
if [[ -z "$OUT_DIR" ]]; then
  echo "usage: $0 OUT_DIR  (or set OUT)" >&2
  exit 2
fi
SMOKE=${SMOKE:-0}
[[ "${2:-}" == "--smoke" ]] && SMOKE=1
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
: > "$LOG"
: > "$SUMMARY"

{
  date -u
  nvidia-smi || echo "nvidia-smi: not available"
  "$PY" -c "import sys, jax; print(sys.version); print('jax', jax.__version__, jax.devices())"
} > "$OUT_DIR/env.txt" 2>&1

# phase NAME TIMEOUT_S CMD...: runs CMD under a timeout, logs, records its rc.
phase() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$SUMMARY" "$LOG"
}

if [[ "$SMOKE" == 1 ]]; then
  phase tests 120 "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT_DIR/tests.xml" tests/test_cudnn.py
  phase mosaic 120 "$PY" -m swajax.cli.bench mosaic --smoke --budget-s 60 \
    --out "$OUT_DIR/mosaic.json"
  phase bench 120 "$PY" -m swajax.cli.bench attention --smoke \
    --impls xla cudnn dense \
    --out "$OUT_DIR/attention.json" --plot "$OUT_DIR/attention.png"
  phase tiles 120 "$PY" -m swajax.cli.bench tiles --smoke --budget-s 0 \
    --out "$OUT_DIR/tiles.json"
else
  tests=()
  for f in tests/test_attention_grid.py tests/test_pallas_kernels.py \
           tests/test_mosaic_kernels.py tests/test_cudnn.py \
           tests/test_decode*.py; do
    [[ -e "$f" ]] && tests+=("$f")
  done
  # The models' decode steps through the compiled flash-decoding kernel.
  tests+=(tests/test_kv_cache.py::test_pallas_decode_equals_full_forward
          tests/test_generate.py::test_pallas_decode_steps_give_the_xla_tokens)
  phase tests 240 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    --durations=15 --junitxml="$OUT_DIR/tests.xml" "${tests[@]}"
  # The Mosaic GPU kernels (impl="mosaic") against Triton, cuDNN, tokamax:
  # bf16, GQA 32:8 then 64:8, H 128 then 64, T 8k-128k, W 128/1024/4096,
  # fwd and fwd+bwd, in that priority until its 150 s budget is spent.
  phase mosaic 200 "$PY" -m swajax.cli.bench mosaic --budget-s 150 \
    --out "$OUT_DIR/mosaic.json" --plot "$OUT_DIR/mosaic.png"
  # bf16, head_dim 128, GQA 32:8, W=4096. cudnn_causal = cuDNN causal flash
  # without the window; dense = XLA masked (only where its scores fit).
  left=$(( ${TOTAL_S:-450} - SECONDS ))
  if (( left > 60 )); then
    phase bench $(( left < 200 ? left : 200 )) "$PY" -m swajax.cli.bench attention \
      --seq-lens 8192 32768 131072 --windows 4096 --dtype bfloat16 \
      --heads 32 --kv-heads 8 --head-dim 128 --repeats 5 \
      --impls pallas cudnn cudnn_causal dense tokamax --max-dense-bytes 4e10 \
      --out "$OUT_DIR/attention.json" --plot "$OUT_DIR/attention.png"
  else
    echo "bench not run: ${left}s of TOTAL_S left" | tee -a "$LOG"
  fi
  # bf16, T=16k, W=4096, GQA 32:8, H=128: the default tiles, then one field
  # changed at a time, until the time left runs out (tuning data).
  left=$(( ${TOTAL_S:-450} - SECONDS ))
  if (( left > 60 )); then
    phase tiles "$left" "$PY" -m swajax.cli.bench tiles --budget-s $(( left - 45 )) \
      --out "$OUT_DIR/tiles.json"
  else
    echo "tiles not run: ${left}s of TOTAL_S left" | tee -a "$LOG"
  fi
fi
cat "$SUMMARY"
! grep -qv " rc=0 " "$SUMMARY"
