"""The HF engine's sampler log-probs are recorded as tokens are generated (one [sequences, V] step in memory, no
``output_scores``) and equal what transformers' own ``output_scores`` give for the same seeded samples."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("temperature,top_p,n", [(0.7, 0.9, 3), (1.0, 1.0, 3), (1.3, 0.5, 2), (0.0, 1.0, 1)])
def test_recorded_logps_equal_output_scores(temperature, top_p, n):
    from transformers import GenerationConfig

    from tokalign import models
    from tokalign.data.render import render_prompts
    from tokalign.rollout import SamplingSpec, stop_ids
    from tokalign.rollout.hf import HFEngine

    tok, model = models.load_tokenizer(""), models.load_model("")
    prompts = [ids for _, ids in render_prompts(tok, [[{"role": "user", "content": "1+2="}], [{"role": "user", "content": "33+44="}]])]
    torch.manual_seed(0)
    got = [c for group in HFEngine(model, tok).generate(prompts, SamplingSpec(n=n, temperature=temperature, top_p=top_p, max_new_tokens=8))
           for c in group]
    torch.manual_seed(0)
    width, pad = max(map(len, prompts)), tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    sample = temperature > 0
    cfg = GenerationConfig(do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                           top_k=0 if sample else None, num_return_sequences=n, pad_token_id=pad,
                           eos_token_id=sorted(stop_ids(tok, model.generation_config)), return_dict_in_generate=True, output_scores=True)
    res = model.eval().generate(input_ids=ids, attention_mask=mask, generation_config=cfg, max_new_tokens=8)
    new = res.sequences[:, width:]
    want = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, new[:, i:i + 1]).squeeze(-1) for i, s in enumerate(res.scores)], 1)
    assert len(got) == new.shape[0]
    for r, c in enumerate(got):
        assert c.ids == new[r].tolist()[: len(c.ids)]
        torch.testing.assert_close(torch.tensor(c.logps), want[r, : len(c.logps)], atol=1e-6, rtol=0)
