"""Constrained RLHF — "Confronting Reward Model Overoptimization with Constrained RLHF", Moskovitz et al. 2023,
arXiv:2310.04373. Official code: tedmoskovitz/ConstrainedRL4LMs ``rl4lms/algorithms/constrained_ppo/constrained_ppo.py``
(``ConstrainedPPO``: ``sigmoid_lagrange``, ``lagrange_lr``, ``constraint_threshold``, the mixed advantages and the
``lagrange_loss`` step). A GRPO-family module here (the paper trains PPO with a value head per component); the policy
loss, clipping, KL and aggregation are GRPO's.

Shapes: ``rewards.<name>`` (one per reward component, ``ComponentRewards`` copies them from the run's ``--reward``s),
``group_ids``, ``rewards``, ``advantages``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

One component is the objective r_0 (``objective``); each constraint component r_k (``constraints``) should stay at or
below its threshold θ_k (its overoptimisation point: past it the proxy RM stops tracking the true reward), the
constraint E[r_k] ≤ θ_k. Multipliers λ_k give the step's reward, then GRPO's group advantage of it:

    sigmoid (default, official sigmoid_lagrange=True):  w_k = σ(λ_k)/K,  w_0 = 1 − Σ_k w_k
                                                         r = w_0 r_0 + Σ_k w_k r_k
        g_k = ∂/∂λ_k [σ(λ_k)(c̄_k − θ_k)] = σ(λ_k)(1 − σ(λ_k))(c̄_k − θ_k)
    linear:  r = r_0 − Σ_k λ_k r_k,   g_k = ∂/∂λ_k [λ_k(θ_k − c̄_k)] = θ_k − c̄_k,   then λ_k ← max(λ_k, 0)

with c̄_k the batch mean of r_k. The components enter unweighted (``--reward NAME*w`` weights only the logged
total ``reward/mean``), and this r replaces ``batch.fields["rewards"]``. Online only (the components come from the
sampling hook). Above its threshold a component's weight falls (sigmoid) or its penalty grows
(linear), pushing E[r_k] back down. After the step's advantages, λ takes one step of SGD with momentum μ on g, whose
norm is first clipped to ``multiplier_max_grad_norm`` (torch's clip_grad_norm_: × c/(‖g‖+1e-6) when that is < 1):

    b ← g (first step), b ← μ b + g (later);   λ ← λ − lr · b

Official defaults: lr 1e-2, μ 0.9, the grad clipped at the policy's max_grad_norm (0.5 in RL4LMs), λ₀ = 0 (σ = ½)
with sigmoid, 0.5 linear. λ and the momentum buffer are the algorithm's state: they resume with the run.

Differences from the official code, on purpose: (1) K constraints (the official code has one; with K = 1 the sigmoid
weights are exactly its 1 − σ(λ), σ(λ)); the 1/K keeps w_0 ≥ 0. (2) The components are mixed as rewards before one
group advantage, where the official code mixes separately normalised per-component GAE advantages; mixing rewards
makes ``multiplier_lr=0`` exactly GRPO on the fixed weighted sum. (3) One multiplier step per training step, from the
batch's rewards (the official steps λ once per PPO minibatch and epoch, from the value targets of the minibatch).
(4) The linear form projects λ ≥ 0 (the paper's dual feasibility; the official linear variant does not).
Logged per step: ``multiplier/<name>`` (the weight this step used: w_k, or λ_k linear), ``lagrange/<name>`` (λ_k
used), ``constraint/<name>_gap`` (c̄_k − θ_k).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch
from tokalign.sampling import ComponentRewards, component_field


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass
class ConstrainedConfig(GRPOConfig):
    objective: str = "exact_match"  # the reward component maximised
    constraints: list[str] = field(default_factory=lambda: ["length"])  # components kept ≤ their thresholds
    thresholds: list[float] = field(default_factory=lambda: [0.0])  # θ_k, one per constraint
    parametrisation: str = "sigmoid"  # sigmoid (weights σ(λ)/K, official default) | linear (penalties λ ≥ 0)
    multiplier_lr: float = 1e-2
    multiplier_momentum: float = 0.9
    multiplier_max_grad_norm: float = 0.5  # 0: no clipping
    initial_multipliers: list[float] | None = None  # λ₀ per constraint; None: 0 (sigmoid) or 0.5 (linear)

    def __post_init__(self):
        super().__post_init__()
        if not self.constraints:
            raise ValueError("constraints must name at least one reward component")
        if len(self.thresholds) != len(self.constraints):
            raise ValueError(f"thresholds needs one θ per constraint ({len(self.constraints)}), got {self.thresholds}")
        if self.objective in self.constraints or len(set(self.constraints)) != len(self.constraints):
            raise ValueError("objective and constraints must be distinct reward components")
        if self.parametrisation not in ("sigmoid", "linear"):
            raise ValueError(f"parametrisation must be sigmoid or linear, got {self.parametrisation!r}")
        if self.multiplier_lr < 0 or not 0 <= self.multiplier_momentum < 1 or self.multiplier_max_grad_norm < 0:
            raise ValueError("multiplier_lr and multiplier_max_grad_norm must be ≥ 0, multiplier_momentum in [0, 1)")
        if self.initial_multipliers is not None and len(self.initial_multipliers) != len(self.constraints):
            raise ValueError(f"initial_multipliers needs one λ per constraint ({len(self.constraints)})")
        if self.parametrisation == "linear" and any(x < 0 for x in self.initial_multipliers or ()):
            raise ValueError("linear multipliers are ≥ 0")


class Constrained(GRPO):
    Config = ConstrainedConfig

    def __init__(self, config: ConstrainedConfig):
        super().__init__(config)
        c = config
        hook = ComponentRewards([c.objective, *c.constraints])
        self.needs = dataclasses.replace(self.needs, data=("online",), hooks=(*self.needs.hooks, hook))
        start = 0.0 if c.parametrisation == "sigmoid" else 0.5
        self.multipliers = [float(x) for x in (c.initial_multipliers or [start] * len(c.constraints))]
        self.momentum: list[float] | None = None  # SGD's buffer, None before the first step
        self.used: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"multipliers": list(self.multipliers), "momentum": None if self.momentum is None else list(self.momentum)}

    def load_state_dict(self, state: dict) -> None:
        self.multipliers = [float(x) for x in state["multipliers"]]
        self.momentum = None if state["momentum"] is None else [float(x) for x in state["momentum"]]

    def weights(self) -> tuple[float, list[float]]:
        """(w_0, [w_k]): the objective's and each constraint's weight under the current multipliers."""
        if self.config.parametrisation == "linear":
            return 1.0, [-lam for lam in self.multipliers]
        ws = [_sigmoid(lam) / len(self.multipliers) for lam in self.multipliers]
        return 1.0 - sum(ws), ws

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f = self.config, batch.fields
        w0, ws = self.weights()
        r = w0 * f[component_field(c.objective)]
        for name, w in zip(c.constraints, ws):
            r = r + w * f[component_field(name)]
        f["rewards"] = r
        batch = super().prepare(batch)
        means = [float(f[component_field(n)].double().mean()) for n in c.constraints]
        self.used = {}
        for name, lam, w, m, theta in zip(c.constraints, self.multipliers, ws, means, c.thresholds):
            self.used[f"multiplier/{name}"] = lam if c.parametrisation == "linear" else w
            self.used[f"lagrange/{name}"] = lam
            self.used[f"constraint/{name}_gap"] = m - theta
        self._step_multipliers(means)
        return batch

    def _step_multipliers(self, means: list[float]) -> None:
        c = self.config
        if c.parametrisation == "sigmoid":
            g = [_sigmoid(lam) * (1 - _sigmoid(lam)) * (m - t) for lam, m, t in zip(self.multipliers, means, c.thresholds)]
        else:
            g = [t - m for m, t in zip(means, c.thresholds)]
        if c.multiplier_max_grad_norm > 0:
            coef = c.multiplier_max_grad_norm / (math.sqrt(sum(x * x for x in g)) + 1e-6)
            g = [x * coef for x in g] if coef < 1 else g
        self.momentum = g if self.momentum is None else [c.multiplier_momentum * b + x for b, x in zip(self.momentum, g)]
        lams = [lam - c.multiplier_lr * b for lam, b in zip(self.multipliers, self.momentum)]
        self.multipliers = [max(lam, 0.0) for lam in lams] if c.parametrisation == "linear" else lams

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        return LossOutput(result.loss, {**result.metrics, **self.used})

