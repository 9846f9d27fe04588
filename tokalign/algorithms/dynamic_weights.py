"""Dynamic reward weighting — "Learning to Optimize Multi-Objective Alignment Through Dynamic Reward Weighting",
Lu, Wang, Li, Liu, Yu, Yin, Shi, Zhang, Jiang 2025, arXiv:2509.11452. Official code: yining610/dynamic-reward-weighting
(a verl fork): gradient-based weight optimisation in ``verl/trainer/ppo/ray_trainer_optimization.py`` (the
per-objective gradients from ``compute_gradients`` in ``verl/workers/actor/dp_actor.py``), hypervolume-guided weight
adaptation in ``verl/trainer/ppo/ray_trainer_vanilla.py`` with
``verl/utils/reward_score/dynamic_math/hypervolumn_contribution.py``. A GRPO-family module (the paper also runs
REINFORCE and RLOO): the policy loss, clipping, KL and aggregation are GRPO's.

Shapes: ``rewards.<name>`` (one per objective; ``ComponentRewards`` copies them from the run's ``--reward``s),
``influence.<name>`` (method gradient: the step's s_k on every row, filled by the ``GradientInfluence`` component),
``group_ids``, ``rewards``, ``advantages``: [B]; ``logps``, ``old_logps``, ``ref_logps``, mask: [B, T].

K objectives r_1..r_K (``objectives``: reward components, higher is better) with weights w on the simplex; the step's
reward is r = Σ_k w_k r_k (it replaces ``batch.fields["rewards"]``), then GRPO's group advantage A of it:

    method="gradient" (default): at the step's policy θ, before its update,
        A^(k) = GRPO's group advantage of r_k alone
        g_k   = clip_c(∇_θ L_GRPO(A^(k))), flattened over ``gradient_layers``
                (clip_c: torch's clip_grad_norm_ at c = train.max_grad_norm, the norm over all trainable parameters)
        s_k   = Σ_j ⟨g_k, g_j⟩                        (the row sums of the Gram matrix G = g gᵀ)
        every N = ``weight_update_every`` steps, s̄ the mean of the window's s:
            w ← softmax(log w + η s̄)                  (exponentiated gradient: mirror descent on the simplex)
        and this step's r already uses the new w
    method="hypervolume": w fixed; p = (c̄_1, …, c̄_K) the batch means of the objectives, F the Pareto front of the
        earlier steps' points, z the reference point:
            ΔHV = HV_z(F ∪ {p}) − HV_z(F),   m = a + b · tanh(ΔHV),   A ← m · A,   p joins F when ΔHV > 0
            HV_z(S) = vol {y : z ≤ y ≤ q for some q ∈ S}   (a point not above z in every objective adds nothing)
        z = the first step's p unless ``reference_point`` is set; that first step has m = 1.

A descent step −η g_k on objective k alone changes every L_j by −η ⟨g_j, g_k⟩ to first order, so s_k is how much
objective k's own update helps all objectives together: an objective that has saturated (its group advantages
mostly 0, a small gradient) or that conflicts with the others loses weight, one that still learns and pulls with the
others gains it. The hypervolume variant keeps the ratios of w and scales the whole signal: up to a + b when the
batch pushes the Pareto front of the run so far out, down to a when it does not. The components enter unweighted
(``--reward NAME*w`` weights only the logged total ``reward/mean``). Online only (the components come from the
sampling hook). w, the window's sum of s, its step count, z and F are the algorithm's state: they resume with the run.

Defaults and their source (the official scripts, ``examples/grpo_trainer/run_qwen3-8b_multiobjective_*.sh``):
``initial_weights`` None = uniform 1/K (the official "balanced" preset 0.334/0.333/0.333); ``weight_lr`` η = 0.1 (the
official step is lr_t · s / regularization_factor, actor lr 1e-6 over regularization_factor 1e-5);
``weight_update_every`` 1 (weight_accumulation_steps=1); ``gradient_layers`` [] = every trainable parameter (the
official flattens decoder layers 10–25 of Qwen3-8B's 36); c = train.max_grad_norm (the official actor grad_clip 1.0,
tokalign's default too); ``meta_base`` a = 0.5, ``meta_scale`` b = 1.5, m = 1 on a first step that sets z (the
official ``0.5 + 1.5 * tanh(hv_contribution)``, meta_reward = 1 at the start); ``reference_point`` None = the first
batch's means (the official: the initial model's validation performance).

Limits: ``weight_lr`` = 0 (gradient; no gradient passes run then) or ``meta_base`` = 1, ``meta_scale`` = 0
(hypervolume) is GRPO on the fixed weighted sum Σ_k w_k r_k, bit for bit.

⚠ unchecked: the paper's own text (its method section, equations and hyper-parameters) could not be read offline —
only its abstract and the project page's captions; everything above follows the official code. Whether that code is
the paper's equations is unchecked: e.g. whether the paper's influence drops the self term ⟨g_k, g_k⟩ (the code keeps
the full row sum; a form without the diagonal is commented out there), and whether the paper measures the hypervolume
on validation or on training performance.

Departures, on purpose: (1) hypervolume: m multiplies the advantages, where the official multiplies the rewards —
with GRPO's std-normalised advantage (the official GRPO scripts' setting) a constant factor on the rewards cancels
(up to eps); with ``scale_rewards="none"`` the two agree. (2) hypervolume: p is the training batch's means of the
reward components, where the official evaluates each checkpoint on a validation split after each step, with
per-objective maximise/minimise flags (tokalign's rewards are all maximised). (3) hypervolume: HV counts only the part
above z (the standard definition: the official recursion's 1-D case is not clipped at z, so a point below z in one
objective can subtract), and F keeps only non-dominated points (the same HV, less work; the official keeps every
point that contributed). (4) gradient: η is constant, where the official scales by the actor's current learning rate,
so its weight step follows the warmup/decay schedule. (5) gradient: g_k is the gradient of the whole batch's loss
(micro-batch losses are shares of the batch, through its totals; the official sums the gradients of the micro-batch
mean losses); the Gram matrix and the weights are float64 (the official: float32), s reaches ``prepare`` as a
float32 batch field. (6) Under torchrun with DDP each process computes s from the whole batch and rank 0's is
broadcast; FSDP (sharded gradients) is refused. Cost of the gradient method: one extra forward and K backward passes
per step, and K copies of the trainable parameters' gradients held at once. Note (the official behaviour, kept): with
K = 2 and both gradients clipped to norm c, s_1 = s_2 = c² + ⟨g_1, g_2⟩ and w does not move; it moves where the
gradients' norms differ below c (or one objective has no signal in the batch).
Logged per step: ``weight/<name>`` (the w this step used), ``objective/<name>_mean`` (c̄_k), ``influence/<name>``
(s_k; gradient), ``hypervolume/meta_reward`` (m), ``hypervolume/contribution`` (ΔHV), ``hypervolume/front_size``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.components import Component
from tokalign.errors import UserError
from tokalign.forward import forward
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch
from tokalign.sampling import ComponentRewards, component_field

METHODS = ("gradient", "hypervolume")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def influence_field(name: str) -> str:
    """The batch field holding objective ``name``'s gradient influence s_k (the same value on every row), [B]."""
    return f"influence.{name}"


