"""Fixed-seed 3-step runs of every built-in algorithm, in process, on the bundled tiny model.

``python tests/train/golden_runs.py --write`` records each run's per-step metrics in ``tests/train/golden/<name>.json``;
``test_golden.py`` re-runs them and compares. Recorded before the components refactor, so a refactor that changes any
number shows up here.

Tolerance: the same numbers on another CPU are not the same floats — the kernels differ (AVX-512 against AVX2, other
blockings). Measured 2026-12-02 on an AVX-512 Xeon against the files recorded on the CI machine: up to 3e-5 relative
on quantities of order 1e-3..10 (DPO's rewards, KL estimates, grad norms), and ~1e-7 absolute on quantities that are
rounding noise around 0 (PPO's on-policy surrogate). So runs compare to ``REL`` relative or ``ABS`` absolute, 1e-4 and
1e-6 by default; on the machine that recorded them (before and after a refactor, say) set ``TOKALIGN_GOLDEN_REL=1e-6
TOKALIGN_GOLDEN_ABS=1e-12`` for the strict check."""

from __future__ import annotations

import json
import math
import sys
import tempfile
import os
from pathlib import Path

REL = float(os.environ.get("TOKALIGN_GOLDEN_REL", "1e-4"))
ABS = float(os.environ.get("TOKALIGN_GOLDEN_ABS", "1e-6"))
HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
# what a step's metrics say about the maths (timings, memory and throughput vary run to run)
VOLATILE_PREFIXES = ("time/", "memory/", "tokens_per_s")

