"""SALT — "SALT: Step-level Advantage Assignment for Long-horizon Agents via Trajectory Graph", Li, Wang, Yan, Tian, Xu,
Song, Xu & Cheong 2025, arXiv:2510.20022 (Findings of EACL 2026). GRPO whose advantage is refined per step of a
multi-turn episode: the group's trajectories form a graph in which identical steps are one node, and a step's
advantage is the mean outcome advantage of the trajectories through its node. No official code was found; the paper's
method section could not be read here (only its abstract and third-party summaries: "shared" steps are neutral,
"distinct" steps decisive), so the node rule and the averaging below are tokalign's reading, not checked against the
paper's equations or defaults.

Shapes: ``rewards``, ``group_ids``: [B]; ``turn_index``, ``advantages``, ``salt_shared``, ``logps``, ``old_logps``,
``ref_logps``, mask: [B, T] (``advantages`` 0 off the model's tokens).

Steps and nodes (within one group g; tokens are exact ids, ``input_ids[:, 1:]``): a step (i, k) is model turn k of
trajectory i (``turn_index`` = k, completion mask 1); its segment is the completion's tokens after model turn k − 1
up to the end of turn k (the environment's reply, then the turn). Two steps are the same node iff their trajectories
agree on every segment up to and including theirs: the same turn tokens after the same history (the prompt is the
group's). Same turn tokens after another history are another node (assumption: the paper may merge states reached by
different paths; here the graph is the group's prefix tree of steps).

    A_i = GRPO's outcome advantage (R_i − mean_g R) / (std_g R + eps)           (scale_rewards as GRPO)
    N(v) = the trajectories of g whose path goes through node v
    A_{i,t} = mean_{j ∈ N(v(i,k))} A_j   on the tokens t of model turn k;  0 on environment tokens (mask 0)
    loss = GRPO's per-token loss with A_{i,t} (clip ε, optional β·KL, aggregation)

A step every trajectory of the group shares gets mean_g A = 0 (neutral); a step only one trajectory took keeps A_i.
So a group whose trajectories differ from their first step on is GRPO exactly; a single-turn completion is one step
(identical completions share a node). Defaults are GRPO's (the paper's training settings were not checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.steps import episode_turns, graph_step_advantages
from tokalign.algorithms.tempo import group_rows
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class SALTConfig(GRPOConfig):
    pass


class SALT(GRPO):
    Config = SALTConfig
    metric_prefix = "salt"

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        super().prepare(batch)
        batch.fields["advantages"], batch.fields["salt_shared"] = self.node_advantages(batch)
        return batch

    @staticmethod
    def node_advantages(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] per-token advantages (each step: the mean of ``batch.fields["advantages"]``, the per-row outcome
        advantages, over the trajectories through its node) and [B, T] 1 on the tokens of steps shared by several."""
        seq_adv = batch.fields["advantages"].tolist()
        adv = torch.zeros_like(batch.completion_mask)
        shared = torch.zeros_like(batch.completion_mask)
        turns = episode_turns(batch)
        for members in group_rows(batch.fields["group_ids"]).values():
            values, sizes = graph_step_advantages([[seg for _, seg in turns[i]] for i in members], [seq_adv[i] for i in members])
            for i, vals, ns in zip(members, values, sizes):
                for (cols, _), v, n in zip(turns[i], vals, ns):
                    adv[i, cols] = v
                    shared[i, cols] = float(n > 1)
        return adv, shared

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        res = super().loss(batch, out)  # GRPO's surrogate takes the per-token [B, T] advantages as they are
        res.metrics[f"{self.metric_prefix}/shared_token_fraction"] = float(ops.masked_mean(batch.fields["salt_shared"], batch.completion_mask))
        return res
