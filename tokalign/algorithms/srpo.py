"""SRPO — "Self-Improving Robust Preference Optimization", Choi, Ahmadian, Geist, Pietquin, Gheshlaghi Azar 2024,
arXiv:2406.01660. One LLM is both the generative policy π(y | x) and the self-improvement policy π(y' | x, y) (the
prompt followed by a draft y and a revision instruction); the paper's min-max objective between the two reduces to
an offline, IPO-like squared loss over preference pairs, with no reward model and no sampling.

Per preference pair (x, y_w, y_l), six scored sequences (the row's ``fields.srpo_role``, k = 0..5):

    k  sequence             Δ_k = Σ_t m_t (ℓ_t − ℓ^ref_t)  (sum over the completion, as DPO)
    0  y_w | x              generative, chosen
    1  y_l | x              generative, rejected
    2  y_w | x, y_l         revising the rejected draft into the chosen one
    3  y_l | x, y_l         "revising" the rejected draft into itself
    4  y_w | x, y_w         "revising" the chosen draft into itself
    5  y_l | x, y_w         revising the chosen draft into the rejected one

    L_self = (½ − β (Δ_2 − Δ_3))² + (½ − β (Δ_4 − Δ_5))²
    L_gen  = (β (Δ_2 + Δ_0 − Δ_5 − Δ_1) − 1)²
    L      = mean over pairs of  (1 − α) L_gen + α L_self

Shapes: ``logps``, ``ref_logps``, mask: [B, T]; ``srpo_role``, ``group_ids``: [B] (B = 6 × pairs); per pair: [P].

Data: a ``scored`` artifact whose every group is one pair laid out as above (``revision_groups`` builds it from scored
rollouts: each group's best vs worst completion, as ``dpo`` pairs them; a revision prompt is the prompt's token ids,
then the draft's, then the ids of ``REVISE``). The ``pairs`` format has no place for the revision sequences, so the
revision data travels in the existing scored-row format; its ``reward`` column keeps each completion's score.

⚠ unchecked: the paper's equation could not be read offline. The loss above is the one of the SRPO trainer proposed
to TRL (huggingface/trl PR #1772, closed unmerged, ``srpo_loss``; a third-party implementation, not the authors'):
its α = 0.8 weighs the self-improvement term, its β came from DPO's signature (0.01 there; 0.1 here, tokalign's
DPO default); both defaults and the revision prompt ``REVISE`` are unchecked against the paper.
Limit: α = 0 with revision rows whose log-ratios vanish is β² · IPO (with β_IPO = β / 2, sum log-ratios).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokalign import ops
from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.protocols import LossOutput, Needs, PolicyOutput, TokenBatch

ROLES = 6
REVISE = "\nRevise the answer above to improve it.\n"


@dataclass
class SRPOConfig(DPOConfig):
    alpha: float = 0.8  # weight of the self-improvement term (1 − α on the generative term)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (weight of the self-improvement term), got {self.alpha}")
        if self.loss_type != "sigmoid" or self.label_smoothing:
            raise ValueError("srpo has its own squared loss: loss_type and label_smoothing do not apply (leave them unset)")


def pair_roles(ratio: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Per-row values [B] -> [P, 6]: row k of a pair's group at column ``srpo_role`` = k, pairs in group order."""
    gid = batch.fields["group_ids"].long()
    groups, index = torch.unique(gid, sorted=True, return_inverse=True)
    role = batch.fields["srpo_role"].long()
    out = ratio.new_zeros(len(groups), ROLES)
    return out.index_put((index, role), ratio)


class SRPO(DPO):
    Config = SRPOConfig

    def __init__(self, config: SRPOConfig):
        self.config = config
        self.needs = Needs(data=("scored",), reference=True)

    def prepare(self, batch: TokenBatch) -> TokenBatch:
        f = batch.fields
        if "srpo_role" not in f:
            from tokalign.errors import UserError

            raise UserError("srpo trains on scored groups of six rows with fields.srpo_role 0..5 (see "
                            "tokalign.algorithms.srpo; revision_groups builds them from scored rollouts).")
        counts = torch.zeros(int(f["group_ids"].max()) + 1, ROLES)
        counts.index_put_((f["group_ids"].long(), f["srpo_role"].long()), torch.ones(len(batch)), accumulate=True)
        present = counts.sum(-1) > 0
        if not bool((counts[present] == 1).all()):
            from tokalign.errors import UserError

            raise UserError("srpo: every group must hold exactly one row of each srpo_role 0..5 (one preference pair with "
                            "its four revision rows).")
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        b, a = self.config.beta, self.config.alpha
        ratio = ops.masked_sum(out.logps - batch.fields["ref_logps"], batch.completion_mask, -1)  # [B] Δ
        d = pair_roles(ratio, batch)  # [P, 6]
        self_term = (0.5 - b * (d[:, 2] - d[:, 3])).square() + (0.5 - b * (d[:, 4] - d[:, 5])).square()
        gen_term = (b * (d[:, 2] + d[:, 0] - d[:, 5] - d[:, 1]) - 1).square()
        losses = (1 - a) * gen_term + a * self_term
        metrics = {
            "srpo/gen_loss": float(gen_term.detach().mean()),
            "srpo/self_loss": float(self_term.detach().mean()),
            "rewards/accuracy": float((d[:, 0] > d[:, 1]).float().mean()),
            "srpo/revision_accuracy": float((d[:, 2] > d[:, 5]).float().mean()),
        }
        return LossOutput(losses.sum() / batch.totals.get("groups", float(losses.numel())), metrics)


def revision_groups(rows: list[dict[str, Any]], revise_ids: list[int], revise_text: str = REVISE) -> list[dict[str, Any]]:
    """Scored rows (groups of completions of one prompt) -> scored rows for SRPO: for every group whose rewards differ,
    its best (first on ties) and worst completion as one pair, laid out as the six rows of the module docstring
    (revision prompts: prompt ids + draft ids + ``revise_ids``); new group ids 0, 1, ...; other groups are dropped."""
    from tokalign.rows import best_and_worst

    out = []
    for best, worst in best_and_worst(rows):
        gid = len(out) // ROLES
        layout = [(best, None), (worst, None), (best, worst), (worst, worst), (best, best), (worst, best)]
        for k, (target, draft) in enumerate(layout):
            prompt_ids = list(best["prompt_ids"])
            prompt_text = best["prompt_text"]
            if draft is not None:
                prompt_ids += list(draft["completion_ids"]) + list(revise_ids)
                prompt_text += draft["completion"] + revise_text
            out.append({**target, "id": f"{target['id']}/srpo{k}", "group_id": gid, "sample_idx": k, "prompt_ids": prompt_ids,
                        "prompt_text": prompt_text, "fields": {**(target.get("fields") or {}), "srpo_role": float(k)}})
    return out