ONLINE = {"data": "arith", "reward": ["exact_match"], "rollout": {"n": 4, "max_new_tokens": 8}}
EPISODES = {"n": 4, "max_new_tokens": 8, "env": "golden_runs:Always", "max_turns": 3}
RUNS: dict[str, dict] = {  # algorithm -> config layer (beyond COMMON); data files are written by _data()
    **{a: ONLINE for a in ("grpo", "dr_grpo", "dapo", "bnpo", "rec", "opmd", "tempo", "gtpo", "dcpo", "hapo", "rloo",
                           "reinforce_pp_baseline", "reinforce_pp", "gspo", "ppo", "remax", "sspo", "prime", "thr", "thor", "salt",
                           "poad", "cispo", "steer", "rrhf")},
    "pure": {**ONLINE, "reward": ["exact_match", "golden_runs:Steps"]},
    "reinforce_ada": {**ONLINE, "algorithm": {"round_n": 4, "max_rounds": 2}},
    "dars": {**ONLINE, "algorithm": {"n_max": 8}},
    # temperature 1.5: completions of one prompt differ in length (at 1.0 they do not), so the length reward is not 0
    "grpo_lambda": {**ONLINE, "rollout": {**ONLINE["rollout"], "temperature": 1.5}, "algorithm": {"lam": 0.5}},
    "par": {**ONLINE, "algorithm": {"num_references": 2}},
    # the bundled model's completions are sums, not prose: digits as the "strategic grams", so some tokens are amplified
    "hicra": {**ONLINE, "algorithm": {"alpha": 0.5, "grams": [str(d) for d in range(10)],
                                       "whole_words": False}},
    # the Steps component (it grows with length; 1.5: lengths differ) above its threshold θ = 0: its multiplier moves
    "constrained": {**ONLINE, "reward": ["exact_match", "golden_runs:Steps"], "rollout": {**ONLINE["rollout"], "temperature": 1.5},
                    "algorithm": {"constraints": ["golden_runs:Steps"], "thresholds": [0.0], "multiplier_lr": 1.0}},
    "spo": {**ONLINE, "rollout": {"n": 2, "max_new_tokens": 8}, "algorithm": {"rollouts": 2}},
    "rto": {**ONLINE, "models": {"dpo": "@model"}},
    # temperature 1.5 (as grpo_lambda): completions of a prompt differ in length and likelihood, so the method acts
    "xrpo": {**ONLINE, "rollout": {**ONLINE["rollout"], "temperature": 1.5}},
    "grao": ONLINE,  # the arith reference answers join each group as scored rows
    "p3o": {**ONLINE, "rollout": {"n": 2, "max_new_tokens": 8}},
    "madpo": {"data": "@margin_pairs"},
    # four rated completions per prompt: stage 0 trains best vs worst, stage 1 (after the reference refresh) the next pair
    "vas": {"data": "@scored"},  # the value model's TD(λ) regression on scored completions
    "curry_dpo": {"data": "@scored", "algorithm": {"stages": 2, "steps_per_stage": 2}},
    "srpo": {"data": "@srpo"},
    "e1": {**ONLINE, "rollout": {**ONLINE["rollout"], "temperature": 1.5}, "algorithm": {"effort": 1.0}},
    "length_curriculum": {**ONLINE, "rollout": {**ONLINE["rollout"], "temperature": 1.5},
                          "algorithm": {"initial_budget": 4, "decay_interval": 1, "decay_factor": 0.5}},
    "tldr": {**ONLINE, "rollout": {**ONLINE["rollout"], "temperature": 1.5}, "algorithm": {"budgets": [1, 2, 4]}},
    "grpo_s": ONLINE,
    # kept fractions ½ relax to 1 over the 3 steps: steps 0 and 1 down-sample rollouts and tokens
    "d3s": {**ONLINE, "rollout": {**ONLINE["rollout"], "temperature": 1.5}},
    # the bundled model writes sums, no format tags: the first digit as the "format", so a group holds several (α ≠ 1)
    "ada_grpo": {**ONLINE, "rollout": {**ONLINE["rollout"], "temperature": 1.5},
                 "algorithm": {"format_names": [f"d{d}" for d in range(1, 10)], "format_tags": [str(d) for d in range(1, 10)]}},
    # no think tags from the bundled model: every row pays the format penalty, SLM finds no decision token
    "adacot": {**ONLINE, "algorithm": {"selective_loss_masking": True}},
    "adacot_ppo": ONLINE,
    # Steps grows with length (1.5: lengths differ); unclipped gradients, so the two influences differ and the weights move
    "dynamic_weights": {**ONLINE, "reward": ["exact_match", "golden_runs:Steps"], "rollout": {**ONLINE["rollout"], "temperature": 1.5},
                        "train": {"max_grad_norm": 100.0},
                        "algorithm": {"objectives": ["exact_match", "golden_runs:Steps"], "weight_lr": 0.002}},
    # every batch point is above z = (−1, −1): the meta reward moves off 1 from the first step
    "dynamic_weights@hypervolume": {**ONLINE, "reward": ["exact_match", "golden_runs:Steps"],
                                    "rollout": {**ONLINE["rollout"], "temperature": 1.5},
                                    "algorithm": {"method": "hypervolume", "objectives": ["exact_match", "golden_runs:Steps"],
                                                  "reference_point": [-1.0, -1.0]}},
    # every prompt is sampled again (f = 1; ¼ of the batch's prompts would be none): extra rows every step
    "aepo": {**ONLINE, "algorithm": {"prompt_fraction": 1.0}},
    # the bundled model's completions hold no paragraphs: an episode every 2 tokens, 2 forced answers per boundary
    "mrt": {**ONLINE, "algorithm": {"rollouts": 2, "boundary": "tokens", "episode_tokens": 2}},
    "brpo": {**ONLINE, "algorithm": {"budgets": [2, 8]}},  # arith's 3–4-token answers are all cut at 2
    "tppo": {**ONLINE, "rollout": {"n": 4, "max_new_tokens": 2}},  # windows of 2 tokens: answers span two
    "sapo_swarm": ONLINE,
    "rmt": {**ONLINE, "reward": ["next_token"]},  # arith's answers as next words; curriculum, budget and NTP on  # no swarm directory: GRPO with ε_high 0.28 (the two-node exchange is tested in test_sapo)
    **{a: {"data": "@pairs"} for a in ("dpo", "ipo", "hinge", "tdpo", "tdpo1", "simpo", "treg", "inpo")},
    "tgdpo": {"data": "@pairs", "models": {"teacher": "@model"}},
    "cdpo": {"data": "@pairs", "models": {"positive": "@model", "negative": "@model"}},
    # the reverse model differs from the policy (its head perturbed): with three identical models AlignDistil's weight
    # 1e-3 + |p_dpo − p_rev| is rounding noise / 1e-3, and so was the whole golden run (0 on one CPU, 6.9 on another)
    "aligndistil": {"data": "@pairs", "models": {"dpo": "@model", "reverse": "@perturbed_model"}},
    "modpo": {"data": "@pairs", "models": {"margin": "@model"}},
    "tpo": {"data": "@triples"},
    "kto": {"data": "@unpaired"},
    "sft": {"data": "@completions"},
    "otr": {"data": "@completions"},
    "otr@expected": {"data": "@completions", "algorithm": {"estimator": "expected"}},
    "prm": {"data": "@stepwise"},
    # the loop's other paths: several updates per batch (frozen old log-probs), micro-batches by rows and by tokens
    "grpo@mu2": {**ONLINE, "train": {"updates_per_batch": 2, "micro_batch_size": 4}},
    "ppo@tokens": {**ONLINE, "train": {"micro_batch_tokens": 64}},
    "dpo@micro": {"data": "@pairs", "train": {"micro_batch_size": 2}},
    # multi-turn episodes (an environment that always answers: the bundled model makes no tool calls on arith prompts), plain and branching
    "grpo@episodes": {**ONLINE, "reward": ["golden_runs:Steps"], "rollout": EPISODES},
    "arpo": {**ONLINE, "reward": ["golden_runs:Steps"], "rollout": EPISODES},
    "portool": {**ONLINE, "reward": ["golden_runs:Steps"], "rollout": EPISODES},
    "poad@episodes": {**ONLINE, "reward": ["golden_runs:Steps"], "rollout": EPISODES},
    "ppo@episodes": {**ONLINE, "reward": ["golden_runs:Steps"], "rollout": EPISODES},
}


