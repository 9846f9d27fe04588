"""THOR — "THOR: Tool-Integrated Hierarchical Optimization via RL for Mathematical Reasoning", Chang, Zhang, Hu, Ma, Pan,
Zhang, Du, Liu & Gao 2025, arXiv:2509.13761. Hierarchical RL for tool-integrated reasoning: a trajectory-level GRPO
on the final answer's correctness plus a step-level GRPO on whether each code (tool) call executed, summed
(L = L_traj + L_step, the paper's Eq. 9), each with an NLL term on positive-advantage tokens.

Shapes: ``rewards``, ``group_ids``, ``thor_kept``, ``thor_nll_tokens``: [B]; ``turn_index``, ``turn_tool_calls``,
``turn_tool_errors`` (tokalign.rows.episode_token_fields), ``advantages``, ``thor_step_adv``, ``thor_nll_weight``,
``logps``, ``old_logps``, mask: [B, T] (0 off the model's tokens).

    kept_i = no tool call of trajectory i failed (filter_failed; else 1); a group keeps none when fewer than
             ⌈min_kept_fraction·G⌉ of its trajectories are kept
    A_i = GRPO advantage of R_i among the kept trajectories of its group; 0 for the others        (trajectory level)
    r'_{i,k} = (calls − failed calls)/calls of model turn k, for the turns that made tool calls
    A'_{i,k} = (r' − mean r')/(std r' + eps) over the step group: the tool-call turns of one prompt's group
               (step_group="prompt") or those of it at the same turn index ("turn")           (step level)
    A_{i,t} = A_i + w·A'_{i,k(t)} on the tokens of model turn k (w = step_weight; no A' on turns without a call);
              0 on environment tokens (mask 0)
    L = GRPO's per-token clipped loss with A_{i,t} (token-mean) + α·L_NLL,
    L_NLL = −Σ_t n_t ℓ_t / Σ_t n_t,   n_t = 1[A_i > 1e-7] + 1[w > 0]·1[A'_{i,k(t)} > 1e-7] on model tokens

Defaults (paper §E.2 and the official run script): ε_low 0.2, ε_high 0.28, β = 0 (no KL), α = 0.01, token-mean
(verl's ``loss_agg_mode``; the paper's Eq. 4 writes a per-sequence mean), w = 1, filter on with ratio 0.5. Groups of
equal rewards give A = 0 already; the official dynamic filtering of them is left off (``dapo``'s hook would also drop
the step-level signal of those groups). Without tool calls, or with w = 0 and the filter off, and α = 0, THOR is
GRPO with ε_high 0.28 exactly.

Checked against the official code, JingMog/THOR @eeabad0, and the paper PDF there (``THOR.pdf`` @19b970c, §2.3.2):
the trajectory level is GRPO (verl ``compute_grpo_outcome_advantage``, unbiased std, eps 1e-6) on the verifier's
reward after ``filter_code`` drops every trajectory whose ``execution_passes`` (mean of its code blocks' passes) is
not 1 and ``filter_ratio`` = 0.5 drops a prompt with fewer than ⌈0.5·G⌉ kept (``vllm_rollout_spmd.py``); the NLL is
``grpo_select_alpha``·(−Σ m·ℓ / Σ m) over tokens with advantage > 1e-7 (``dp_actor.py``, 0.01 in ``run_code_grpo.sh``);
the step reward of a call is 1 if the sandbox ran it (return code 0, some stdout), else 0 (here: 0 when the
environment counted it in the turn's ``tool_errors``, e.g. a tool result starting ``error:``).
Where tokalign departs: the official step level (``pass_rate_optimization``) *resamples*: for each failed step it cuts
the turn back to its prefix minus L_suf tokens (``del_last_token_num``, 100 in the script), draws G' = 16 new
reasoning suffixes and calls, rewards each by whether its call runs and GRPO-normalises within those G', training
only the regenerated tokens. tokalign's algorithms cannot draw such mid-turn multi-turn samples (sampling hooks
sample single-turn), so the step group here is the tool-call turns the group already holds, and A' is added on the
whole turn (its reasoning and its call). The official rollout also stops an episode at its first failed call, and
filters by length and a well-formed boxed answer (task specifics, not done here). Self-correction during inference
(on a failed call, backtrack L_suf tokens and regenerate up to N_corr = 4 times) is an eval-time sampling procedure
of the episode engine, not part of a training loss: out of scope of this module and not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.steps import episode_turns
from tokalign.algorithms.tempo import group_rows
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch

POSITIVE = 1e-7  # the official NLL's "positive advantage" threshold


@dataclass
class THORConfig(GRPOConfig):
    epsilon_high: float = 0.28
    step_weight: float = 1.0  # w: weight of the step-level advantage (1 = L_traj + L_step); 0 = trajectory level only
    nll_alpha: float = 0.01  # α of the NLL term on positive-advantage tokens; 0 = none
    filter_failed: bool = True  # trajectories with a failed tool call get no trajectory-level advantage
    min_kept_fraction: float = 0.5  # a group with fewer than ⌈this·G⌉ trajectories passing the filter keeps none
    step_group: str = "prompt"  # prompt: a group's tool-call turns are one step group | turn: per turn index too

    def __post_init__(self):
        super().__post_init__()
        if self.step_weight < 0 or self.nll_alpha < 0:
            raise ValueError("step_weight and nll_alpha must be ≥ 0")
        if not 0 <= self.min_kept_fraction <= 1:
            raise ValueError(f"min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")
        if self.step_group not in ("prompt", "turn"):
            raise ValueError(f"step_group must be prompt or turn, got {self.step_group!r}")


def tool_turns(batch: TokenBatch) -> list[list[tuple[int, torch.Tensor, float]]]:
    """Per row, its model turns that made tool calls: (turn number, the turn's columns, the fraction of its calls that
    ran). Rows without the episode's tool fields have none."""
    f = batch.fields
    if "turn_tool_calls" not in f:
        return [[] for _ in range(len(batch))]
    calls, errors = f["turn_tool_calls"].tolist(), f["turn_tool_errors"].tolist()
    out = []
    for i, turns in enumerate(episode_turns(batch)):
        row = []
        for k, (cols, _) in enumerate(turns):
            c = int(cols[0])
            if calls[i][c] > 0:
                row.append((k, cols, (calls[i][c] - errors[i][c]) / calls[i][c]))
        out.append(row)
    return out


