"""Steps of multi-turn episodes and the tree they form within a group: what SALT, ARPO and PORTool share.

A step is one model turn of an episode. Its segment is the completion's tokens after the previous model turn up to
the end of this one (the environment's reply, then the turn); two steps of a group are the same node iff their
trajectories agree on every segment up to and including theirs (the group's prefix tree of steps). Episodes forked by
a branching rollout (``tokalign.rollout.branching``) share their history token for token, so their shared steps are
one node; independent episodes that happen to say the same are merged too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokalign.protocols import TokenBatch


def episode_turns(batch: TokenBatch) -> list[list[tuple[torch.Tensor, tuple[int, ...]]]]:
    """Per row, its model turns in order: (the turn's columns in the [B, T] per-token tensors, its segment — the
    completion's token ids after the previous model turn through the end of this one). Environment tokens are the
    completion-mask-0 tokens with ``turn_index`` −1; without a ``turn_index`` field the completion is one turn."""
    mask = (batch.completion_mask > 0).tolist()
    turn = batch.fields.get("turn_index")
    turn = turn.tolist() if turn is not None else None
    ids = batch.input_ids[:, 1:].tolist()
    out = []
    for i, m in enumerate(mask):
        labels, cols = [], []  # per completion column: its model turn, or −1 for the environment's tokens
        for c, on in enumerate(m):
            if on:
                labels.append(int(turn[i][c]) if turn is not None else 0)
                cols.append(c)
            elif turn is not None and turn[i][c] < 0:
                labels.append(-1)
                cols.append(c)
        steps, seg_start, j = [], 0, 0
        while j < len(cols):
            if labels[j] < 0:
                j += 1
                continue
            first = j
            while j < len(cols) and labels[j] == labels[first]:
                j += 1
            steps.append((torch.tensor(cols[first:j], dtype=torch.long), tuple(ids[i][c] for c in cols[seg_start:j])))
            seg_start = j
        out.append(steps)
    return out


@dataclass
class StepTree:
    """One group's prefix tree of steps: ``paths[i]`` the nodes of trajectory i in order; ``parent[v]`` (−1 under the
    root, i.e. a first step), ``members[v]`` the trajectories through node v."""

    paths: list[list[int]]
    parent: list[int]
    members: list[list[int]]


def step_tree(turns: list[list[tuple[int, ...]]]) -> StepTree:
    """The tree of steps of one group (``turns[i]``: the segments of trajectory i)."""
    index: dict[tuple[int, tuple[int, ...]], int] = {}
    parent: list[int] = []
    members: list[list[int]] = []
    paths = []
    for i, segs in enumerate(turns):
        node, path = -1, []
        for seg in segs:
            nxt = index.get((node, seg))
            if nxt is None:
                nxt = index[(node, seg)] = len(parent)
                parent.append(node)
                members.append([])
            members[nxt].append(i)
            node = nxt
            path.append(nxt)
        paths.append(path)
    return StepTree(paths, parent, members)


def graph_step_advantages(turns: list[list[tuple[int, ...]]], adv: list[float]) -> tuple[list[list[float]], list[list[int]]]:
    """One group's trajectories as a graph of steps (``turns[i]``: the segments of trajectory i): per step, the mean
    advantage of the trajectories through its node, and the node's size."""
    tree = step_tree(turns)
    mean = [sum(adv[j] for j in m) / len(m) for m in tree.members]
    return [[mean[v] for v in path] for path in tree.paths], [[len(tree.members[v]) for v in path] for path in tree.paths]
