#!/usr/bin/env bash
# Create (or update) a virtualenv with tokalign installed editable, on a machine that has only Python.
# Usage: .ci/setup-venv.sh VENV [EXTRAS]     e.g. .ci/setup-venv.sh .venv dev
# torch: a CPU build (2.13.0) is pinned here, for our machines and CI only; pyproject keeps a range
# so users bring their own CUDA torch. An unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
venv=${1:-.venv}
extras=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch==$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')" > "$constraints"
else
  "${pip[@]}" "torch==2.13.0"
  echo "torch==2.13.0" > "$constraints"
fi
# transformers too: the golden runs (tests/train/golden) hold float32 numbers to 1e-6, and a new transformers release
# moves them by ~1e-6 (5.24.0 did); users' installs keep pyproject's range
echo "transformers==5.24.0" >> "$constraints"
"${pip[@]}" -c "$constraints" -e "$root${extras:+[$extras]}"
