#!/usr/bin/env bash
# Set up a virtual environment with everything vlmdet and its tests need, from scratch, at the exact
# versions of requirements/lock.txt (every file sha256-checked; refresh it with scripts/lock.sh).
#   bash scripts/setup.sh                          # creates .venv (or VENV=path)
#   bash scripts/setup.sh --torch-index URL        # CPU torch from another index (or TORCH_CPU_INDEX=URL)
#   bash scripts/setup.sh --cuda                   # the CUDA build of torch even without a visible GPU
# torch: the lock holds torch from PyPI, the CUDA build, which brings ~3 GB of NVIDIA libraries. On a
# machine without an NVIDIA driver the CPU build of the same version is taken instead, from PyTorch's
# CPU index unless told otherwise, when that index can be reached and offers it; when not, the
# script says so and installs the CUDA build (it runs on CPU too, it is only larger).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
WANT_CUDA=${VLMDET_CUDA:-auto}
while [ $# -gt 0 ]; do
  case "$1" in
    --torch-index) TORCH_CPU_INDEX=$2; shift 2 ;;
    --cuda) WANT_CUDA=1; shift ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
# The lock is resolved for CPython 3.11 on x86-64 Linux (CI's machine and the GPU image).
if ! "$VPY" -c 'import sys, platform; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64")'; then
  echo "setup.sh: $("$VPY" -V) on $(uname -m): requirements/lock.txt is for Python 3.11 on x86_64;" \
       "installing the newest versions pyproject.toml allows instead (not the tested set)." >&2
  "$VPY" -m pip install -q -e ".[test]"
  exit 0
fi
"$VPY" -m pip install -qq "pip==26.3"  # the installer is pinned too: its resolver and hash checks

if [ "$WANT_CUDA" = auto ]; then
  if [ -e /proc/driver/nvidia/version ] || nvidia-smi -L >/dev/null 2>&1; then WANT_CUDA=1; else WANT_CUDA=0; fi
fi
TORCH=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$LOCK")
VISION=$(sed -n 's/^torchvision==\([^ ]*\).*/\1/p' "$LOCK")
CPU_TORCH=""
if [ "$WANT_CUDA" = 0 ]; then
  # The exact version string the index offers for this torch on cp311/x86_64 (e.g. 2.14.1+cpu);
  # empty when the index cannot be reached within 10 s or does not have it.
  CPU_TORCH=$("$VPY" - "$TORCH_CPU_INDEX" "$TORCH" <<'EOF' || true
import re, sys, urllib.request
index, version = sys.argv[1].rstrip("/"), sys.argv[2]
try:
    page = urllib.request.urlopen(f"{index}/torch/", timeout=10).read().decode()
except Exception as exc:
    print(f"setup.sh: {index} not reachable ({exc.__class__.__name__}: {exc})", file=sys.stderr)
    sys.exit(1)
found = re.findall(rf"torch-({re.escape(version)}(?:\+[a-z0-9.]+)?)-cp311-cp311-(?:manylinux|linux)[^\"'#<]*x86_64\.whl", page)
print(found[0] if found else "")
EOF
)
fi

if [ -n "$CPU_TORCH" ]; then
  echo "setup.sh: no NVIDIA driver: torch $CPU_TORCH (CPU build) from $TORCH_CPU_INDEX, the rest from $LOCK (~1.5 GB in $VENV)"
  VISION_CPU="$VISION${CPU_TORCH#"$TORCH"}"  # the same local label: 0.29.1+cpu
  "$VPY" -m pip install -qq --no-deps --index-url "$TORCH_CPU_INDEX" "torch==$CPU_TORCH" "torchvision==$VISION_CPU"
  # The lock without torch and the packages only its CUDA build needs; still exact and hash-checked.
  FILTERED=$(mktemp)
  trap 'rm -f "$FILTERED"' EXIT
  "$VPY" - "$LOCK" >"$FILTERED" <<'EOF'
import re, sys
skip = re.compile(r"^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==")
keep = True
for line in open(sys.argv[1]):
    if re.match(r"^[A-Za-z0-9]", line):
        keep = not skip.match(line)
    if keep:
        sys.stdout.write(line)
EOF
  "$VPY" -m pip install -qq --require-hashes --no-deps -r "$FILTERED"
else
  if [ "$WANT_CUDA" = 0 ]; then
    echo "setup.sh: no NVIDIA driver, but no CPU build of torch $TORCH at $TORCH_CPU_INDEX" \
         "(name another index with --torch-index URL)."
  fi
  echo "setup.sh: installing $LOCK: torch $TORCH (CUDA build) with its NVIDIA libraries:" \
       "about 3 GB to download, 6.5 GB in $VENV."
  "$VPY" -m pip install -qq --require-hashes --no-deps -r "$LOCK"
fi
# -qq: errors still print; pip's per-index notes and setuptools' "Editable installation" banner do not.
# vlmdet itself, built with the locked setuptools (no isolated build env to download), then a check
# that the installed set is consistent (every requirement of every package met).
"$VPY" -m pip install -qq --no-deps --no-build-isolation -e .
"$VPY" -m pip check
echo "vlmdet installed in $VENV: activate with '. $VENV/bin/activate'"
