"""T-REG — "T-REG: Preference Optimization with Token-Level Reward Regularization", Zhou et al. 2024,
arXiv:2412.02685 (paper-only: the official repository wzhouad/T-REG was not reachable). DPO plus a regulariser
that steers DPO's implicit token rewards toward token rewards the model generates itself by contrastive prompting.

Shapes: ``logps``, ``ref_logps``, ``better_logps``, ``worse_logps``, mask: [B, T]; pairs as in DPO.

    self-generated token reward: ρ_t = 2 σ(ℓ^better_t − ℓ^worse_t) − 1 ∈ (−1, 1), where ℓ^better / ℓ^worse are the
        reference model's log-probs of the same token after the prompt rewritten to ask for a better / a worse answer
        (contrastive prompting; computed once per batch, no gradient)
    implicit token reward (DPO as token-level Q-learning): r̂_t = β (ℓ_t − ℓ^ref_t)
    L = L_DPO + α · token-mean_{t ∈ y_w ∪ y_l} [ −log σ(ρ_t · r̂_t) ]

What is the paper's and what is tokalign's: the contrastive-prompting source of token rewards and "DPO + α·regulariser
on the implicit token rewards" are the paper's (abstract, §3 headline); the exact squashing of ρ and the logistic
agreement form of the regulariser are tokalign's reading, chosen so that neutral tokens (ρ ≈ 0) get no push and every
token's pull is bounded. Check them against §3 of the paper before relying on numbers; α = 0 is exactly DPO either way.
Defaults: β = 0.1, α = 0.5; the rewrite instructions are configurable (``better_instruction``/``worse_instruction``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.components import PromptVariants
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class TREGConfig(DPOConfig):
    alpha: float = 0.5
    better_instruction: str = "Write the best possible response: helpful, correct and harmless."
    worse_instruction: str = "Write a poor response: unhelpful, incorrect or harmful."

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0:
            raise ValueError(f"alpha must be ≥ 0, got {self.alpha}")
        if self.loss_type != "sigmoid":
            raise ValueError("T-REG regularises the DPO (sigmoid) loss; loss_type must be sigmoid")


def with_instruction(prompt: Any, instruction: str) -> Any:
    """The prompt with ``instruction`` appended to its (last user) text."""
    if isinstance(prompt, str):
        return f"{prompt}\n\n{instruction}"
    messages = [dict(m) for m in prompt]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    messages[last]["content"] = f"{messages[last]['content']}\n\n{instruction}"
    return messages


def self_token_rewards(better_logps: torch.Tensor, worse_logps: torch.Tensor) -> torch.Tensor:
    return 2 * torch.sigmoid(better_logps - worse_logps) - 1


class TREG(DPO):
    Config = TREGConfig

    def __init__(self, config: TREGConfig):
        super().__init__(config)
        variants = PromptVariants(("better", "worse"), self.prompt_variant)
        self.needs = dataclasses.replace(self.needs, components=(*self.needs.components, variants))

    def prompt_variant(self, name: str, prompt: Any) -> Any:
        return with_instruction(prompt, self.config.better_instruction if name == "better" else self.config.worse_instruction)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        f = batch.fields
        f["self_token_rewards"] = self_token_rewards(f["better_logps"], f["worse_logps"]) * batch.completion_mask
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        res = super().loss(batch, out)
        if self.config.alpha == 0:
            return res
        implicit = self.config.beta * (out.logps - batch.fields["ref_logps"])
        reg = batch.aggregate(-F.logsigmoid(batch.fields["self_token_rewards"] * implicit), "token-mean")
        res.metrics["reg"] = float(reg.detach())
        return LossOutput(res.loss + self.config.alpha * reg, res.metrics)
