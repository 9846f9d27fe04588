"""GTPO — "GTPO: Trajectory-Based Policy Optimization in Large Language Models", Simoni, Fontana, Rossolini &
Saracino 2025, arXiv:2508.03772 (Group-relative Trajectory-based PO; not the entropy-shaped "GTPO/GRPO-S"). Tokens
that positive- and negative-advantage completions of a group share at the same position are "conflict tokens": their
push-down is skipped and their push-up amplified; high-entropy completions are dropped. Official code:
winstonsmith1897/GTPO ``gtpo/gtpo_training.py`` (``build_conflict_mask``, ``gtpo_compute_loss``, advantages in
``_prepare_inputs``) @5d33811; defaults from its ``config.yaml`` and module constants.

Shapes: ``rewards``, ``group_ids``, ``advantages``, ``gtpo_conflicts``: [B]; ``gtpo_delta``, ``logps``,
``out.entropy``, ``ref_logps``, mask: [B, T].

    A_i = R_i − mean_g R                                 (official; scale_rewards="group" divides by std_g)
    conflict: within a group, (position k, token) pairs that occur in some A > 0 completion and in some A < 0 one.
      A completion's forward conflict run is its longest prefix made only of such pairs; its backward run the same
      with positions counted from its last token.
    δ^run_{i,k} = W (A_i > 0) or 0 (A_i < 0) on the run, 1 elsewhere;   δ_{i,k} = δ^fwd_{i,k}·δ^bwd_{i,k}
    n_i = max(1, #tokens in either run);  completions with A = 0: δ ≡ 1
    H̄_i = mean_t H_{i,t} (entropy of π_θ, no grad);   A'_i = A_i − c_H·H̄_i if H̄_i ≤ H_max else 0
    loss = (1/B) Σ_i ( −Σ_t m ρ̃_t A'_i δ_{i,t} / (|y_i|·n_i)  +  β·Σ_t m KL_t / |y_i| ),   ρ̃ = exp(ℓ − sg ℓ)

Defaults: W = 2, H_max = 0.7, c_H = 0.1 (``W_RAW``, ``ENT_THRESHOLD``, ``ENT_SCALE``), β = 0 (no reference model).
ρ̃ has value 1: GTPO is on-policy REINFORCE and needs no ℓ^old. As in the official code, the conflict mask uses the
sign of A before the entropy shift, and the shift applies to A = 0 rows too (an all-equal group gets A' = −c_H·H̄).
Where tokalign departs: the official loss *sums* the per-completion terms over the batch (its autograd backward adds
per-completion gradients); tokalign takes the mean over the B completions (a constant factor, so micro-batches add up
exactly); padding is the completion mask, not a pad-token id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.tempo import completion_tokens, group_rows
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class GTPOConfig:
    conflict_weight: float = 2.0  # W: δ of conflict tokens in positive completions
    entropy_threshold: float = 0.7  # completions with mean entropy above it get A = 0
    entropy_scale: float = 0.1  # A ← A − entropy_scale·H̄ for the others
    scale_rewards: str = "none"  # none (official code) | group | batch
    adv_eps: float = 1e-6
    beta: float = 0.0  # KL coefficient; > 0 loads the reference model
    kl_estimator: str = "k3"

    def __post_init__(self):
        if not self.conflict_weight >= 1:
            raise ValueError(f"conflict_weight must be ≥ 1 (it amplifies shared tokens), got {self.conflict_weight}")
        if not self.entropy_threshold > 0 or self.entropy_scale < 0 or self.beta < 0:
            raise ValueError("entropy_threshold must be > 0, entropy_scale and beta ≥ 0")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        if self.kl_estimator not in ops.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(ops.KL_ESTIMATORS)}, got {self.kl_estimator!r}")


def _run(seq: list[int], shared: set, from_end: bool) -> int:
    """Length of the leading (or trailing) run of ``seq`` whose (position, token) pairs are all in ``shared``."""
    n = 0
    for k, tok in enumerate(reversed(seq) if from_end else seq):
        if (k, tok) not in shared:
            break
        n += 1
    return n


def conflict_delta(tokens: list[list[int]], adv: list[float], weight: float) -> tuple[list[list[float]], list[int]]:
    """δ per token and the number of conflict tokens, for each completion of one group."""
    pos = [s for s, a in zip(tokens, adv) if a > 0]
    neg = [s for s, a in zip(tokens, adv) if a < 0]
    shared = {}
    for from_end in (False, True):
        def keys(seqs):
            return {(k, tok) for s in seqs for k, tok in enumerate(reversed(s) if from_end else s)}
        shared[from_end] = keys(pos) & keys(neg)
    deltas, counts = [], []
    for seq, a in zip(tokens, adv):
        n = len(seq)
        if a == 0 or not pos or not neg:
            deltas.append([1.0] * n)
            counts.append(0)
            continue
        on_run = weight if a > 0 else 0.0
        fwd, bwd = _run(seq, shared[False], False), _run(seq, shared[True], True)
        deltas.append([(on_run if k < fwd else 1.0) * (on_run if k >= n - bwd else 1.0) for k in range(n)])
        counts.append(min(n, fwd + bwd))
    return deltas, counts


class GTPO:
    Config = GTPOConfig

    def __init__(self, config: GTPOConfig):
        self.config = config
        self.needs = Needs(data=("online", "scored"), reference=config.beta > 0, groups=True, split_groups=True)

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c = self.config
        adv = ops.group_advantages(batch.fields["rewards"], batch.fields["group_ids"], c.scale_rewards, c.adv_eps)
        delta = batch.completion_mask.clone()
        conflicts = torch.zeros_like(adv)
        rows, adv_list = completion_tokens(batch), adv.tolist()
        for members in group_rows(batch.fields["group_ids"]).values():
            deltas, counts = conflict_delta([rows[i][0] for i in members], [adv_list[i] for i in members], c.conflict_weight)
            for i, d, n in zip(members, deltas, counts):
                delta[i, rows[i][1]] = torch.tensor(d, dtype=delta.dtype, device=delta.device)
                conflicts[i] = n
        batch.fields.update(advantages=adv, gtpo_delta=delta, gtpo_conflicts=conflicts)
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, mask, lp = self.config, batch.completion_mask, out.logps
        if out.entropy is None:
            raise ValueError("GTPO needs the policy's per-token entropy (PolicyOutput.entropy)")
        mean_ent = ops.masked_mean(out.entropy.detach(), mask, -1)  # [B]
        adv = batch.fields["advantages"]
        kept = mean_ent <= c.entropy_threshold
        adv = torch.where(kept, adv - c.entropy_scale * mean_ent, torch.zeros_like(adv))
        ratio = torch.exp(lp - lp.detach())
        per_token = -ratio * adv.unsqueeze(-1) * batch.fields["gtpo_delta"]
        per_token = per_token / batch.fields["gtpo_conflicts"].clamp(min=1).unsqueeze(-1)
        metrics = {"gtpo/entropy_kept_fraction": float(kept.float().mean()),
                   "gtpo/conflict_tokens": float(batch.fields["gtpo_conflicts"].mean()),
                   "advantage/abs_mean": float(adv.abs().mean())}
        if c.beta > 0:
            kl = ops.kl_penalty(lp, batch.fields["ref_logps"], c.kl_estimator)
            per_token = per_token + c.beta * kl
            metrics["kl"] = float(ops.masked_mean(kl.detach(), mask))
        loss = ops.aggregate(per_token, mask, "seq-mean-token-mean", total_seqs=batch.totals.get("seqs"))
        return LossOutput(loss, metrics)
