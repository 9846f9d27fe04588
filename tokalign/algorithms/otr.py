"""OTR — "One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy Gradient", Ming, Wu, Hu, He & Yu 2025,
arXiv:2509.26313. SFT data read as one-step RL: at every position of a gold (prompt, completion) row the policy
"rolls out" one token K times, each candidate is rewarded by whether it is the gold token, and a REINFORCE gradient is
taken over the candidates — an on-policy signal at the token level, without generating whole sequences.

Shapes: ``logits`` z: [B, T, V] (the policy's, with grad; ``Needs.full_vocab``); ``logps`` ℓ(y_t) (the gold token's),
gold ids y, mask, ``train_step``: [B, T] / [B]; candidates a: [B, T, K].

    q_t      = softmax(sg(z_t) / τ)                                    the sampling distribution at temperature τ
    a_{t,k}  ~ q_t, k = 1..K  (inverse CDF on seeded uniforms)          candidates, no grad
    r(a)     = 1 if a = y_t, else −β                                    match reward; β ≥ 0 penalises wrong candidates
    L_t      = −(1/K) Σ_k r(a_{t,k}) · log π_θ(a_{t,k} | s_t)           estimator "sample" (the paper's Monte Carlo form)
    L_t      = −Σ_a q_t(a) r(a) log π_θ(a | s_t)                        estimator "expected" (its K → ∞ limit, exact)
             = −[(1 + β) q_t(y_t) ℓ(y_t) − β Σ_a q_t(a) log π_θ(a | s_t)]
    loss     = aggregate(L, mask, aggregation)                          (token-mean, as ``sft``)

log π_θ(a | s_t) is taken as z_a − z_y + ℓ(y): the gold log-prob the forward already computed carries the
log-sum-exp, so the candidates cost one gather over the logits, not a second vocabulary-sized softmax; Σ_a q log π
is −KL(q ‖ π_θ) − H(q) through ``ops.position_kl`` (chunked) and ``ops.entropy_from_logits``.

Limits (tested): the "sample" loss is exactly the "expected" one under the empirical distribution of its candidates,
and tends to it as K grows; with β = 0 and τ = 1 the "expected" gradient is sg(π_θ(y_t)) times SFT's per-token
gradient −∇ℓ(y_t) (SFT's gradient reweighted by the gold token's probability: the match reward's policy gradient).
Plain SFT is the reward 1[a = y]/π_θ(y) — an importance-weighted match, not the paper's reward.

Seeding: a row's uniforms come from a generator seeded by (``seed``, the train step — from the ``TrainStep`` component —,
a CRC of the row's token ids), so the candidates do not depend on how the batch is split into micro-batches or
processes, and a resumed run draws what the uninterrupted one would.

Defaults: K = 8, τ = 1.0, β = 0.1, estimator "sample", token-mean. ⚠ unchecked: only the abstract and third-party
summaries of the paper could be read offline (no official code found); they give the per-position K-candidate rollout,
the match reward from the gold token and a term penalising wrong sampled candidates, and name a temperature. The
exact reward for wrong candidates (−β here), the defaults K, τ, β, whether the gold token's own SFT term is added
and the normalisation (1/K, token-mean) are tokalign's reading.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.components.train_step import TrainStep, step_of
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch

ESTIMATORS = ("sample", "expected")


@dataclass
class OTRConfig:
    num_candidates: int = 8  # K: tokens rolled out at each position
    temperature: float = 1.0  # τ of the sampling distribution q = softmax(z / τ)
    penalty: float = 0.1  # β: a wrong candidate's reward is −β (0: only matches count)
    estimator: str = "sample"  # sample (K candidates) | expected (the exact expectation over q)
    aggregation: str = "token-mean"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.num_candidates, bool) or not isinstance(self.num_candidates, int) or self.num_candidates < 1:
            raise ValueError(f"num_candidates must be a whole number ≥ 1 (K candidate tokens per position), got "
                             f"{self.num_candidates!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (1 = the policy's own distribution), got {self.temperature}")
        if self.penalty < 0:
            raise ValueError(f"penalty must be ≥ 0 (a wrong candidate's reward is −penalty), got {self.penalty}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.aggregation not in ops.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(ops.AGGREGATIONS)}, got {self.aggregation!r}")


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [n, K] drawn from ``probs`` [n, V] by uniforms ``u`` [n, K] in [0, 1): the first a with
    Σ_{j ≤ a} p_j > u (so a zero-probability token is never drawn)."""
    cdf = probs.float().cumsum(-1)
    return torch.searchsorted(cdf, u.to(cdf.dtype).contiguous(), right=True).clamp(max=probs.shape[-1] - 1)


