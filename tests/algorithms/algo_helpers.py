"""Helpers shared by several tests/algorithms/test_*.py files: hand-made batches, the micro-batch check of the token-level
RLVR variants, and the checks of a short run through the real CLI. Imported as ``from algo_helpers import ...``
(pytest puts this directory on sys.path for the test files in it)."""

from __future__ import annotations

import json
import math

import torch
from conftest import cli, leaf, micro_batch_check, token_batch
from torch.testing import assert_close

from tokalign.batching import Seq, collate
from tokalign.protocols import TokenBatch
from tokalign.rows import dumps
from tokalign.train.sources import scored_seqs

# ---------------------------------------------------------------------------------------------------
# batches


def groups_batch(completions, rewards, group_ids, token=None) -> TokenBatch:
    """Collated rows with prompt [1, 2] and the given completion ids (so the tree code sees real token ids)."""
    token = token or [{} for _ in completions]
    return collate([Seq([1, 2], list(c), g, row={"rewards": float(r)}, token=tk)
                    for c, r, g, tk in zip(completions, rewards, group_ids, token)], pad_id=0)


def episode(call, reply, answer, reward, group, calls=0, errors=0):
    """A rollout row after prompt [1, 2]: model turn ``call``, environment tokens ``reply``, model turn ``answer``;
    ``calls`` tool calls in the first turn, ``errors`` of them failed."""
    ids = call + reply + answer
    spans = [[0, len(call), "model"], [len(call), len(call) + len(reply), "env"], [len(call) + len(reply), len(ids), "model"]]
    ep = {"turns": spans, "messages": [{"role": "assistant", "content": ""}, {"role": "user", "content": ""},
                                       {"role": "assistant", "content": ""}], "tool_calls": [{"name": "t", "arguments": {}}] * calls, "turn_errors": [errors, 0]}
    if calls:  # the first turn's calls: tool messages after it
        ep["messages"][1:2] = [{"role": "tool", "name": "t", "content": ""}] * calls
    return {"id": f"{group}", "prompt_ids": [1, 2], "completion_ids": ids, "group_id": group, "reward": reward,
            "loss_mask": [1] * len(call) + [0] * len(reply) + [1] * len(answer), "sampler_logps": [0.0] * len(ids),
            "episode": dumps(ep)}


def batch_of(rows):
    return collate(scored_seqs(rows, [r["group_id"] for r in rows]), pad_id=0)


def completion(batch, i, name="advantages"):
    """Row i's values of a [B, T] field on its completion tokens (prompt [1, 2]: token j at column 1 + j)."""
    n = int(batch.attention_mask[i].sum()) - 2
    return batch.fields[name][i, 1:1 + n].tolist()


def rewards_batch(rewards, group_ids) -> TokenBatch:
    """Rows of two completion tokens with the given rewards and group ids."""
    return token_batch(torch.ones(len(rewards), 2), {"rewards": torch.tensor(rewards, dtype=torch.float32),
                                                     "group_ids": torch.tensor(group_ids)})


def random_groups(seed: int, lengths, gids, rewards) -> TokenBatch:
    """Collated rows with random policy log-probs (field "pol") and behaviour log-probs near them."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, (n, gid, r) in enumerate(zip(lengths, gids, rewards)):
        pol = -torch.rand(n, generator=g) * 2
        seqs.append(Seq([1] * (1 + i % 3), list(range(10, 10 + n)), gid, row={"rewards": float(r)},
                        token={"pol": pol.tolist(), "old_logps": (pol + 0.05 * torch.randn(n, generator=g)).tolist(),
                               "ent": (torch.rand(n, generator=g) * 3).tolist()},
                        prompt_index=gid))
    return collate(seqs, pad_id=0)


def ppo_batch(rewards, mask, old_values=None, logps=None) -> TokenBatch:
    """One prompt per row (group ids 0..B−1) with per-token mask ``mask``, behaviour log-probs and old values (0 unless
    given), and the batch totals (tokens, seqs)."""
    mask = torch.tensor(mask)
    b = len(rewards)
    fields = {"rewards": torch.tensor(rewards), "old_logps": torch.zeros_like(mask) if logps is None else torch.tensor(logps),
              "old_values": torch.zeros_like(mask) if old_values is None else torch.tensor(old_values),
              "group_ids": torch.arange(b)}
    return TokenBatch(torch.zeros(b, mask.shape[1] + 1, dtype=torch.long), torch.ones(b, mask.shape[1] + 1, dtype=torch.long),
                      mask, fields, {"tokens": float(mask.sum()), "seqs": float(b)})


# ---------------------------------------------------------------------------------------------------
# micro-batches add up to the full batch


def off_policy_loss_and_grad(algo, batch: TokenBatch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``algo``'s loss and its gradient w.r.t. the policy log-probs on a prepared ``batch``, off-policy (ρ ≠ 1): seeded
    behaviour log-probs in ``old_logps`` and policy log-probs 0.3·N(0, 1) away from them."""
    from tokalign.protocols import PolicyOutput

    g = torch.Generator().manual_seed(seed)
    batch.fields["old_logps"] = -torch.rand(batch.completion_mask.shape, generator=g)
    lp = leaf(batch.fields["old_logps"] + 0.3 * torch.randn(batch.completion_mask.shape, generator=g))
    res = algo.loss(batch, PolicyOutput(lp))
    res.loss.backward()
    return res.loss.detach(), lp.grad


