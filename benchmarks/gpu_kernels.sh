#!/usr/bin/env bash
# The fused-kernel measurements of docs/training-gpu.md (issue 28) in one device call, within
# DEADLINE seconds (default 505: ~8.5 minutes on an H100), each case its own process:
#   1.1B shape  petkit blocks + selective, + fused delta (torch function; petkit's Triton kernel),
#               + Liger's fused linear cross-entropy with each
#   8B shape    petkit blocks + selective + Liger flce, with the torch / the Triton fused delta
#   curves      (CURVES=1) 50 steps of the 1.1B shape, eager vs fused vs Triton delta, per-step
#               loss gaps against the eager delta (goal: within 0.5%)
#   8B context  the longest sequence one LoRA step fits, petkit vs PEFT, in the time left
# after the GPU-marked tests (tests/test_fused_delta.py, tests/test_triton_delta.py,
# tests/test_kernels.py; ~40 s).
# Liger Kernel comes from ROOT/whl/liger_kernel-*.whl (installed as gpu_llm.sh installs wheels).
# Usage: bash benchmarks/gpu_kernels.sh [OUT]   (OUT defaults to $OUT, else ./gpu_out)
#        SMOKE=1 bash benchmarks/gpu_kernels.sh OUT   every piece tiny on the CPU
# Knobs: CASES_1B, CASES_8B (space-separated gpu_train.py cases), RESERVE_8B, RESERVE_CONTEXT,
#        CURVES=1 (the loss-curve run, before the 8B cases), CASES_CURVES. LoRA dropout 0.05,
#        which only the Triton kernel fuses: CASES_1B="petkit-blocks-selective-dropout
#        petkit-blocks-selective-fused-dropout petkit-blocks-selective-triton-dropout".
# Expected on an H100 (estimates from earlier calls: a 1.1B case ~40 s, an 8B case ~65 s, build
# and compile included): env ~15 s, tests ~30 s, 1.1B ~190 s (a case that would start with under
# 35 s (8B: 55 s) of its share left is reported "not run"), 8B ~130 s, the probe the remaining ~130 s.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-${OUT:-gpu_out}}"
DEADLINE="${DEADLINE:-505}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
PY="${PYTHON:-python3}"
BEGAN=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - BEGAN) )); }
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  if ls "$ROOT"/whl/liger_kernel-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$ROOT"/whl/liger_kernel-*.whl 2>&1 | tail -3
  fi
} > "$OUT/env.txt" 2>&1
export PYTHONPATH="$ROOT/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" "$ROOT/benchmarks/versions.py" torch triton transformers peft liger_kernel petkit >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
set -o pipefail
B="$ROOT/benchmarks"
# the case lists (PEFT's best 1.1B mode, peft-compile-ckpt, compiles for ~130 s: add it to
# CASES_1B when a call has the time; the ratios then come from the same call)
read -r -a C1 <<< "${CASES_1B:-petkit-blocks-selective petkit-blocks-selective-fused petkit-blocks-selective-triton petkit-blocks-selective-fused-flce petkit-blocks-selective-triton-flce}"
read -r -a C8 <<< "${CASES_8B:-petkit-blocks-selective-fused-flce petkit-blocks-selective-triton-flce}"
read -r -a CC <<< "${CASES_CURVES:-petkit-blocks-selective petkit-blocks-selective-fused petkit-blocks-selective-triton}"
if [ -n "$SMOKE" ]; then
  DEADLINE=3600
  S1=(--smoke); S8=(--smoke); SC=(--smoke); CONTEXT=(--smoke --libraries petkit peft)
else
  S1=(--shape 1b --steps 30 --window 10 --timeout 100 --min-case 35)
  S8=(--shape 8b --steps 15 --window 5 --timeout 120 --min-case 55)
  SC=(--shape 1b --steps 50 --window 10 --timeout 100 --min-case 35)
  CONTEXT=(--libraries petkit peft --start 16384 --steps 2 --try-timeout 110)
fi
# the GPU-marked tests first (bf16 numerics of the fused delta on CUDA, Liger against torch
# references), when pytest is installed: ~30 s
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 100 "$PY" -m pytest -p no:cacheprovider -q -rs -m gpu "$ROOT/tests/test_fused_delta.py" \
    "$ROOT/tests/test_triton_delta.py" "$ROOT/tests/test_kernels.py" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
  echo "gpu_tests exit $?"
fi
# 1.1B cases, leaving RESERVE_8B seconds (default 270) for the 8B cases and the probe
timeout $(( $(left) - 5 )) "$PY" "$B/gpu_train.py" "${S1[@]}" --cases "${C1[@]}" \
  --deadline $(( $(left) - ${RESERVE_8B:-270} )) --json "$OUT/train_1b.json" 2>&1 \
  | tee "$OUT/train_1b.log" | grep -v Warning | tail -25
echo "train_1b exit $?"
# the loss curves (CURVES=1), leaving RESERVE_8B seconds
if [ -n "$CURVES" ]; then
  timeout $(( $(left) - 5 )) "$PY" "$B/gpu_train.py" "${SC[@]}" --curves --cases "${CC[@]}" \
    --deadline $(( $(left) - ${RESERVE_8B:-270} )) --json "$OUT/curves_1b.json" 2>&1 \
    | tee "$OUT/curves_1b.log" | grep -v Warning | tail -12
  echo "curves exit $?"
fi
# 8B cases, leaving RESERVE_CONTEXT seconds (default 130) for the context probe
if [ -n "$SMOKE" ]; then  # tiny shapes: a case of both lists ran already
  read -r -a C8 <<< "$(for c in "${C8[@]}"; do [[ " ${C1[*]} " == *" $c "* ]] || echo -n "$c "; done)"
fi
if [ ${#C8[@]} -gt 0 ]; then
  timeout $(( $(left) - 5 )) "$PY" "$B/gpu_train.py" "${S8[@]}" --cases "${C8[@]}" \
    --deadline $(( $(left) - ${RESERVE_CONTEXT:-130} )) --json "$OUT/train_8b.json" 2>&1 \
    | tee "$OUT/train_8b.log" | grep -v Warning | tail -15
  echo "train_8b exit $?"
fi
# the context probe, in the time left
timeout $(( $(left) - 3 )) "$PY" "$B/gpu_context.py" "${CONTEXT[@]}" --budget $(( $(left) - 8 )) \
  --json "$OUT/context.json" 2>&1 | tee "$OUT/context.log" | grep -v Warning | tail -25
echo "context exit $?"
echo "total $(( $(date +%s) - BEGAN )) s"
