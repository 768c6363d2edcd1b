#!/usr/bin/env bash
# Set up a virtual environment with everything vlmdet and its tests need, from scratch.
#   bash scripts/setup.sh            # creates .venv (or VENV=path)
# On a GPU machine install the CUDA build of torch that fits your driver first; this script keeps
# an installed torch and only pins one where none is present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$VENV/bin/python" -m pip install -q -e ".[test]"
echo "vlmdet installed in $VENV: activate with '. $VENV/bin/activate'"