def row_seed(seed: int, step: int, ids: torch.Tensor) -> int:
    """The generator seed of one row: from the run's seed, the step and the row's real token ids."""
    crc = zlib.crc32(ids.to(torch.int64).cpu().numpy().tobytes())
    return (seed * 1_000_003 + step * 7_919 + crc) % (2**63 - 1)


@torch.no_grad()
def candidates(logits: torch.Tensor, batch: TokenBatch, k: int, temperature: float, seed: int, step: int) -> torch.Tensor:
    """K candidate tokens [B, T, K] at each completion position, drawn from softmax(logits / τ); the gold token
    elsewhere (those positions carry no loss). Row by row, each with its own seeded generator."""
    gold = batch.input_ids[:, 1:]
    out = gold.unsqueeze(-1).repeat(1, 1, k)
    mask = batch.completion_mask > 0
    for r in range(len(batch)):
        pos = mask[r].nonzero().squeeze(-1)
        if not len(pos):
            continue
        g = torch.Generator().manual_seed(row_seed(seed, step, batch.input_ids[r][batch.attention_mask[r].bool()]))
        u = torch.rand(len(pos), k, generator=g).to(logits.device)
        probs = torch.softmax(logits[r, pos].float() / temperature, -1)
        out[r, pos] = inverse_cdf(probs, u)
    return out


def sampled_token_loss(logits: torch.Tensor, gold_logps: torch.Tensor, gold: torch.Tensor, cands: torch.Tensor,
                       penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L_t = −(1/K) Σ_k r(a_k) log π(a_k) [B, T] and the candidates' match indicator [B, T, K]."""
    picked = logits.gather(-1, torch.cat([gold.unsqueeze(-1), cands], -1)).float()  # one gather: one gradient buffer
    cand_logps = picked[..., 1:] - picked[..., :1] + gold_logps.unsqueeze(-1)
    hit = cands == gold.unsqueeze(-1)
    reward = torch.where(hit, 1.0, -penalty)
    return -(reward * cand_logps).mean(-1), hit


def expected_token_loss(logits: torch.Tensor, gold_logps: torch.Tensor, gold: torch.Tensor, temperature: float,
                        penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L_t = −[(1 + β) q(y) ℓ(y) − β Σ_a q(a) log π(a)] [B, T] and q(y) [B, T] (no grad)."""
    scaled = logits.detach().float() / temperature
    q_gold = ops.selective_log_softmax(scaled, gold).exp()
    loss = -(1 + penalty) * q_gold * gold_logps
    if penalty:
        # Σ_a q log π = −KL(q ‖ π) − H(q): the cross term through the chunked full-vocabulary KL
        cross = -ops.position_kl(scaled, logits) - ops.entropy_from_logits(scaled)
        loss = loss + penalty * cross
    return loss, q_gold


class OTR:
    Config = OTRConfig

    def __init__(self, config: OTRConfig):
        self.config = config
        self.needs = Needs(data=("completions",), full_vocab=True)
        if config.estimator == "sample":  # the step seeds the candidates
            self.needs = dataclasses.replace(self.needs, components=(TrainStep(),))

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, mask = self.config, batch.completion_mask
        if out.logits is None:
            raise ValueError("OTR needs the policy's full-vocabulary logits (PolicyOutput.logits, Needs.full_vocab)")
        gold = batch.input_ids[:, 1:]
        if c.estimator == "sample":
            cands = candidates(out.logits, batch, c.num_candidates, c.temperature, c.seed, step_of(batch))
            per_token, hit = sampled_token_loss(out.logits, out.logps, gold, cands, c.penalty)
            metrics = {"otr/hit_rate": float(ops.masked_mean(hit.float().mean(-1), mask))}
        else:
            per_token, q_gold = expected_token_loss(out.logits, out.logps, gold, c.temperature, c.penalty)
            metrics = {"otr/gold_prob": float(ops.masked_mean(q_gold, mask))}
        metrics["otr/nll"] = float(ops.masked_mean(-out.logps.detach(), mask))
        return LossOutput(batch.aggregate(per_token, c.aggregation), metrics)