class Steps:
    """A per-token reward for PURE's golden run: +0.5 on even completion tokens after the first, −0.25 on odd ones."""

    def __call__(self, samples):
        from tokalign.protocols import Reward

        out = []
        for s in samples:
            vals = [0.0] + [0.5 if i % 2 == 0 else -0.25 for i in range(1, len(s.completion_ids))]
            out.append(Reward(sum(vals), vals))
        return out


class Always:
    """The episodes' environment: answers every model turn with "go on"."""

    name = "always"

    def tools(self):
        return None

    def start(self, row):
        return None

    def step(self, state, text):
        from tokalign.environments.base import Reply

        return Reply([{"role": "user", "content": "go on"}])


COMMON = {"seed": 0, "train": {"max_steps": 3, "batch_size": 4, "save_every": 0}}


def _data(tmp: Path) -> dict[str, str]:
    """Small deterministic data files in TRL's formats."""
    facts = [(f"{a}+{b}=", str(a + b), str(a + b + 1)) for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    files = {
        "pairs": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in facts],
        "triples": [{"prompt": p, "chosen": c, "rejected": r, "reference": c} for p, c, r in facts],
        "unpaired": [{"prompt": p, "completion": c if k % 2 else r, "label": bool(k % 2)} for k, (p, c, r) in enumerate(facts)],
        "completions": [{"prompt": p, "completion": c} for p, c, _ in facts],
        "stepwise": [{"prompt": p, "completions": [p, c if k % 2 else r], "labels": [True, bool(k % 2)]}
                     for k, (p, c, r) in enumerate(facts)],
        # reward-model scores of each side: margins 2, −0.5, 5, 0.5 give MADPO four different weights
        "margin_pairs": [{"prompt": p, "chosen": c, "rejected": r, "chosen_margins": [w], "rejected_margins": [lo]}
                         for (p, c, r), (w, lo) in zip(facts, ((3.0, 1.0), (2.0, 2.5), (5.0, 0.0), (1.0, 0.5)))],
    }
    out = {}
    for name, rows in files.items():
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[f"@{name}"] = str(path)
    return {**out, **_scored(tmp, facts)}


