#!/usr/bin/env bash
# The GPU check (issue #10 item 9), self-contained, for one NVIDIA GPU (an H200 here: under 8 minutes in all) with the
# machine's own python3 (torch, transformers, accelerate, peft, pytest; no internet, no vllm, no trl):
#   0. installs the wheels of .whl/ (benchmarks/gpu/wheels.sh downloads them: trl, datasets, ...) into /tmp/site and
#      makes tokalign's entry points visible (metadata generated from pyproject.toml; the code is this work tree's);
#   a. pytest -m gpu tests/gpu: precision, device placement, two processes on one GPU, resume;
#   b. benchmarks/gpu/steps.py: GRPO and DPO steps of tokalign and TRL on a random Qwen2.5-0.5B in bf16-mixed.
# Logs go to $OUT when it is set (else /tmp/gpu-check): env.log, pytest.log, steps.log, steps.json. Exit status: 0
# when (a) and (b) both pass. Times are capped by timeout: PYTEST_TIMEOUT (240 s), STEPS_TIMEOUT (200 s).
# CHECK_DEVICE=cpu CHECK_WHEELS=0 PYTHON=.venv/bin/python bash benchmarks/gpu/check.sh: the same on a CPU, in the dev
# venv (a dry run of this script; the wheels are for the GPU machine's Python 3.12).
# Device tool: command `bash benchmarks/gpu/check.sh`, carry [".whl"], timeout_s 540.
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG=${OUT:-/tmp/gpu-check}
mkdir -p "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
say() { echo "[check $(( $(date +%s) - T0 ))s] $*"; }

if [ "${CHECK_WHEELS:-1}" = 0 ]; then
  say "CHECK_WHEELS=0: the wheels of .whl/ are not installed"
elif ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
else
  say "no .whl/ (run benchmarks/gpu/wheels.sh here and carry .whl): TRL and datasets may be missing"
fi
META=/tmp/tokalign-meta
$PY - "$META" <<'EOF' || exit 1
# tokalign's distribution metadata (its plug-ins are entry points), from pyproject.toml, unless one is installed
import importlib.metadata as md, pathlib, sys, tomllib
try:
    md.distribution("tokalign")
    sys.exit(0)
except md.PackageNotFoundError:
    pass
p = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
d = pathlib.Path(sys.argv[1]) / f"tokalign-{p['version']}.dist-info"
d.mkdir(parents=True, exist_ok=True)
(d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tokalign\nVersion: {p['version']}\n")
groups = {**p.get("entry-points", {}), "console_scripts": p.get("scripts", {})}
(d / "entry_points.txt").write_text("".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items()))
EOF
export PYTHONPATH=/tmp/site:$PWD:$META${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi -L 2>&1
  $PY - <<'EOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
if torch.cuda.is_available():
    print("nccl", torch.cuda.nccl.version())
for name in ("tokalign", "transformers", "accelerate", "peft", "trl", "datasets", "tokenizers", "huggingface-hub", "safetensors",
             "pyarrow", "typer", "rich", "pyyaml", "numpy", "pandas", "fsspec", "dill", "multiprocess", "math-verify", "pytest",
             "pytest-xdist"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
print("tokalign algorithms (entry points):", len(md.entry_points(group="tokalign.algorithms")))
EOF
} 2>&1 | tee "$LOG/env.log"
# CHECK_DEVICE=cpu: a dry run of this script on a machine without a GPU (the tests on the CPU, the benchmark --tiny)
STEPS=()
if [ "${CHECK_DEVICE:-cuda}" = cpu ]; then
  export TOKALIGN_GPU_TESTS_DEVICE=cpu TOKALIGN_DEVICE=cpu
  STEPS=(--device cpu --tiny)
else
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { say "no CUDA device: stopping"; exit 1; }
fi

XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n 4)
say "(a) pytest -m gpu tests/gpu ${XDIST[*]}"
timeout -k 10 "${PYTEST_TIMEOUT:-240}" $PY -m pytest -m gpu tests/gpu -q -p no:cacheprovider "${XDIST[@]}" 2>&1 | tee "$LOG/pytest.log"
A=${PIPESTATUS[0]}
say "(a) exit $A"

say "(b) benchmarks/gpu/steps.py"
timeout -k 10 "${STEPS_TIMEOUT:-200}" $PY benchmarks/gpu/steps.py "${STEPS[@]}" --timeout 120 --json "$LOG/steps.json" 2>&1 | tee "$LOG/steps.log"
B=${PIPESTATUS[0]}
say "(b) exit $B; done (pytest $A, steps $B)"
[ "$A" = 0 ] && [ "$B" = 0 ]