@dataclass
class DynamicWeightsConfig(GRPOConfig):
    objectives: list[str] = field(default_factory=lambda: ["exact_match", "length"])  # reward components, K ≥ 2
    method: str = "gradient"  # gradient (weights by mirror descent on gradient influence) | hypervolume (meta reward)
    initial_weights: list[float] | None = None  # w₀, positive, summing to 1; None: uniform 1/K
    weight_lr: float = 0.1  # η of the gradient method (official lr 1e-6 / regularization_factor 1e-5); 0: fixed w
    weight_update_every: int = 1  # N: steps whose influences are averaged into one weight update
    gradient_layers: list[int] = field(default_factory=list)  # decoder layers whose gradients form g_k; []: all
    meta_base: float = 0.5  # a of m = a + b·tanh(ΔHV)
    meta_scale: float = 1.5  # b
    reference_point: list[float] | None = None  # z, one value per objective; None: the first batch's means

    def __post_init__(self):
        super().__post_init__()
        k = len(self.objectives)
        if k < 2 or len(set(self.objectives)) != k:
            raise ValueError(f"objectives must name at least two distinct reward components, got {self.objectives}")
        if self.method not in METHODS:
            raise ValueError(f"method must be gradient or hypervolume, got {self.method!r}")
        w = self.initial_weights
        if w is not None and (len(w) != k or not all(math.isfinite(x) and x > 0 for x in w) or abs(sum(w) - 1) > 1e-6):
            raise ValueError(f"initial_weights needs {k} positive weights summing to 1 (one per objective), got {w}")
        if not (math.isfinite(self.weight_lr) and self.weight_lr >= 0):
            raise ValueError(f"weight_lr must be a finite number ≥ 0 (0 keeps the weights fixed), got {self.weight_lr}")
        if self.weight_update_every < 1:
            raise ValueError(f"weight_update_every must be ≥ 1, got {self.weight_update_every}")
        if any(i < 0 for i in self.gradient_layers):
            raise ValueError(f"gradient_layers are decoder layer indices ≥ 0, got {self.gradient_layers}")
        if not all(math.isfinite(x) and x >= 0 for x in (self.meta_base, self.meta_scale)):
            raise ValueError(f"meta_base and meta_scale must be finite numbers ≥ 0, got {self.meta_base}, {self.meta_scale}")
        z = self.reference_point
        if z is not None and (len(z) != k or not all(math.isfinite(x) for x in z)):
            raise ValueError(f"reference_point needs {k} finite values (one per objective), got {z}")


