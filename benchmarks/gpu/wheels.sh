#!/usr/bin/env bash
# Download, here (where pip reaches PyPI), the wheels the GPU machine lacks into .whl/ at the repo root; check.sh
# installs them there with pip --no-index. The machine's image (/work/.library/device/KINDS.md) already holds torch,
# transformers, accelerate, peft, tokenizers, safetensors, typer, rich, pyyaml, pyarrow, pandas, numpy, xxhash, fsspec,
# huggingface-hub, psutil, jinja2, matplotlib, sympy, pytest and pytest-xdist; it lacks:
#   trl (the peer of benchmarks/gpu/steps.py) and its datasets (+ dill, multiprocess);
#   math-verify (+ latex2sympy2_extended, antlr4-python3-runtime): tokalign's math verifier (runtime dependency).
# Versions: those of the dev venv (trl 1.16 is what the CPU benchmark and tests compare against). One version of
# each: two stop the whole install there. Usage: bash benchmarks/gpu/wheels.sh   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
WHEELS=(
  trl==1.16.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  math-verify==0.9.0
  latex2sympy2_extended==1.11.0
  antlr4-python3-runtime==4.13.2
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl "${WHEELS[@]}"
# only the wanted versions stay (an earlier run's other version would make two)
keep=$(printf '%s\n' "${WHEELS[@]}" | python3 -c '
import re, sys
print(" ".join(re.sub(r"[-_.]+", "_", l.strip().split("==")[0]).lower() + "-" + l.strip().split("==")[1] for l in sys.stdin))')
for f in .whl/*.whl; do
  stem=$(basename "$f" | python3 -c 'import re,sys; n=sys.stdin.read().strip().split("-"); print(re.sub(r"[-_.]+","_",n[0]).lower()+"-"+n[1])')
  case " $keep " in *" $stem "*) ;; *) echo "removing $f (not in the list)"; rm -f "$f";; esac
done
ls -l .whl
du -sh .whl
