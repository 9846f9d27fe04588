"""PORTool — "PORTool: Tool-Use LLM Training with Rewarded Tree", Wu, Zhu, Zhang, Chatterjee, Zhu, Mo, Luo & Gao
2025, arXiv:2510.26020. GRPO on tool-call rollout trees: a prompt's n episodes share their first steps and fork
(``tokalign.rollout.branching``, strategy ``tree``; PORTool selects it by itself), every step gets a reward from what
its descendants reached and whether its tool calls worked, and a step's advantage blends the trajectory-relative
(GRPO) advantage with a fork-relative one: the step against its siblings under the same fork. No official code was
found and only the abstract and third-party summaries could be read here, so the step reward, the sibling
normalisation and the blend below are tokalign's reading of them, with defaults of ours (not the paper's).

Shapes: ``rewards``, ``group_ids``: [B]; ``turn_index``, ``turn_tool_calls``, ``turn_tool_errors``, ``advantages``,
mask: [B, T]. Steps and nodes as in ``tokalign.algorithms.steps`` (the group's prefix tree of model turns).

    R(v) = max_{i ∈ N(v)} R_i + α·ok(v)       N(v): the trajectories through step v; ok(v) = 1 if v made tool calls
                                             and none failed ("correctness-dominant": α small)
    A_fork(v) = (R(v) − mean_{u ∈ S(v)} R(u)) / (std_{u ∈ S(v)} R(u) + eps)    S(v): v and its siblings (the same
                                             parent step, or the first steps of the group); 0 when v has none;
                                             not divided by the std with scale_rewards = none
    A_traj(i) = GRPO's outcome advantage of trajectory i
    A_{i,t} = (1 − λ)·A_traj(i) + λ·A_fork(v(i, t)) on the tokens of step v; 0 on the environment's tokens
    loss = GRPO's per-token clipped surrogate (ε, optional β·KL, aggregation)

Defaults: λ (``fork_weight``) 0.5, α (``tool_bonus``) 0.1, GRPO's otherwise. Limiting cases: λ = 0 is GRPO exactly;
a group of independent episodes (no shared first step) with α = 0 gives every first step A_fork = A_traj and later
steps (no siblings) A_fork = 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.steps import episode_turns, step_tree
from tokalign.algorithms.tempo import group_rows
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class PORToolConfig(GRPOConfig):
    fork_weight: float = 0.5  # λ
    tool_bonus: float = 0.1  # α

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.fork_weight <= 1.0:
            raise ValueError(f"fork_weight must be in [0, 1], got {self.fork_weight}")
        if self.tool_bonus < 0:
            raise ValueError(f"tool_bonus must be >= 0, got {self.tool_bonus}")


def fork_advantages(step_rewards: list[float], parent: list[int], scale: bool, eps: float) -> list[float]:
    """Per node of a step tree, its fork-relative advantage among the nodes with the same parent."""
    siblings: dict[int, list[int]] = {}
    for v, p in enumerate(parent):
        siblings.setdefault(p, []).append(v)
    out = [0.0] * len(parent)
    for nodes in siblings.values():
        if len(nodes) < 2:
            continue
        vals = [step_rewards[v] for v in nodes]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1))  # unbiased, as GRPO's
        for v, x in zip(nodes, vals):
            out[v] = (x - mean) / (std + eps) if scale else x - mean
    return out


class PORTool(GRPO):
    Config = PORToolConfig

    def __init__(self, config: PORToolConfig):
        super().__init__(config)
        self.needs = dataclasses.replace(self.needs, branching="tree")

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c = self.config
        super().prepare(batch)
        traj = batch.fields["advantages"].tolist()
        rewards = batch.fields["rewards"].tolist()
        calls, errors = batch.fields.get("turn_tool_calls"), batch.fields.get("turn_tool_errors")
        adv = torch.zeros_like(batch.completion_mask)
        fork = torch.zeros_like(batch.completion_mask)
        turns = episode_turns(batch)
        for members in group_rows(batch.fields["group_ids"]).values():
            tree = step_tree([[seg for _, seg in turns[i]] for i in members])
            ok = [0.0] * len(tree.parent)
            for local, i in enumerate(members):
                for (cols, _), v in zip(turns[i], tree.paths[local]):
                    first = int(cols[0])
                    made = calls is not None and float(calls[i, first]) > 0
                    ok[v] = float(made and float(errors[i, first]) == 0)
            step_reward = [max(rewards[members[j]] for j in m) + c.tool_bonus * ok[v] for v, m in enumerate(tree.members)]
            a_fork = fork_advantages(step_reward, tree.parent, c.scale_rewards != "none", c.adv_eps)
            for local, i in enumerate(members):
                for (cols, _), v in zip(turns[i], tree.paths[local]):
                    adv[i, cols] = (1 - c.fork_weight) * traj[i] + c.fork_weight * a_fork[v]
                    fork[i, cols] = a_fork[v]
        batch.fields["advantages"] = adv
        batch.fields["portool_fork_advantage"] = fork
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        res = super().loss(batch, out)
        mask = batch.completion_mask
        res.metrics["portool/fork_advantage_abs_mean"] = float(ops.masked_mean(batch.fields["portool_fork_advantage"].abs(), mask))
        return res