# ---------------------------------------------------------------------------------------------------
# hypervolume (maximisation)


def hypervolume(points: list[list[float]], ref: list[float]) -> float:
    """HV_z: the volume of the region above ``ref`` dominated by ``points`` (each maximised); a point not strictly
    above ``ref`` in every coordinate adds nothing. Slices along the first coordinate, recursing on the rest."""
    pts = [list(p) for p in points if all(x > r for x, r in zip(p, ref))]
    if not pts:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in pts) - ref[0]
    pts.sort(key=lambda p: p[0], reverse=True)
    hv = 0.0
    for i, p in enumerate(pts):
        lower = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        if p[0] > lower:  # the slab lower < y_0 ≤ p_0 is dominated by the points with y_0 ≥ p_0 (those so far)
            hv += (p[0] - lower) * hypervolume([q[1:] for q in pts[:i + 1]], ref[1:])
    return hv


def _weakly_dominates(q: list[float], p: list[float]) -> bool:
    return all(a >= b for a, b in zip(q, p))


def hypervolume_contribution(front: list[list[float]], point: list[float], ref: list[float]) -> float:
    """ΔHV = HV_z(front ∪ {point}) − HV_z(front), exactly 0 when the point adds nothing (below ``ref`` in some
    coordinate, or weakly dominated by a point of the front)."""
    if not all(x > r for x, r in zip(point, ref)) or any(_weakly_dominates(q, point) for q in front):
        return 0.0
    return max(hypervolume(front + [point], ref) - hypervolume(front, ref), 0.0)


# ---------------------------------------------------------------------------------------------------
# gradient influence


