"""``reward_model``: a sequence-classification RM scores prompt + completion rendered with its own
tokenizer; scores equal a direct transformers forward, whatever the batch size."""

from __future__ import annotations

import pytest
import torch

from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards.reward_model import RewardModel


def make_classifier(out, num_labels: int, seed: int):
    """A seeded random tiny Qwen2ForSequenceClassification with tokalign.tiny's tokenizer (chat template)."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from tokalign.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      num_labels=num_labels, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    Qwen2ForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rm1(tmp_path_factory):
    return make_classifier(tmp_path_factory.mktemp("rm") / "rm1", 1, seed=3)


@pytest.fixture(scope="module")
def rm3(tmp_path_factory):
    return make_classifier(tmp_path_factory.mktemp("rm") / "rm3", 3, seed=4)


SAMPLES = [
    Sample("a", [{"role": "user", "content": "12+30="}], "42"),
    Sample("b", "what is the answer", " the answer is good and the model is bad yes"),
    Sample("c", [{"role": "system", "content": "think step"}, {"role": "user", "content": "7+8="}], "15 please"),
    Sample("d", [{"role": "user", "content": "hello world"}], ""),
    Sample("e", "sum plus", " equals the total number of a reward token and the result"),
]


def direct(path, sample: Sample):
    """The RM's logits for one sample, rendered by hand and run alone (no padding)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": sample.prompt}] if isinstance(sample.prompt, str) else sample.prompt
    text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": sample.completion}], tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def score(path, **opts):
    return RewardModel(RewardModel.Config(model=str(path), device="cpu", **opts))(SAMPLES)


def test_scores_equal_a_direct_forward_at_any_batch_size(rm1):
    expected = torch.stack([direct(rm1, s)[0] for s in SAMPLES])
    for bs in (1, 2, 8):
        got = torch.tensor([r.value for r in score(rm1, batch_size=bs)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(set(expected.tolist())) == len(SAMPLES)  # a random RM still tells the rows apart


def test_label_and_normalisation(rm1, rm3):
    logits = torch.stack([direct(rm3, s) for s in SAMPLES])
    got = torch.tensor([r.value for r in score(rm3, label=2, batch_size=3)])
    torch.testing.assert_close(got, logits[:, 2], rtol=1e-5, atol=1e-5)
    got = torch.tensor([r.value for r in score(rm3, label=1, normalize="softmax")])
    torch.testing.assert_close(got, logits.softmax(-1)[:, 1], rtol=1e-5, atol=1e-6)
    one = torch.stack([direct(rm1, s)[0] for s in SAMPLES])
    got = torch.tensor([r.value for r in score(rm1, normalize="sigmoid")])
    torch.testing.assert_close(got, one.sigmoid(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="label 1 is out of range for a model with 1 label"):
        score(rm1, label=1)
    with pytest.raises(UserError, match="normalize=softmax needs num_labels >= 2"):
        score(rm1, normalize="softmax")


def test_truncation_keeps_the_end(rm1):
    full = score(rm1)
    cut = score(rm1, max_length=6)
    assert [r.info.get("truncated", False) for r in cut] == [True] * 5
    assert all(a.value != b.value for a, b in zip(full, cut))


def test_model_is_loaded_once_per_path(rm1):
    from tokalign.rewards import common

    score(rm1)
    before = {k: id(v) for k, v in common._CACHE.items()}
    score(rm1, batch_size=1)
    assert {k: id(v) for k, v in common._CACHE.items()} == before


def test_config_and_model_errors(tiny_model):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        RewardModel.Config(batch_size=0)
    with pytest.raises(ValueError, match="normalize must be one of none, sigmoid, softmax"):
        RewardModel.Config(normalize="zscore")
    with pytest.raises(UserError, match=r"^reward_model needs a model: --reward-opt reward_model.model=PATH$"):
        RewardModel()
    with pytest.raises(UserError, match=r"^reward_model.model: Model '/no/such/rm' does not exist"):
        RewardModel(RewardModel.Config(model="/no/such/rm"))
    with pytest.raises(UserError, match="is a Qwen2ForCausalLM, not a sequence-classification reward model"):
        RewardModel(RewardModel.Config(model=str(tiny_model)))(SAMPLES)
    assert RewardModel(RewardModel.Config(model=str(tiny_model)))([]) == []


def test_registered_and_resolvable(rm1):
    from tokalign import registry
    from tokalign.rewards import resolve

    for name in ("reward_model", "judge", "implicit", "prm"):
        assert name in registry.available("reward")
        assert registry.load("reward", name).batched is True
    (r,) = resolve(["reward_model*0.5"], {"reward_model": {"model": str(rm1), "batch_size": 2}})
    assert r.weight == 0.5 and isinstance(r.fn, RewardModel) and r.fn.config.batch_size == 2
    # a missing required option fails when the run resolves its rewards, with the plug-in's own line
    with pytest.raises(UserError, match=r"^reward_model needs a model: --reward-opt reward_model.model=PATH$"):
        resolve(["reward_model"])
    with pytest.raises(UserError, match="normalize must be one of none, sigmoid, softmax"):
        resolve(["reward_model"], {"reward_model": {"model": str(rm1), "normalize": "z"}})