def same_as_base(algos, make_batch, values: torch.Tensor) -> None:
    """Each algorithm's prepared rewards and advantages, loss and gradient on ``make_batch()`` (policy log-probs
    ``values``, reference ``values + 0.1``) equal the last one's — the base method's — bit for bit, and the gradient
    is not all zero (the limiting case of a method that reshapes GRPO's rewards or advantages)."""
    from tokalign.protocols import PolicyOutput

    results = []
    for algo in algos:
        batch = algo.prepare(make_batch())
        batch.fields["ref_logps"] = values + 0.1
        lp = leaf(values)
        out = algo.loss(batch, PolicyOutput(lp))
        out.loss.backward()
        results.append((batch.fields["rewards"], batch.fields["advantages"], out.loss.detach(), lp.grad))
    for got in results[:-1]:
        for x, y in zip(got, results[-1]):
            assert torch.equal(x, y)
    assert results[-1][3].abs().sum() > 0


def micro_batches_add_up(algo) -> None:
    """Three groups of random completions over a 4-token vocabulary (so prefixes are shared and branch), run whole and
    as micro-batches of 2 rows (groups kept whole, each trimmed to its width): with batch.totals the micro-batch losses
    and gradients add up to the full-batch ones."""
    g = torch.Generator().manual_seed(11)
    seqs = []
    for i, (gid, r) in enumerate(zip([0, 0, 0, 1, 1, 2, 2, 2], [1, 0, 0, 1, 1, 0.5, 0, 1])):
        n = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(3, 7, (n,), generator=g).tolist()
        pol = -torch.rand(n, generator=g) * 2
        seqs.append(Seq([1] * (1 + i % 3), ids, gid, row={"rewards": float(r)},
                        token={"pol": pol.tolist(), "old_logps": (pol + 0.2 * torch.randn(n, generator=g)).tolist(),
                               "ref_logps": (pol + 0.1 * torch.randn(n, generator=g)).tolist(),
                               "ent": (torch.rand(n, generator=g) * 0.8).tolist()}))
    batch = collate(seqs, pad_id=0)
    algo.prepare(batch)
    full, summed, full_grad, mb_grad, n = micro_batch_check(algo, batch, entropy=lambda b: b.fields["ent"])
    assert n == 3
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)
    assert float(full_grad.abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------------
# runs through the real CLI


def run_metrics(run) -> list[dict]:
    """A run's metrics.jsonl, without the keys that vary run to run (time/*, tokens_per_s)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def weights_changed(out) -> bool:
    """Whether the weights saved in ``out`` differ from the bundled model's."""
    from safetensors.torch import load_file

    from tokalign.models import BUNDLED_MODEL

    base, trained = load_file(BUNDLED_MODEL / "model.safetensors"), load_file(out / "model.safetensors")
    return max(float((trained[k] - base[k]).abs().max()) for k in base) > 0


def check_run(out, steps=2) -> list[dict]:
    """A finished run in ``out``: ``steps`` logged steps with finite losses, and weights that moved."""
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert weights_changed(out)
    return metrics


def train_changes_weights(tmp_path, algo: str, *args: str, steps: int = 2, grad_norm: bool = True) -> list[dict]:
    """`tokalign train ALGO ARGS` for ``steps`` steps (batch size 2) on the bundled model: the run prints its checkpoint
    path, every logged loss is finite (and, with ``grad_norm``, every gradient norm positive) and the saved weights
    differ from the bundled model's. Returns the logged metrics."""
    out = tmp_path / "x"
    proc = cli("train", algo, *args, "--max-steps", str(steps), "--batch-size", "2", "--out", str(out), "--overwrite", "--quiet")
    assert proc.stdout.strip() == str(out)
    metrics = run_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) and (not grad_norm or m["grad_norm"] > 0) for m in metrics)
    assert weights_changed(out)
    return metrics


# ---------------------------------------------------------------------------------------------------
# prefix-rollout hooks (MRT's episodes, BRPO's budgets)

# text "x\n\nWait\n\ny\n\nWait,\n\nAlternatively z": paragraphs 0 "x", 1 "Wait", 2 "y", 3 "Wait,", 4 "Alternatively z"
PIECES = ["x", "\n", "\n", "Wait", "\n\n", "y", "\n\n", "Wait", ",", "\n\n", "Alternatively", " z"]


class Tok:
    """Token id j decodes to PIECES[j] (ids ≥ len(PIECES): str(id)); text → one id per character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(PIECES[i] if i < len(PIECES) else str(i) for i in ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [100 + ord(ch) % 100 for ch in text]}


def stand_in_source(seen, tokenizer=None):
    """An online source whose engine answers token 7 to every prompt (recording prompts, n and budget in ``seen``) and
    whose reward is len(completion_ids)/10: for the prefix-rollout hooks (MRT, BRPO)."""
    from tokalign.protocols import Reward
    from tokalign.rewards import ResolvedReward
    from tokalign.rollout import Completion, SamplingSpec
    from tokalign.train.sources import OnlineSource

    class Engine:
        def generate(self, prompts, spec):
            seen["prompts"], seen["n"], seen["max_new_tokens"] = prompts, spec.n, spec.max_new_tokens
            return [[Completion([7], [0.0], "stop", "7") for _ in range(spec.n)] for _ in prompts]

    Engine.tokenizer = tokenizer or Tok()

    def score(samples):
        seen.setdefault("scored", []).extend(list(s.completion_ids) for s in samples)
        return [Reward(len(s.completion_ids) / 10) for s in samples]

    reward = ResolvedReward("len", 1.0, score, None, False)
    return OnlineSource([], Engine(), [reward], SamplingSpec(n=1, max_new_tokens=8), 1, 0)


def stand_in_row():
    """A rollout row after prompt [5]: completion (20, 21, 22, 23), reward 0."""
    return {"id": "a#0", "prompt": '"q"', "prompt_ids": [5], "reference": None, "completion": "", "completion_ids": [20, 21, 22, 23],
            "sampler_logps": [0.0] * 4, "finish_reason": "stop", "reward": 0.0}