class THOR(GRPO):
    Config = THORConfig

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        rewards, gids = f["rewards"], f["group_ids"]
        steps = tool_turns(batch)

        kept = torch.tensor([not (c.filter_failed and any(p < 1 for _, _, p in row)) for row in steps], dtype=torch.bool)
        for members in group_rows(gids).values():
            if int(kept[members].sum()) < math.ceil(c.min_kept_fraction * len(members)):
                kept[members] = False
        traj = torch.zeros_like(rewards)
        idx = kept.nonzero().squeeze(-1)
        if len(idx):
            traj[idx] = ops.group_advantages(rewards[idx], gids[idx], c.scale_rewards, c.adv_eps)

        step_tok = torch.zeros_like(mask)
        items = [(i, k, cols, p) for i, row in enumerate(steps) for k, cols, p in row]
        if items:
            keys: dict[tuple, int] = {}
            g = [keys.setdefault((int(gids[i]), k) if c.step_group == "turn" else (int(gids[i]),), len(keys))
                 for i, k, _, _ in items]
            step_adv = ops.group_advantages(torch.tensor([p for *_, p in items], dtype=rewards.dtype), torch.tensor(g),
                                            c.scale_rewards, c.adv_eps)
            for (i, _, cols, _), a in zip(items, step_adv.tolist()):
                step_tok[i, cols] = a

        f["advantages"] = traj.unsqueeze(-1) * mask + c.step_weight * step_tok
        weight = (traj > POSITIVE).to(mask.dtype).unsqueeze(-1) * mask
        if c.step_weight > 0:
            weight = weight + (step_tok > POSITIVE).to(mask.dtype)
        f.update(thor_step_adv=step_tok, thor_kept=kept.to(rewards.dtype), thor_nll_weight=weight,
                 thor_nll_tokens=torch.full_like(rewards, float(weight.sum())))
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        res = super().loss(batch, out)  # GRPO's surrogate takes the per-token [B, T] advantages as they are
        c, f, mask = self.config, batch.fields, batch.completion_mask
        res.metrics["thor/kept_fraction"] = float(f["thor_kept"].mean())
        res.metrics["thor/step_token_fraction"] = float(ops.masked_mean((f["thor_step_adv"] != 0).float(), mask))
        if c.nll_alpha > 0:
            # normalised by the whole batch's positive tokens, so micro-batch losses add up to the batch's
            nll = -ops.masked_sum(out.logps, f["thor_nll_weight"]) / f["thor_nll_tokens"][0].clamp(min=1)
            res.loss = res.loss + c.nll_alpha * nll
            res.metrics["thor/nll"] = float(nll.detach())
        return res
