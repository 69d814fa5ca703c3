#!/usr/bin/env bash
# Refresh constraints.txt, the versions setup.sh installs: set up a fresh test venv from the newest
# releases pyproject.toml allows (no pip cache: what a fresh machine gets), run the tests there,
# and only if they pass write its `pip freeze` (less petkit, and torch, pinned in setup.sh).
#   scripts/update_constraints.sh [PYTEST ARGS]   e.g. -m "not slow" for the fast tests only
#   scripts/update_constraints.sh --no-tests      freeze without testing (then run .ci/run)
# Review the diff (`git diff constraints.txt`) and commit it with the change that needed it.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg PIP_NO_CACHE_DIR=1
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
venv="$scratch/venv"
PETKIT_CONSTRAINTS="" ./setup.sh test "$venv"
if [ "${1-}" != "--no-tests" ]; then
  "$venv/bin/python" -m pytest -p no:cacheprovider -x "$@" \
    || { echo "tests failed: constraints.txt left as it was"; exit 1; }
fi
{
  echo "# Versions setup.sh installs (pip install -c constraints.txt); torch is pinned in setup.sh."
  echo "# Written by scripts/update_constraints.sh on $(date -u +%F) with $("$venv/bin/python" -V)."
  "$venv/bin/python" -m pip freeze --all --exclude-editable --exclude petkit --exclude torch \
    | grep -vE '^(setuptools|wheel)=='  # the venv's own build tools, not petkit's
} >"$scratch/constraints.txt"
mv "$scratch/constraints.txt" constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
