"""Training batches come from (seed, step) alone, and scored rollouts turn into on-policy pairs."""

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


class _Engine:
    """Fake sampler: prompts with an even id are always answered right (an uninformative group),
    odd ones right once in every two samples."""

    def __init__(self):
        self.calls = 0

    def sync(self, model):  # samples from nothing it would need to be told about
        return None

    def generate(self, prompts, spec):
        from tokalign.rollout import Completion

        self.calls += 1
        return [[Completion([5, 2], [-0.1, -0.1], "stop", "1" if p[0] % 2 == 0 or k % 2 == 0 else "0") for k in range(spec.n)]
                for p in prompts]


def _online(informative_only, max_rounds=3):
    from tokalign.rewards import resolve
    from tokalign.rollout import SamplingSpec
    from tokalign.train.sources import OnlineSource

    rows = [{"id": f"p{i}", "prompt": '"q"', "prompt_text": "q", "prompt_ids": [i], "reference": '"1"'} for i in range(20)]
    engine = _Engine()
    from tokalign.config import RolloutSection
    from tokalign.sampling import DynamicSampling

    return OnlineSource(rows, engine, resolve(["exact_match"]), SamplingSpec(n=4), batch_size=6, seed=0,
                        hooks=(DynamicSampling(),) if informative_only else (),
                        rollout_config=RolloutSection(max_sampling_rounds=max_rounds)), engine


def test_dynamic_sampling_keeps_only_informative_groups_and_resamples():
    src, engine = _online(True)
    seqs, metrics = src.batch(0)
    groups = {}
    for s in seqs:
        groups.setdefault(s.group_id, []).append(s.row["rewards"])
    assert all(len(set(r)) > 1 for r in groups.values())  # every kept group has unequal rewards
    assert len(groups) <= 6 and metrics["sampling/rounds"] == engine.calls >= 1
    assert all(s.prompt_index % 2 == 1 for s in seqs)  # only the odd (informative) prompts survive
    again, _ = _online(True)[0].batch(0)
    assert [(s.prompt_index, s.row["rewards"]) for s in again] == [(s.prompt_index, s.row["rewards"]) for s in seqs]


def test_without_dynamic_sampling_every_group_is_kept():
    src, engine = _online(False)
    seqs, _ = src.batch(0)
    assert len({s.group_id for s in seqs}) == 6 and engine.calls == 1


def test_micro_batches_by_tokens_pack_similar_lengths_and_keep_groups():
    """Groups of lengths (prompt 2 + completion) 9, 3, 8, 4 tokens, 2 rows each, budget 20 padded tokens: longest first
    → [9, 8] would be 4 × 9 = 36 > 20, so {9}, {8}, then {4, 3} = 4 × 4 = 16 ≤ 20. Padding drops against row-count
    micro-batches, and frozen log-probs come back in the batch's row order whatever the grouping."""
    import torch

    from tokalign.batching import Seq, collate, micro_batches, padding_fraction

    seqs = [Seq([1, 2], [5] * n, g) for g, n in enumerate([7, 1, 6, 2]) for _ in range(2)]
    batch = collate(seqs, 0)
    parts = micro_batches(batch, 0, max_tokens=20)
    assert [sorted(set(mb.fields["group_ids"].tolist())) for mb in parts] == [[0], [2], [1, 3]]
    assert all(mb.attention_mask.numel() <= 20 for mb in parts[1:]) and parts[0].attention_mask.shape == (2, 9)
    assert padding_fraction(parts) < padding_fraction(micro_batches(batch, 4))


def test_frozen_logps_by_tokens_equal_whole_batch(tiny_model):
    import torch

    from tokalign import models
    from tokalign.batching import Seq, collate
    from tokalign.forward import frozen_logps

    model = models.load_model(str(tiny_model))
    torch.manual_seed(0)
    seqs = [Seq(torch.randint(5, 200, (3,)).tolist(), torch.randint(5, 200, (n,)).tolist(), g) for g, n in enumerate([7, 1, 6, 2, 5])]
    batch = collate(seqs, 0)
    whole = frozen_logps(model, batch, 0)
    torch.testing.assert_close(frozen_logps(model, batch, 0, tokens=16) * batch.completion_mask, whole * batch.completion_mask,
                               atol=1e-5, rtol=1e-5)
