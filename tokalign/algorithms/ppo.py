"""PPO in its RLHF form — "Proximal Policy Optimization Algorithms", Schulman et al. 2017,
arXiv:1707.06347, as used for LMs in "Training language models to follow instructions with human
feedback", Ouyang et al. 2022, arXiv:2203.02155: a critic (here a value head on the policy's
trunk), per-token KL in the reward, GAE, clipped policy and value losses.

Shapes: ``rewards``: [B]; ``logps``, ``old_logps``, ``ref_logps``, ``old_values``, ``values``,
``token_rewards``, mask: [B, T].

    r_t = −β·k1_t + token_rewards_t + 1[t = last]·(R − Σ token_rewards)   (token_rewards: the scored artifact's
                                                              per-token rewards, whose sum is part of R)
    δ_t = r_t + γ V_{t+1} − V_t,   A_t = Σ_k (γλ)^k δ_{t+k},   returns G_t = A_t + V_t;  A whitened over the batch
    L^π_t = max(−A ρ, −A clip(ρ, 1−ε, 1+ε)), dual clip min(·, −c·A) where A < 0
    L^V_t = ½ max((V_t − G_t)², (clip(V_t, V^old_t ± ε_v) − G_t)²)
    loss = aggregate(L^π) + vf_coef · aggregate(L^V)

Defaults: TRL's PPO (kl_coef 0.05, vf_coef 0.1, cliprange 0.2, cliprange_value 0.2, γ 1, λ 0.95,
whitened advantages) with verl's dual clip c = 3. Test: γ = λ = 1, V = 0, no KL, no whitening
⇒ A_t = R at every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.components import ValueHead
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch


@dataclass
class PPOConfig:
    kl_coef: float = 0.05  # β of the per-token k1 penalty in the reward; > 0 loads the reference model
    vf_coef: float = 0.1
    epsilon: float = 0.2
    epsilon_value: float = 0.2
    dual_clip: float = 3.0  # c; 0 disables it
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    aggregation: str = "token-mean"

    def __post_init__(self):
        if self.aggregation not in ops.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(ops.AGGREGATIONS)}, got {self.aggregation!r}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("gamma and lam must be in [0, 1]")
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or 0 to disable), got {self.dual_clip}")


class PPO:
    Config = PPOConfig

    def __init__(self, config: PPOConfig):
        self.config = config
        # the critic's values (and the old log-probs with them) before the update, for GAE
        self.needs = Needs(data=("online", "scored"), reference=config.kl_coef > 0, old_logps=True, components=(ValueHead(),),
                           split_groups=True)

    def outcome(self, rewards: torch.Tensor) -> torch.Tensor:
        """The sequence reward placed on each row's last token; variants (RTO) clamp it."""
        return rewards

    def dense_reward(self, batch: TokenBatch):
        """Extra per-token rewards [B, T] from the algorithm itself (RTO's DPO reward); none in PPO."""
        return 0.0

    def discounts(self, batch: TokenBatch) -> float | torch.Tensor:
        """γ of GAE: a float, or per token [B, T] (POAD: 1 inside an action, γ between actions)."""
        return self.config.gamma

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        token_reward = ops.placed_rewards(self.outcome(f["rewards"]), mask, f.get("token_rewards")) + self.dense_reward(batch) * mask
        if c.kl_coef > 0:
            token_reward = token_reward - c.kl_coef * ops.kl_penalty(f["old_logps"], f["ref_logps"], "k1") * mask
        advantages, returns = ops.gae(token_reward, f["old_values"], mask, self.discounts(batch), c.lam)
        if c.whiten_advantages:
            advantages = ops.masked_whiten(advantages, mask) * mask
        f["advantages"], f["returns"] = advantages, returns
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, f, mask, t = self.config, batch.fields, batch.completion_mask, batch.totals
        adv = f["advantages"]
        if c.dual_clip:
            pg, clipped, _ = ops.dual_clip_surrogate(out.logps, f["old_logps"], adv, c.epsilon, c.epsilon, c.dual_clip)
        else:
            pg, clipped = ops.clipped_surrogate(out.logps, f["old_logps"], adv, c.epsilon, c.epsilon)
        v_clipped = f["old_values"] + (out.values - f["old_values"]).clamp(-c.epsilon_value, c.epsilon_value)
        vf = 0.5 * torch.maximum((out.values - f["returns"]).square(), (v_clipped - f["returns"]).square())
        agg = dict(total_tokens=t.get("tokens"), total_seqs=t.get("seqs"), max_len=t.get("max_completion_len"))
        pg_loss = ops.aggregate(pg, mask, c.aggregation, **agg)
        vf_loss = ops.aggregate(vf, mask, c.aggregation, **agg)
        # the loop averages metrics over micro-batches by their share of the rows; these two are already this
        # micro-batch's share of the batch's loss, so they are scaled up to whole-batch values first
        share = len(batch) / t["seqs"] if t.get("seqs") else 1.0
        metrics = {"pg_loss": float(pg_loss.detach()) / share, "vf_loss": float(vf_loss.detach()) / share,
                   "clip_fraction": float(ops.masked_mean(clipped.float(), mask)),
                   "values/mean": float(ops.masked_mean(out.values.detach(), mask)),
                   "returns/mean": float(ops.masked_mean(f["returns"], mask))}
        return LossOutput(pg_loss + c.vf_coef * vf_loss, metrics)
