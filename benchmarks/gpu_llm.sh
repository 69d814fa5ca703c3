#!/usr/bin/env bash
# The GPU measurements of docs/serving_engine.md and docs/objectives.md in one device call:
#   serve_gpu.py  64 distinct adapters in one batch vs the base; 1,000 registered; TTFT
#   grpo_gpu.py   one GRPO step, petkit vs TRL GRPOTrainer + PEFT LoRA (TRL wheels in ROOT/whl)
# Usage: bash benchmarks/gpu_llm.sh [OUT]   (OUT defaults to $OUT, else ./gpu_out)
# Each piece has its own time limit; a failing piece leaves its log and the others still run.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-${OUT:-gpu_out}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
PY="${PYTHON:-python3}"
EXTRA=()  # SMOKE=1: tiny shapes on the CPU, to check this script
[ -n "$SMOKE" ] && EXTRA=(--smoke)
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  if ls "$ROOT"/whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$ROOT"/whl/*.whl 2>&1 | tail -3
  fi
} > "$OUT/env.txt" 2>&1
export PYTHONPATH="$ROOT/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" "$ROOT/benchmarks/versions.py" torch transformers peft accelerate trl datasets pyarrow \
  fsspec huggingface_hub petkit >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
set -o pipefail
timeout 270 "$PY" "$ROOT/benchmarks/serve_gpu.py" "${EXTRA[@]}" --out "$OUT/serve_gpu.json" 2>&1 \
  | tee "$OUT/serve_gpu.log" | grep -v Warning | tail -60
echo "serve_gpu exit $?"
timeout 300 "$PY" "$ROOT/benchmarks/grpo_gpu.py" "${EXTRA[@]}" ${SMOKE:+--device cpu} --timeout 140 --out "$OUT/grpo_gpu.json" 2>&1 \
  | tee "$OUT/grpo_gpu.log" | tail -60
echo "grpo_gpu exit $?"
