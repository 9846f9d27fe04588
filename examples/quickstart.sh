#!/usr/bin/env bash
# The main job: online GRPO on the bundled tiny model, pass@1 on held-out arith before → after.
# Sets up .venv on first use (a fresh machine needs only Python 3.10+). Runs offline, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv.sh .venv
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
w=runs/quickstart
rm -rf "$w" && mkdir -p "$w"
start=$(date +%s)
tokalign prepare arith --split test --limit 200 --out "$w/test"
tokalign eval --data "$w/test" --n 4 --out "$w/eval-before"
tokalign train grpo --data arith --out "$w/grpo"
tokalign eval --model "$w/grpo" --data "$w/test" --n 4 --out "$w/eval-after"
python - "$w" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
w, secs = sys.argv[1], sys.argv[2]
before = json.load(open(f"{w}/eval-before/results.json"))["pass@1"]
after = json.load(open(f"{w}/eval-after/results.json"))["pass@1"]
print(f"pass@1 on 200 held-out arith prompts: {before:.3f} -> {after:.3f} ({100 * (after - before):+.1f} points) in {secs} s")
PY