def _scored(tmp: Path, facts) -> dict[str, str]:
    """Scored artifacts written by hand (no sampling, so the same tokens on every CPU): each prompt with four
    completions a+b, a+b+1, a+b+2, a+b+3 rated 1, 2/3, 1/3, 0; and the same as SRPO's six-row revision groups."""
    from tokalign import artifacts, models
    from tokalign.algorithms.srpo import revision_groups

    tok = models.load_tokenizer(models.resolve_model("")[0])
    rows = []
    for g, (p, c, _) in enumerate(facts):
        messages = [{"role": "user", "content": p}]
        prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = list(tok(prompt_text, add_special_tokens=False)["input_ids"])
        for k in range(4):
            text = str(int(c) + k)
            ids = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
            rows.append({"id": f"{p}#{k}", "group_id": g, "sample_idx": k, "prompt": json.dumps(messages), "prompt_text": prompt_text,
                         "prompt_ids": prompt_ids, "completion": text, "completion_ids": ids, "sampler_logps": None,
                         "finish_reason": "stop", "reward": 1 - k / 3, "rewards": {"exact_match": 1 - k / 3}, "verdicts": "{}",
                         "token_rewards": None})
    revise = list(tok("\nRevise:\n", add_special_tokens=False)["input_ids"])
    out = {}
    for name, data in (("scored", rows), ("srpo", revision_groups(rows, revise))):
        with artifacts.writing(tmp / name, "scored", artifacts.Provenance()) as w:
            w.write_rows(data)
        out[f"@{name}"] = str(tmp / name)
    return out


def _perturbed_model(tmp: Path) -> str:
    """The bundled model with seeded noise (std 0.02) on its LM head: a second model that shares the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokalign import models

    src, out = models.resolve_model("")[0], tmp / "perturbed-model"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head.add_(0.02 * torch.randn(head.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return str(out)


def _resolve(layer, subst: dict[str, str]):
    if isinstance(layer, dict):
        return {k: _resolve(v, subst) for k, v in layer.items()}
    if isinstance(layer, list):
        return [_resolve(v, subst) for v in layer]
    return subst.get(layer, layer) if isinstance(layer, str) else layer


def run(name: str, tmp: Path, extra: dict | None = None) -> list[dict]:
    """The per-step metrics of algorithm ``name``'s golden run (its volatile keys dropped); ``extra``: a config layer
    on top (e.g. another execution setting)."""
    from tokalign import config, models
    from tokalign.train.loop import run as train
    from tokalign.train.plan import make_plan

    subst = {**_data(tmp), "@model": str(models.resolve_model("")[0])}
    if "@perturbed_model" in json.dumps(RUNS[name]):
        subst["@perturbed_model"] = _perturbed_model(tmp)
    base = config.model_defaults(models.resolve_model("")[1])  # the bundled model's settings, as the CLI layers them
    layers = [base, COMMON, _resolve(RUNS[name], subst), *([extra] if extra else [])]
    plan = make_plan(name.split("@")[0], layers, str(tmp / f"out-{name}"))
    out = train(plan, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE_PREFIXES)} for r in rows]


# the sampler/trainer log-prob gaps are differences of nearly equal numbers (~1e-7, float rounding): held to 1e-5 absolute
ROUNDING_NOISE = ("mismatch/logp_gap_abs", "mismatch/logp_gap_max")


def compare(got: list[dict], want: list[dict], rel: float = REL, abs_tol: float = ABS, skip: tuple = ()) -> list[str]:
    """Differences between two runs' metrics, one line each (empty: the same numbers)."""
    problems = []
    if len(got) != len(want):
        return [f"{len(got)} steps, golden has {len(want)}"]
    for step, (g, w) in enumerate(zip(got, want), 1):
        for key in sorted((set(g) | set(w)) - set(skip)):
            if key not in g or key not in w:
                problems.append(f"step {step}: '{key}' only in {'the golden file' if key in w else 'this run'}")
                continue
            a, b = g[key], w[key]
            same = (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and isinstance(b, float) and math.isnan(b) else \
                math.isclose(a, b, rel_tol=rel, abs_tol=max(1e-5, abs_tol) if key in ROUNDING_NOISE else abs_tol) if isinstance(b, (int, float)) else a == b
            if not same:
                problems.append(f"step {step}: {key} = {a!r}, golden {b!r}")
    return problems


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or sorted(RUNS)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = run(name, Path(tmp))
        if "--write" in sys.argv:
            (GOLDEN / f"{name}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        print(name, json.dumps({k: metrics[-1].get(k) for k in ("loss", "grad_norm", "reward/mean")}), flush=True)
