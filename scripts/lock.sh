#!/usr/bin/env bash
# Refresh requirements/lock.txt, the exact versions (with sha256 hashes of every file) that
# scripts/setup.sh, CI (.ci/run) and the GPU image (deployments/Dockerfile) install.
#   bash scripts/lock.sh                         # add what pyproject.toml gained; keep every other pin
#   bash scripts/lock.sh --upgrade               # move everything to the newest versions allowed
#   bash scripts/lock.sh --upgrade-package trl   # move one package (and what it needs)
# Tool: uv's `pip compile` (uv from PyPI, pinned below, in a throwaway venv .venv-lock). Resolved for
# CPython 3.11 on x86-64 Linux (glibc >= 2.28), against PyPI, so the hashes are PyPI's files.
# torch/torchvision move only when requirements/constraints.in says so. Run CI after a refresh.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
TOOL=${LOCK_TOOL_VENV:-.venv-lock}
if ! "$TOOL/bin/uv" --version 2>/dev/null | grep -q "^uv $UV_VERSION\b"; then
  python3 -m venv "$TOOL"
  "$TOOL/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
"$TOOL/bin/uv" pip compile pyproject.toml --extra test \
  --constraints requirements/constraints.in \
  --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --index-url https://pypi.org/simple \
  --custom-compile-command "bash scripts/lock.sh" --quiet \
  --output-file requirements/lock.txt "$@"
