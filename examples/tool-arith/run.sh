#!/usr/bin/env bash
# Tool use learned end to end on a CPU: GRPO on the bundled tiny model with the calculator environment
# (`tool_arith`: four-digit products, which the model cannot compute in its head but a calculator call solves),
# then the same run without the tool. Prints held-out pass@1 before -> after and tool calls per episode for both.
# Sets up .venv on first use. Runs offline, on CPU (about 5 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/setup-venv.sh .venv
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
w=runs/tool-arith
rm -rf "$w" && mkdir -p "$w"
tokalign prepare tool_arith --split test --limit 100 --out "$w/test"
evaluate() {  # MODEL OUT [--env calculator]
  local model=$1 out=$2; shift 2
  tokalign eval --model "$model" --data "$w/test" --n 4 --max-turns 2 --max-new-tokens 96 "$@" --out "$out" --quiet
}
bundled=$(python -c "from tokalign.models import BUNDLED_MODEL; print(BUNDLED_MODEL)")
evaluate "$bundled" "$w/before-tool" --env calculator
evaluate "$bundled" "$w/before-no-tool"
for run in tool no-tool; do
  env=(); [ "$run" = tool ] && env=(--env calculator)
  start=$(date +%s)
  tokalign train grpo --data tool_arith "${env[@]}" --out "$w/grpo-$run" --quiet
  echo $(( $(date +%s) - start )) > "$w/grpo-$run.seconds"
  evaluate "$w/grpo-$run" "$w/after-$run" "${env[@]}"
done
python - "$w" <<'PY'
import json, sys
w = sys.argv[1]
r = lambda name: json.load(open(f"{w}/{name}/results.json"))
for run, label in (("tool", "with the calculator"), ("no-tool", "without the tool   ")):
    b, a = r(f"before-{run}"), r(f"after-{run}")
    secs = open(f"{w}/grpo-{run}.seconds").read().strip()
    print(f"tool_arith pass@1 on 100 held-out prompts, {label}: {b['pass@1']:.3f} -> {a['pass@1']:.3f} "
          f"({100 * (a['pass@1'] - b['pass@1']):+.1f} points; tool calls per episode {b.get('mean_tool_calls', 0):.2f} -> "
          f"{a.get('mean_tool_calls', 0):.2f}) in {secs} s of training")
PY
