"""Logits processor ``adaptive_temperature`` — HAPO's Adaptive Temperature Sampling, from "From Uniform to
Heterogeneous: Tailoring Policy Optimization to Every Token's Nature", Liu, Liu, Wen, Cai, Cui, He, Zhang 2025,
arXiv:2509.16591; official code starriver030515/HAPO (``vllm/v1/sample/sampler.py``,
``compute_entropy_based_temperature``; the statistics from ``verl/trainer/ppo/core_algos.py``, ``compute_entropy_h``;
``recipe/train.md``). The rollout half of HAPO: the loss half is ``tokalign.algorithms.hapo`` (``train hapo``), and
the two are used together as ``tokalign train hapo --logits-processor adaptive_temperature``. Each token is sampled at
a temperature that rises with the entropy of its next-token distribution (explore at forks, stay coherent elsewhere).

Shapes: ``logits`` [B, V] (float32, after the processors before this one, before temperature and top-p); per row b
the entropy H_b, the normalised entropy ĥ_b and the temperature T_b: [B].

    H_b  = −Σ_v p_bv log p_bv,   p_b = softmax(logits_b)            (the untempered distribution, as the official)
    ℓ_b  = log H_b,   m = log entropy_pivot,   ℓ_hi = log entropy_high (log log V when 0),   ℓ_lo = log entropy_low
    ĥ_b  = (ℓ_b − m)/(ℓ_hi − m)   if ℓ_b > m,   (ℓ_b − m)/(m − ℓ_lo)   otherwise;   clamped to [−1, 1]
    T_b  = T · (1 + τ · ĥ_b)                                          (the official formula, T = the input temperature)

The official ĥ is the loss's normalised entropy (``tokalign.algorithms.hapo.entropy_h_hat``) with the *previous
training step's* statistics: the ``entropy_pivot``-quantile of log H over its tokens (m), the RMS of ℓ − m (σ), and the
largest and smallest (ℓ − m)/σ; σ cancels, so ĥ maps [min ℓ, m] linearly onto [−1, 0] and [m, max ℓ] onto [0, 1] —
which is the map above with m, ℓ_hi, ℓ_lo as options. A processor sees one step of one batch and keeps no state
(``tokalign.protocols.LogitsProcessor``), so those three statistics are fixed options here, not re-estimated each
training step (departure; before its first step the official samples at T, this one adapts from the first token).

How the engines apply it. ``temperature()`` cannot see the logits, so the per-row temperature is applied in
``__call__`` as a rescaling: with T the base ``temperature`` option, the row's logits are returned times T / T_b =
1 / (1 + τ ĥ_b); the engine then divides by the run's temperature T_run and samples at T_run · (1 + τ ĥ_b). With
T_run = T (set ``temperature`` to the run's ``--temperature``; both default to 1.0, the recipes' rollout temperature)
that is exactly T_b. The factor does not depend on T, so at another run temperature the tokens are sampled at
T_run(1 + τ ĥ_b) — the official formula with T_run as its input temperature; the option only matters at 0:
``temperature=0`` leaves the logits unchanged (the official sampler returns greedy samples before adapting). A
greedy run (``--temperature 0``) takes the argmax of the rescaled logits, which a positive factor per row does not
move (bar exact ties created by rounding); set ``temperature=0`` too to keep its logits bit for bit. A later
processor's per-token ``temperature()`` t multiplies on top (t · (1 + τ ĥ_b)). ``sampler_logps`` are those of the
adapted distribution; the trainer's log-probs stay the model's (``tokalign.decoding``), so use
``algorithm.mismatch_correction`` to correct for the tempering if wanted (the official trains on the old policy's
log-probs at the fixed temperature).

Defaults: τ = 0.05 and T = 1.0 (``temperature_tau=0.05``, ``temperature=1.0`` in every ``recipe/*.sh``; its notes:
lower τ if training collapses, Qwen models being temperature-sensitive). ⚠ unchecked: the three statistics have no
official value (they are measured each step): ``entropy_pivot`` 0.672 nats is the 80th-percentile token entropy of
Qwen3 chain-of-thought reported by Wang et al. 2025 (arXiv:2506.01939), quoted from memory, matching the recipes'
``entropy_pivot=0.8`` quantile; ``entropy_high`` 0 means log V (the uniform distribution's entropy, the largest
possible); ``entropy_low`` 1e-6 is the official sampler's clamp on H. Measure them on your model (the quantile,
max and min of the rollout entropies) for a faithful setting. The paper's own equation was not read offline
(⚠ unchecked); the formula is the official code's.

Departure on the sign: the official ``compute_entropy_h`` divides the negative side by the (negative) minimum, so its
ĥ ≥ 0 for every token and low-entropy tokens are heated too; like ``algorithms/hapo.py`` we follow the paper (low
entropy ⇒ ĥ < 0 ⇒ cooler); ``official_sign=true`` reproduces the code (ĥ = |ĥ|). Limiting case: τ = 0 (or
``temperature=0``) returns the logits unchanged, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AdaptiveTemperatureConfig:
    tau: float = 0.05  # τ: the temperature varies in T·[1 − τ, 1 + τ] (recipes: 0.05; 0 = no change)
    temperature: float = 1.0  # T, the base temperature (recipes: 1.0); set it to the run's --temperature; 0 = no change
    entropy_pivot: float = 0.672  # nats: the entropy sampled at T exactly (ĥ = 0) ⚠ unchecked
    entropy_high: float = 0.0  # nats: entropy at and above which ĥ = +1; 0 = log V (the uniform distribution's)
    entropy_low: float = 1e-6  # nats: entropy at and below which ĥ = −1 (the official clamp on H)
    official_sign: bool = False  # true: ĥ = |ĥ| as the official code (low-entropy tokens heated too)

    def __post_init__(self):
        if not 0 <= self.tau < 1:
            raise ValueError(f"tau must be in [0, 1) (temperatures T·(1 ± τ) must stay > 0), got {self.tau}; the "
                             "recipes use 0.05")
        if not self.temperature >= 0:
            raise ValueError(f"temperature is the base temperature, ≥ 0 (set it to the run's --temperature), got "
                             f"{self.temperature}")
        if not 0 < self.entropy_low < self.entropy_pivot:
            raise ValueError(f"need 0 < entropy_low < entropy_pivot (nats), got entropy_low={self.entropy_low}, "
                             f"entropy_pivot={self.entropy_pivot}")
        if self.entropy_high != 0 and not self.entropy_high > self.entropy_pivot:
            raise ValueError(f"entropy_high must be > entropy_pivot={self.entropy_pivot} nats (or 0 for log V), got "
                             f"{self.entropy_high}")


class AdaptiveTemperature:
    Config = AdaptiveTemperatureConfig

    def __init__(self, config: AdaptiveTemperatureConfig | None = None):
        self.config = config if config is not None else AdaptiveTemperatureConfig()

    def h_hat(self, logits):
        """ĥ [B] in [−1, 1] from logits [B, V] (see the module docstring)."""
        import torch

        from tokalign import ops

        c = self.config
        vocab = logits.shape[-1]
        high = c.entropy_high if c.entropy_high else math.log(vocab)
        m, lo = math.log(c.entropy_pivot), math.log(c.entropy_low)
        hi = math.log(high) if high > c.entropy_pivot else m + 1.0  # V = 1: H = 0, the positive side is never used
        finite = logits.float().clamp(min=torch.finfo(torch.float32).min)  # −inf (banned) → p = 0, no NaN
        ell = ops.entropy_from_logits(finite).clamp(min=1e-30).log()
        h = torch.where(ell > m, (ell - m) / (hi - m), (ell - m) / (m - lo)).clamp(-1.0, 1.0)
        return h.abs() if c.official_sign else h

    def temperatures(self, logits):
        """T_b = T · (1 + τ ĥ_b) [B]: the temperature each row's next token is sampled at."""
        return self.config.temperature * (1.0 + self.config.tau * self.h_hat(logits))

    def __call__(self, logits, prompt_ids, output_ids):
        c = self.config
        if c.tau == 0 or c.temperature == 0:
            return logits
        scale = 1.0 / (1.0 + c.tau * self.h_hat(logits))  # = T / T_b
        logits.mul_(scale.to(logits.dtype)[:, None])
        return logits
