#!/usr/bin/env bash
# Set up phikit in ./.venv.   bash setup.sh          -> to run phikit
#                             bash setup.sh --dev    -> plus test and lint tools
# torch: an existing torch (a GPU build you installed yourself) is kept: the venv sees the invoking
# Python's packages when that Python already has torch. Otherwise a GPU machine gets PyPI's torch and a
# CPU-only machine gets torch==2.13.0 (set PHIKIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu to
# fetch the small CPU wheel instead of PyPI's CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
extras=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --dev)" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 || command -v rocm-smi >/dev/null 2>&1; then
    "${pip[@]}" install torch
  elif [ -n "${PHIKIT_TORCH_INDEX:-}" ]; then
    "${pip[@]}" install torch==2.13.0 --index-url "$PHIKIT_TORCH_INDEX"
  else
    "${pip[@]}" install torch==2.13.0
  fi
fi
"${pip[@]}" install -q -e ".${extras}"
echo "phikit is set up: .venv/bin/phikit --help"
