"""Single-stream Policy Optimization — "Single-stream Policy Optimization", Xu & Ding 2025, arXiv:2509.13232.
No groups: each prompt keeps a Beta tracker of its success rate, whose mean is the baseline of a single sample;
prompts are drawn with priority to the uncertain ones.

Shapes: ``rewards``, ``prompt_index``, ``advantages``: [B]; ``logps``, ``old_logps``, mask: [B, T].

    p̂ = α / (α + β)                                   (per prompt, before this step's update)
    A = R − p̂,  then  A ← (A − mean_B A) / (std_B A + 1e-8)         (global batch normalisation, unbiased std)
    α ← ρ α + R,   β ← ρ β + (1 − R)                   (after the step, row by row)
    prompt weight ∝ √(p̂ (1 − p̂)) + 0.05                (prioritised prompt sampling, online)
    loss = GRPO's PPO-clip surrogate with A

Official code: verl-project/verl-recipe ``spo/spo_ray_trainer.py`` (advantage block, ``_get_spo_rho``,
N_init = 1/(1 − ρ_min)) and ``spo/config/spo_trainer.yaml``. An unseen prompt starts from the official code's
no-offline-samples prior α = β = 0.5. ρ: the paper adapts it per prompt, ρ = clip(2^{−D/0.06}, 0.875, 0.96) with
D the mean |Δ log-prob| of the prompt's previous sample between then and now; that needs the old sample re-scored
by the current policy, which tokalign does not do yet — here ρ is a constant (the official ``rho.type: constant``),
default 0.96, the value the adaptive rule takes while the policy barely moves. Use ``rollout.n = 1`` for the
single-stream setting; with n > 1 every sample still updates its prompt's tracker. Constant R and ρ drive p̂ to R
and A to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import Needs, TokenBatch
from tokalign.sampling import PrioritisedPrompts

EXPLORATION_EPSILON = 0.05


@dataclass
class SSPOConfig(GRPOConfig):
    rho: float = 0.96
    prior: float = 0.5  # α = β = prior for a prompt seen for the first time
    adv_eps: float = 1e-8
    prioritised_sampling: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")
        if self.prior <= 0:
            raise ValueError(f"prior must be > 0, got {self.prior}")


class SSPO(GRPO):
    Config = SSPOConfig

    def __init__(self, config: SSPOConfig):
        super().__init__(config)
        self.needs = Needs(data=("online", "scored"), reference=config.beta > 0, old_logps=True, hooks=(PrioritisedPrompts(self.prompt_weights),),
                           split_groups=True)
        self.tracker: dict[int, tuple[float, float]] = {}  # prompt_index -> (α, β)

    def state_dict(self) -> dict:
        return {"tracker": {k: list(v) for k, v in self.tracker.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.tracker = {int(k): (float(a), float(b)) for k, (a, b) in state["tracker"].items()}

    def p_hat(self, prompt: int) -> float:
        a, b = self.tracker.get(prompt, (self.config.prior, self.config.prior))
        return a / (a + b)

    def prompt_weights(self, n_prompts: int) -> list[float] | None:
        """Sampling weights of the data's prompts for the online source (None: uniform)."""
        if not self.config.prioritised_sampling:
            return None
        return [(self.p_hat(i) * (1 - self.p_hat(i))) ** 0.5 + EXPLORATION_EPSILON for i in range(n_prompts)]

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f = self.config, batch.fields
        prompts, rewards = f["prompt_index"].tolist(), f["rewards"].double()
        adv = rewards - torch.tensor([self.p_hat(p) for p in prompts], dtype=torch.float64, device=rewards.device)
        if len(adv) > 1:
            adv = (adv - adv.mean()) / (adv.std() + c.adv_eps)
        f["advantages"] = adv.to(f["rewards"].dtype)
        for p, r in zip(prompts, rewards.tolist()):
            a, b = self.tracker.get(p, (c.prior, c.prior))
            self.tracker[p] = (c.rho * a + r, c.rho * b + (1 - r))
        return batch
