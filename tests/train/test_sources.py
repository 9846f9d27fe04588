"""Training batches come from (seed, step) alone, and scored rollouts turn into on-policy pairs (tokalign/train/sources.py)."""

from __future__ import annotations

from tokalign.train.sources import indices_for_step, pairs_from_scored


def test_indices_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    steps = [indices_for_step(10, 4, s, seed=3) for s in range(5)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert indices_for_step(10, 4, 3, seed=3) == steps[3]  # a resumed run asks for step 3 and gets the same items
    assert indices_for_step(10, 4, 0, seed=4) != steps[0]


def _row(gid, k, reward):
    return {"id": f"p{gid}#{k}", "group_id": gid, "prompt": '"q"', "prompt_text": "q", "prompt_ids": [1], "reference": '"2"',
            "completion": f"c{k}", "completion_ids": [10 + k, 2], "reward": reward}


def test_pairs_from_scored_best_vs_worst_and_skip_equal_groups():
    rows = [_row(0, 0, 0.0), _row(0, 1, 1.0), _row(0, 2, 1.0), _row(0, 3, 0.5), _row(1, 0, 1.0), _row(1, 1, 1.0)]
    (pair,) = pairs_from_scored(rows)
    assert (pair["chosen"], pair["rejected"]) == ("c1", "c0")  # first of the tied best, the worst
    assert pair["chosen_ids"] == [11, 2] and pair["rejected_ids"] == [10, 2]  # the sampler's own token ids
