"""GSPO — "Group Sequence Policy Optimization", Zheng et al. 2025, arXiv:2507.18071. GRPO with one importance
ratio per sequence, the geometric mean of its token ratios, clipped with a very narrow band.

Shapes: ``rewards``, ``group_ids``, ``advantages``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

    log s_i = (1/|y_i|) Σ_t m_t (ℓ_t − ℓ^old_t)                                  [B]
    log s_{i,t} = ℓ_t − sg(ℓ_t) + sg(log s_i)  (token form: value s_i, ∂s_{i,t}/∂ℓ_t = s_i)   [B, T]
    L_t = max(−A_i s_{i,t}, −A_i clip(s_{i,t}, 1−ε_low, 1+ε_high)) (+ β·KL_t)
    loss = aggregate(L, mask, "seq-mean-token-mean")  ⇒  ∂loss/∂ℓ_t = −A_i s_i / (B·|y_i|) while unclipped

Defaults from the paper and verl's ``examples/gspo_trainer``: ε = (3e-4, 4e-4), seq-mean-token-mean, GRPO
advantages, no KL. Equal to TRL's GRPOTrainer with ``importance_sampling_level="sequence"``.

The token form is GRPO's loss with its ``behaviour_logps`` hook returning sg(ℓ_t) − sg(log s_i): then
exp(ℓ_t − ℓ^old'_t) = s_{i,t} exactly, so the clip, KL, aggregation and metrics are GRPO's own code.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class GSPOConfig(GRPOConfig):
    epsilon_low: float = 3e-4
    epsilon_high: float = 4e-4
    aggregation: str = "seq-mean-token-mean"


class GSPO(GRPO):
    Config = GSPOConfig

    def behaviour_logps(self, batch: TokenBatch, out: PolicyOutput):
        lp = out.logps.detach()
        return lp - self._log_s(batch, out).unsqueeze(-1)

    def _log_s(self, batch: TokenBatch, out: PolicyOutput):
        return ops.masked_mean(out.logps.detach() - batch.fields["old_logps"], batch.completion_mask, -1)  # [B]

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        res = super().loss(batch, out)
        res.metrics["seq_ratio/mean"] = float(self._log_s(batch, out).exp().mean())
        return res
