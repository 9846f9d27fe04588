"""P3O — "Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for LLM Alignment", Wu, Zhu, Liu, Jordan
and Jiao 2023, arXiv:2310.00212. Trajectory-wise policy gradient on the *reward difference* of two responses to the
same prompt, with PPO-style clipping of sequence-level (whole-response) importance ratios: no value model, and the
update is invariant to adding any c(x) to both rewards (only differences enter).

Shapes: ``rewards``, ``group_ids``, ``advantages``: [B] (groups of exactly two rows); ``logps``, ``old_logps``,
``ref_logps``, mask: [B, T].

    Δ_i = R_i − R_j              (j the other response of the prompt; = RLOO's leave-one-out advantage for G = 2)
    log s_i = Σ_t m_t (ℓ_t − ℓ^old_t)                  [B]  sequence ratio π_θ(y_i|x) / π_old(y_i|x), log clamped to ±20
    clip="separate":  L_i = max(−Δ_i s_i, −Δ_i clip(s_i, 1−ε_low, 1+ε_high))
    clip="joint":     L_i = ½ max(−Δ_i r_i, −Δ_i clip(r_i, 1−ε_low, 1+ε_high)),   r_i = s_i / s_j
    loss = Σ_i L_i / B  (+ β·KL_t aggregated with ``aggregation``)

On-policy (s = r = 1) both give ∇loss = −(1/#pairs) Σ_pairs ½ Δ (∇log π(y_1) − ∇log π(y_2)), the paper's pairwise
policy gradient, which is also RLOO's gradient with G = 2 and ``seq-mean-token-sum`` aggregation (tested). The joint
form is written symmetrically (each response of the pair carries half, with its own orientation), so it does not
depend on which response is called y_1.

Groups must have exactly two rows (``--n 2``): other sizes are refused with a UserError rather than paired silently.

Defaults: ε = 0.2 (GRPO's / PPO's; ⚠ unchecked: the paper's ε could not be read offline), ``clip="separate"``,
β = 0 (the paper shapes the reward with a KL to the SFT policy; tokalign's β adds the KL as a loss term, as for RLOO).
⚠ unchecked: the exact placement of the ½ and of the clip in the paper's joint variant (written here from this
project's reference/algorithms.md, which states the pairwise update ½Δ(∇log π(y_1) − ∇log π(y_2)) with separate or
joint clipping; no official code was found). ``mismatch_correction`` can be ``none`` or ``sequence`` (one truncated IS
weight per response on L_i); ``token`` is refused, the loss having no token terms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.rloo import RLOO, RLOOConfig
from tokalign.errors import UserError
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

CLIPS = ("separate", "joint")
LOG_RATIO_LIMIT = 20.0  # exp(±20): a whole-sequence ratio past it is far outside any clip range, and stays finite


@dataclass
class P3OConfig(RLOOConfig):
    clip: str = "separate"  # separate: clip each response's ratio; joint: clip the ratio of the pair's two ratios

    def __post_init__(self):
        super().__post_init__()
        if self.clip not in CLIPS:
            raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {self.clip!r}")
        if self.mismatch_correction == "token":
            raise ValueError("p3o's loss is one term per response: use mismatch_correction=sequence (or none), not token")


class P3O(RLOO):
    Config = P3OConfig

    def __init__(self, config: P3OConfig):
        super().__init__(config)
        # the joint ratio needs the partner's log-ratio inside loss(): keep each pair in one micro-batch
        self.needs = dataclasses.replace(self.needs, split_groups=config.clip == "separate")

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        _, counts = torch.unique(batch.fields["group_ids"], return_counts=True)
        if bool((counts != 2).any()):
            sizes = sorted({int(c) for c in counts})
            raise UserError(f"p3o compares two responses per prompt, but the batch has groups of {sizes} rows: sample "
                            "two per prompt (--n 2, i.e. rollout.n=2), or use rloo/grpo for larger groups")
        return super().prepare(batch)

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        adv = f["advantages"]
        log_s = ops.masked_sum(out.logps - self.behaviour_logps(batch, out), mask, -1)  # [B]
        if c.clip == "joint":
            mean, _ = ops.group_stats(log_s, f["group_ids"])
            log_s, half = log_s - (2 * mean - log_s), 0.5  # log r_i = log s_i − log s_j
        else:
            half = 1.0
        log_s = log_s.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        per_seq, clipped = ops.clipped_surrogate(log_s, torch.zeros_like(log_s), adv, c.epsilon_low, c.epsilon_high)
        if c.mismatch_correction == "sequence" and "sampler_logps" in f and "old_logps" in f:
            # the same weight on each of a row's tokens (0 off the mask): the row's maximum is its weight
            per_seq = per_seq * ops.truncated_is_weights(f["old_logps"], f["sampler_logps"], mask, "sequence", c.mismatch_cap).amax(-1)
        seq_loss = half * per_seq.sum() / float(batch.totals.get("seqs", len(batch)))
        metrics = {"clip_fraction": float(clipped.float().mean()) if len(batch) else 0.0,
                   "p3o/seq_ratio_mean": float(log_s.detach().exp().mean()) if len(batch) else 0.0,
                   "advantage/abs_mean": float(adv.abs().mean()) if len(batch) else 0.0}
        res = self.finish(torch.zeros_like(out.logps.detach()), batch, out, metrics)  # β·KL (when β > 0) and the metrics
        return LossOutput(res.loss + seq_loss, res.metrics)
