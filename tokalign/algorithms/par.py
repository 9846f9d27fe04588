"""PAR — "Reward Shaping to Mitigate Reward Hacking in RLHF" (Preference As Reward), Fu et al. 2025,
arXiv:2502.18770. The reward model's score is replaced by a bounded, centred one: the sigmoid of its margin over
the scores of reference responses to the same prompt, which stops the policy from chasing ever-larger RM scores.

Shapes: ``rewards``, ``ref_reward_0 … ref_reward_{M−1}`` (scores of M reference-model completions of the same
prompt, sampled and scored by the online source), ``group_ids``: [B].

    r_PAR = (1/M) Σ_m σ(k · (r − r_ref,m))          ∈ (0, 1); r = r_ref ⇒ 0.5; monotone in r
    then GRPO (group advantages of r_PAR, PPO-clip, optional β·KL)

Official code: PorUna-byte/PAR ``trainers/reward_shaper.py`` (``calculate_relative_sigmoid``): k = 1 (sigmoid
temperature), up to 10 reference responses (``--reward_maxref``). The reference responses come from the reference
(SFT) model: tokalign samples ``num_references`` per prompt (default 4, its choice for cost) with the run's sampling
settings, seeded per prompt, and scores them with the run's rewards. The paper applies the shaping with PPO; here it
feeds GRPO's group advantages (the shaping is the method, the estimator a switch of the base).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import TokenBatch
from tokalign.sampling import ReferenceSamples


@dataclass
class PARConfig(GRPOConfig):
    num_references: int = 4
    sigmoid_k: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.num_references < 1:
            raise ValueError(f"num_references must be ≥ 1, got {self.num_references}")
        if self.sigmoid_k <= 0:
            raise ValueError(f"sigmoid_k must be > 0, got {self.sigmoid_k}")


def par_reward(rewards: torch.Tensor, ref_rewards: torch.Tensor, k: float) -> torch.Tensor:
    """[B], [B, M] -> [B]: mean over references of σ(k (r − r_ref))."""
    return torch.sigmoid(k * (rewards.unsqueeze(-1) - ref_rewards)).mean(-1)


class PAR(GRPO):
    Config = PARConfig

    def __init__(self, config: PARConfig):
        super().__init__(config)
        self.needs = dataclasses.replace(self.needs, data=("online",), reference=True,
                                         hooks=(*self.needs.hooks, ReferenceSamples(config.num_references)))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        f = batch.fields
        refs = torch.stack([f[f"ref_reward_{m}"] for m in range(self.config.num_references)], -1)
        f["raw_rewards"] = f["rewards"]
        f["rewards"] = par_reward(f["rewards"], refs, self.config.sigmoid_k)
        return super().prepare(batch)