def _clip_coef(grads: list[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, c / (‖g‖ + 1e-6)), ‖g‖ over all the tensors; 1 when c = 0."""
    if max_norm <= 0 or not grads:
        return 1.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    return min(1.0, max_norm / (norm + 1e-6))


def gradient_influences(policy, batch: TokenBatch, objectives: list[str], loss_fn, micro_batches, scale_rewards: str,
                        adv_eps: float, max_grad_norm: float, layers: list[int]) -> tuple[list[float], list[list[float]]]:
    """(s, G): each objective's influence s_k = Σ_j ⟨g_k, g_j⟩ and the Gram matrix G, g_k the gradient of
    ``loss_fn(batch with advantages A^(k), out)`` w.r.t. the policy's trainable parameters, summed over
    ``micro_batches(batch)``, clipped at ``max_grad_norm`` and flattened over ``layers`` ([] = all). One forward per
    micro-batch, K backward passes through it; parameters' ``.grad`` stay untouched."""
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    keep = [i for i, (n, _) in enumerate(named) if not layers or ((m := _LAYER.search(n)) and int(m.group(1)) in layers)]
    if not keep:
        raise UserError(f"algorithm.gradient_layers {layers} match none of the policy's trainable parameters")
    f = batch.fields
    adv = {f"_dw_adv.{k}": ops.group_advantages(f[component_field(n)], f["group_ids"], scale_rewards, adv_eps)
           for k, n in enumerate(objectives)}
    work = TokenBatch(batch.input_ids, batch.attention_mask, batch.completion_mask, {**f, **adv}, dict(batch.totals))
    grads = [[torch.zeros_like(p) for p in params] for _ in objectives]
    for mb in micro_batches(work):
        out = forward(policy, mb)
        old = mb.fields["old_logps"] if "old_logps" in mb.fields else out.logps.detach()  # one update per batch: ρ = 1
        for k in range(len(objectives)):
            fields = {**mb.fields, "advantages": mb.fields[f"_dw_adv.{k}"], "old_logps": old}
            loss = loss_fn(TokenBatch(mb.input_ids, mb.attention_mask, mb.completion_mask, fields, mb.totals), out)
            parts = torch.autograd.grad(loss, params, retain_graph=k < len(objectives) - 1, allow_unused=True)
            for acc, g in zip(grads[k], parts):
                if g is not None:
                    acc.add_(g)
    flat = []
    for gk in grads:
        coef = _clip_coef(gk, max_grad_norm)
        flat.append(torch.cat([gk[i].flatten() for i in keep]).double() * coef)
    g = torch.stack(flat)
    gram = g @ g.T
    return gram.sum(-1).tolist(), gram.tolist()


class GradientInfluence(Component):
    """Fills ``influence.<name>`` [B] (DynamicWeights' gradient method): each objective's s_k at the step's policy."""

    name = "gradient_influence"

    def __init__(self, algorithm: DynamicWeights):
        self.algorithm = algorithm
        self.provides = tuple(influence_field(n) for n in algorithm.config.objectives)

    def setup(self, ctx) -> None:
        import torch.distributed as tdist

        if ctx.cfg.train.distributed == "fsdp" and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            raise UserError("dynamic_weights' gradient method needs whole gradients: use train.distributed=ddp, not fsdp")

    def fill(self, batch: TokenBatch, ctx) -> dict[str, float]:
        import torch.distributed as tdist

        c = self.algorithm.config
        s, _ = gradient_influences(ctx.policy, batch, c.objectives, self.algorithm.objective_loss, ctx.micro_batches,
                                   c.scale_rewards, c.adv_eps, ctx.cfg.train.max_grad_norm, c.gradient_layers)
        values = torch.tensor(s, dtype=torch.float32, device=batch.input_ids.device)
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.broadcast(values, 0)  # every process steps the same weights
        for n, v in zip(c.objectives, values):
            batch.fields[influence_field(n)] = v.expand(len(batch)).clone()
        return {}


# ---------------------------------------------------------------------------------------------------
# the algorithm


class DynamicWeights(GRPO):
    Config = DynamicWeightsConfig

    def __init__(self, config: DynamicWeightsConfig):
        super().__init__(config)
        c = config
        k = len(c.objectives)
        hooks = (*self.needs.hooks, ComponentRewards(c.objectives))
        comps = (*self.needs.components, GradientInfluence(self)) if c.method == "gradient" and c.weight_lr > 0 else self.needs.components
        self.needs = dataclasses.replace(self.needs, data=("online",), hooks=hooks, components=comps)
        self.weights = [float(x) for x in (c.initial_weights or [1.0 / k] * k)]
        self.influence_sum = [0.0] * k  # Σ s over the current window of weight_update_every steps
        self.steps = 0  # gradient steps seen (the window's position)
        self.reference: list[float] | None = None if c.reference_point is None else [float(x) for x in c.reference_point]
        self.front: list[list[float]] = []  # the non-dominated points of the earlier steps
        self.used: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"weights": list(self.weights), "influence_sum": list(self.influence_sum), "steps": self.steps,
                "reference": None if self.reference is None else list(self.reference),
                "front": [list(p) for p in self.front]}

    def load_state_dict(self, state: dict) -> None:
        self.weights = [float(x) for x in state["weights"]]
        self.influence_sum = [float(x) for x in state["influence_sum"]]
        self.steps = int(state["steps"])
        self.reference = None if state["reference"] is None else [float(x) for x in state["reference"]]
        self.front = [[float(x) for x in p] for p in state["front"]]

    def objective_loss(self, batch: TokenBatch, out: PolicyOutput) -> torch.Tensor:
        """GRPO's loss (surrogate, KL, aggregation) on ``batch``'s advantages: what each g_k differentiates."""
        return GRPO.loss(self, batch, out).loss

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f = self.config, batch.fields
        used: dict[str, float] = {}
        if c.method == "gradient" and c.weight_lr > 0:
            s = self._step_weights(batch)
            used.update({f"influence/{n}": v for n, v in zip(c.objectives, s)})
        r = self.weights[0] * f[component_field(c.objectives[0])]
        for name, w in zip(c.objectives[1:], self.weights[1:]):
            r = r + w * f[component_field(name)]
        f["rewards"] = r
        batch = super().prepare(batch)
        means = [float(f[component_field(n)].double().mean()) for n in c.objectives]
        if c.method == "hypervolume":
            meta, delta = self._step_front(means)
            if meta != 1.0:
                f["advantages"] = f["advantages"] * meta
            used.update({"hypervolume/meta_reward": meta, "hypervolume/contribution": delta,
                         "hypervolume/front_size": float(len(self.front))})
        used.update({f"weight/{n}": w for n, w in zip(c.objectives, self.weights)})
        used.update({f"objective/{n}_mean": m for n, m in zip(c.objectives, means)})
        self.used = used
        return batch

    def _step_weights(self, batch: TokenBatch) -> list[float]:
        """Adds the step's s to the window; at its end, w ← softmax(log w + η s̄). Returns s."""
        c, f = self.config, batch.fields
        missing = [n for n in c.objectives if influence_field(n) not in f]
        if missing:
            raise ValueError(f"the batch has no {influence_field(missing[0])!r} field (the GradientInfluence component fills it)")
        s = [float(f[influence_field(n)][0]) for n in c.objectives]
        self.influence_sum = [a + b for a, b in zip(self.influence_sum, s)]
        self.steps += 1
        if self.steps % c.weight_update_every == 0:
            logits = [math.log(w) + c.weight_lr * total / c.weight_update_every for w, total in zip(self.weights, self.influence_sum)]
            top = max(logits)
            e = [math.exp(x - top) for x in logits]
            self.weights = [x / sum(e) for x in e]
            self.influence_sum = [0.0] * len(s)
        return s

    def _step_front(self, point: list[float]) -> tuple[float, float]:
        """(m, ΔHV) of the batch's point against the front so far; the point joins the front when it adds volume."""
        c = self.config
        if self.reference is None:  # the first batch is the reference point: nothing to compare with yet
            self.reference = list(point)
            return 1.0, 0.0
        delta = hypervolume_contribution(self.front, point, self.reference)
        if delta > 0:
            self.front = [q for q in self.front if not _weakly_dominates(point, q)] + [list(point)]
        return c.meta_base + c.meta_scale * math.tanh(delta), delta

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        result = super().loss(batch, out)
        return LossOutput(result.loss, {**result.metrics, **self.used})
