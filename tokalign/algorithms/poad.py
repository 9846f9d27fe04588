"""POAD — "Reinforcing LLM Agents via Policy Optimization with Action Decomposition", Wen, Wan, Zhang, Wang & Wen 2024
(NeurIPS 2024; arXiv v1: "Reinforcing Language Agents via …"), arXiv:2405.15821. PPO for multi-turn episodes whose
critic is backed up token by token inside each action (BAD, the Bellman backup with Action Decomposition): no reward and
no discount between the tokens of one action, the environment's reward and discount γ only between an action's last
token and the next action's first.

Shapes: ``rewards``: [B]; ``turn_index``, ``logps``, ``old_logps``, ``ref_logps``, ``old_values``, ``values``,
``token_rewards``, ``advantages``, ``returns``, mask: [B, T].

An action is one model turn of the episode: the completion tokens with ``turn_index`` k (−1 and completion mask 0 on
the environment's replies); without ``turn_index`` (a single-turn completion) the completion is one action. For a model
token t, n(t) is the row's next model token (the environment's reply in between is skipped, not a break) and t is its
action's last token iff n(t) lies in another action or there is none:

    r_t = −β·k1_t + token_rewards_t + 1[t = last]·(R − Σ token_rewards)     (PPO's reward: R's part not given per
                                                                           token on the completion's last token)
    γ_t = γ at an action's last token, 1 inside an action;   λ_t = λ everywhere
    δ_t = r_t + γ_t V_{n(t)} − V_t,   A_t = δ_t + γ_t λ A_{n(t)},   G_t = A_t + V_t    (V, A = 0 after the last token)
    A whitened over the batch's model tokens; L^π (clip ε), L^V (clip ε_v) and the loss as in PPO (ppo.py)

So inside an action δ_t = V_{t+1} − V_t (the next token's value is the target, as BAD backs up intra-action tokens),
and across actions the environment's γ applies once per action, not once per token. A single action (single-turn data)
is PPO with γ = 1 and the same λ, exactly.

From the authors' code (morning9393/ADRL, ``mappo/utils/language_buffer.py`` ``batch_process_tppo`` with algorithm
"POAD"): inside an action ``delta = v_next − v; gae = delta + gae_lambda·gae`` — λ is kept, only γ (and the reward) is
dropped —; at an action's last token ``delta = r + γ·v_next·mask − v; gae = delta + γ·λ·mask·gae`` with v_next the
value of the next action's first token. Defaults from its ``mappo/config.py``: γ = 0.95 (its default and the
DataSciCoding runs'; the Overcooked script passes 0.99), λ = 0.95, clip 0.2 for the policy and the value, value loss
coefficient 0.5, no KL penalty, no dual clip, normalised advantages (there over a mini-batch's non-zero advantages).

tokalign's reading, not checked against the paper's text (its equations could not be read here): an action's reward
is what reaches the batch — the outcome R on the completion's last token, plus per-turn rewards only as per-token
``token_rewards`` (e.g. the ``gated`` reward puts each turn's environment reward on the turn's last token), added as
PPO adds them; the environment's reply is in the context, so V at the next action's first token is the value after
the reply. Not here: the code's entropy bonus (0.01; 1e-4 in the Overcooked script), its early stop when the
approximate KL exceeds 0.02, and its separate critic model with its own optimiser (critic lr 5e-5, actor 1e-6):
tokalign's critic is PPO's value head on the policy trunk, weighted by ``vf_coef``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign.algorithms.ppo import PPO, PPOConfig
from tokalign.protocols import TokenBatch


@dataclass
class POADConfig(PPOConfig):
    kl_coef: float = 0.0  # the authors' code has no reference model
    vf_coef: float = 0.5
    dual_clip: float = 0.0
    gamma: float = 0.95  # the environment's discount, between actions
    lam: float = 0.95


def action_discounts(mask: torch.Tensor, turn_index: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """γ_t [B, T]: ``gamma`` at each action's last token (the model token whose next model token is in another turn,
    or that has none), 1 elsewhere. ``turn_index`` [B, T] (None: each row's completion is one action)."""
    b, t = mask.shape
    on = mask > 0
    pos = torch.arange(t, device=mask.device).expand(b, t)
    at_or_after = torch.where(on, pos, t).flip(-1).cummin(-1).values.flip(-1)  # the first model token at or after s
    after = torch.cat([at_or_after[:, 1:], torch.full((b, 1), t, device=mask.device)], -1)  # n(s); t: none
    turns = torch.zeros_like(mask) if turn_index is None else turn_index.to(mask.dtype)
    turns_next = torch.cat([turns, torch.full((b, 1), -2.0, dtype=turns.dtype, device=mask.device)], -1).gather(-1, after)
    return torch.where(on & (turns_next != turns), gamma, 1.0).to(mask.dtype)


class POAD(PPO):
    Config = POADConfig

    def discounts(self, batch: TokenBatch) -> torch.Tensor:
        return action_discounts(batch.completion_mask, batch.fields.get("turn_index"), self.config.gamma)
