"""TEMPO — "Exploiting Tree Structure for Credit Assignment in RL Training of LLMs", Tran, Yao & Yu 2025,
arXiv:2509.18314 (Tree-Estimated Mean Prefix Value for Policy Optimization). GRPO plus a temporal-difference term at
the tokens where the group's completions branch. No official code was found: this follows the paper's description
as summarised from the paper, not code; the PDF's details (reward normalisation inside
V, any TD coefficient) were not checked.

Shapes: ``rewards``, ``group_ids``: [B]; ``advantages``: [B, T] per token (0 off the completion); ``logps``,
``old_logps``, ``ref_logps``, mask: [B, T].

Prefix-to-tree (P2T): the completions of a group (exact token ids, ``input_ids[i, 1:][completion_mask[i] > 0]``) form
a prefix tree; s_t is the node reached after the first t tokens of a completion, N(s) the completions through s.

    V(s) = mean_{j ∈ N(s)} R_j                                    raw outcome rewards
    A_{i,t} = A_i^GRPO + 1[t branches]·(V(s_{t+1}) − V(s_t))      t branches ⇔ |N(s_{t+1})| < |N(s_t)|
    loss = GRPO's per-token loss with A_{i,t} (clip ε, optional β·KL, aggregation)

A token branches when some completion through s_t does not continue with it (another token, or the end). Elsewhere
N(s_{t+1}) = N(s_t), so the TD term is exactly 0 and TEMPO is GRPO. A group of two that differs only at token k gets
±(R_1 − R_2)/2 there. Defaults are GRPO's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch


@dataclass
class TEMPOConfig(GRPOConfig):
    pass


def completion_tokens(batch: TokenBatch) -> list[tuple[list[int], torch.Tensor]]:
    """Per row: (completion token ids, their columns in the [B, T] per-token tensors)."""
    rows = []
    for ids, m in zip(batch.input_ids[:, 1:], batch.completion_mask):
        cols = (m > 0).nonzero().squeeze(-1)
        rows.append((ids[cols].tolist(), cols))
    return rows


def group_rows(group_ids: torch.Tensor) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        members.setdefault(g, []).append(i)
    return members


def prefix_td(tokens: list[list[int]], rewards: list[float]) -> list[list[float]]:
    """Branch-gated TD terms V(s_{t+1}) − V(s_t) of one group's completions, one list per completion (P2T)."""
    children: list[dict[int, int]] = [{}]
    total, count = [0.0], [0]
    paths = []
    for seq, r in zip(tokens, rewards):
        node, path = 0, [0]
        total[0] += r
        count[0] += 1
        for tok in seq:
            nxt = children[node].get(tok)
            if nxt is None:
                nxt = children[node][tok] = len(children)
                children.append({})
                total.append(0.0)
                count.append(0)
            node = nxt
            total[node] += r
            count[node] += 1
            path.append(node)
        paths.append(path)
    out = []
    for path in paths:
        out.append([total[b] / count[b] - total[a] / count[a] if count[b] < count[a] else 0.0
                    for a, b in zip(path[:-1], path[1:])])
    return out


class TEMPO(GRPO):
    Config = TEMPOConfig

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        super().prepare(batch)
        seq_adv = batch.fields["advantages"]
        adv = seq_adv.unsqueeze(-1) * batch.completion_mask
        td = torch.zeros_like(adv)
        rewards, rows = batch.fields["rewards"].tolist(), completion_tokens(batch)
        for members in group_rows(batch.fields["group_ids"]).values():
            terms = prefix_td([rows[i][0] for i in members], [rewards[i] for i in members])
            for i, term in zip(members, terms):
                td[i, rows[i][1]] = torch.tensor(term, dtype=td.dtype, device=td.device)
        batch.fields["advantages"] = adv + td
        batch.fields["tempo_td"] = td
        return batch

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        res = super().loss(batch, out)  # GRPO's surrogate takes the per-token [B, T] advantages as they are
        res.metrics["tempo/td_token_fraction"] = float(ops.masked_mean((batch.fields["tempo_td"] != 0).float(), batch.completion_mask))
        return res
