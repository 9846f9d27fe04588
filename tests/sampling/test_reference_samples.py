"""The reference-samples hook (tokalign/sampling/reference_samples.py, PAR's): the reference's samples of a prompt are
seeded per prompt and leave the policy's RNG alone."""

from __future__ import annotations

import torch


def test_online_source_reference_rewards_are_seeded_per_prompt(tiny_model):
    """The reference samples of a prompt do not move the policy's RNG, and a fresh source (a resumed run) gets the
    same rewards for it."""
    from tokalign import models, rewards
    from tokalign.data.arith import Arith
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.hf import HFEngine
    from tokalign.rows import dumps
    from tokalign.data.render import retokenize
    from tokalign.sampling import ReferenceSamples
    from tokalign.train.sources import OnlineSource

    tok, model = models.load_tokenizer(str(tiny_model)), models.load_model(str(tiny_model), "float32")
    rows = retokenize([{**r, "prompt": dumps(r["prompt"]), "reference": dumps(r.get("reference"))}
                       for r in Arith().records("train")[:3]], tok)

    def source():
        return OnlineSource(rows, HFEngine(model, tok), rewards.resolve(["exact_match"]), SamplingSpec(n=2, max_new_tokens=4), 2, 0,
                            reference=lambda: model)

    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = ReferenceSamples(3)._rewards(1, source())
    assert torch.equal(torch.get_rng_state(), before)
    assert len(first) == 3 and ReferenceSamples(3)._rewards(1, source()) == first
