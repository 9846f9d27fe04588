"""ARPO — "Agentic Reinforced Policy Optimization", Dong, Mao, Chen, Li, Jiang, Zhou, Dou et al. 2025,
arXiv:2507.19849 (ICLR 2026); official code RUC-NLPIR/ARPO (verl). GRPO on multi-turn tool episodes sampled by an
entropy-based adaptive rollout: a prompt's n episodes start as ``initial`` of them and fork after tool calls, more
often where the model's entropy rose since its first turn (``tokalign.rollout.branching``, strategy ``entropy``: the
forking rule, its defaults and where tokalign reads the code differently are written there). ARPO selects that
rollout by itself (``rollout.branching`` empty); ``--branching none`` samples independent episodes.

Advantage attribution on the shared prefixes of a group's tree (shapes: ``rewards``, ``group_ids``: [B]; per-token
fields, mask: [B, T]):

    A_i = GRPO's outcome advantage (R_i − mean_g R) / (std_g R + eps)
    soft (default):  A_{i,t} = A_i on every token of trajectory i — a step shared by trajectories j ∈ N(v) is in the
                     loss once per trajectory, so its gradient carries Σ_j A_j (the paper's "soft" setting; the
                     official scripts run verl's plain GRPO estimator: algorithm.adv_estimator=grpo)
    hard:            A_{i,t} = mean_{j ∈ N(v)} A_j on the tokens of step v (shared steps get the mean advantage of the
                     trajectories through them; SALT's node rule, tokalign.algorithms.steps)
    loss = GRPO's per-token clipped surrogate (ε 0.2, β·KL with β = 0 as in the official scripts, aggregation)

Limiting cases: without forks (``initial`` = n) the rollout is plain independent episodes and ARPO is GRPO exactly;
with ``hard`` on trees without shared steps it is GRPO too. Metric ``arpo/shared_token_fraction``: the share of
model tokens in steps more than one trajectory went through.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign.algorithms.grpo import GRPO
from tokalign.algorithms.salt import SALT, SALTConfig
from tokalign.protocols import TokenBatch


@dataclass
class ARPOConfig(SALTConfig):
    attribution: str = "soft"  # soft | hard

    def __post_init__(self):
        super().__post_init__()
        if self.attribution not in ("soft", "hard"):
            raise ValueError(f"attribution must be soft or hard, got {self.attribution!r}")


class ARPO(SALT):
    Config = ARPOConfig
    metric_prefix = "arpo"

    def __init__(self, config: ARPOConfig):
        super().__init__(config)
        self.needs = dataclasses.replace(self.needs, branching="entropy")

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        GRPO.prepare(self, batch)  # the per-row outcome advantages
        node_adv, batch.fields["salt_shared"] = self.node_advantages(batch)  # and the shared-step mask, for the metric
        if self.config.attribution == "hard":
            batch.fields["advantages"] = node_adv
        return batch
