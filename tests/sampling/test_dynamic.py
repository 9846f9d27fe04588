"""Dynamic sampling (tokalign/sampling/dynamic.py): the online source keeps only informative groups and resamples, the
same way for the same seed; without the hook every group is kept."""

from __future__ import annotations


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
