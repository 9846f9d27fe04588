"""PRM training on stepwise supervision: the layout is the ``prm`` reward's, the loss is a two-token cross-entropy at
each step's tag, and a trained checkpoint scores steps through ``--reward prm``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from algo_helpers import train_changes_weights
from conftest import cli, token_batch
from tokalign.algorithms.prm import PRM, PRMConfig
from tokalign.protocols import PolicyOutput
from tokalign.rewards.prm import encode_steps, split_steps
from tokalign.rows import dumps


@pytest.fixture(scope="module")
def tok():
    from tokalign.tiny import build_tokenizer

    return build_tokenizer()


ROW = {"prompt": dumps("2+3="), "steps": ["2+3", "= 5"], "step_labels": [True, False]}


def test_layout_is_the_rewards_input_with_the_loss_on_each_tag(tok):
    algo = PRM(PRMConfig())
    seq = algo.encode(tok, ROW)
    ids = seq.prompt_ids + seq.completion_ids
    completion = "2+3\n= 5\n"
    want, reads, first = encode_steps(tok, "2+3=", completion, split_steps(completion, "\n"), " ки", True)
    assert ids[: len(want)] == want and len(reads) == 2
    tag_ids = tok(" ки", add_special_tokens=False)["input_ids"]
    for r in reads:  # each read sits on the tag's last token
        assert want[r] == tag_ids[-1]
    columns = [len(seq.prompt_ids) - 1 + j for j, m in enumerate(seq.token["loss_mask"]) if m]
    assert columns == reads  # the column predicting the token after the tag: the tag's own position
    assert [seq.token["step_labels"][c - len(seq.prompt_ids) + 1] for c in columns] == [1.0, 0.0]
    last = PRM(PRMConfig(last_step_only=True)).encode(tok, ROW)
    assert sum(last.token["loss_mask"]) == 1


def test_loss_by_hand_and_its_limit(tok):
    algo = PRM(PRMConfig())
    algo.encode(tok, ROW)  # learns the (good, bad) token ids
    good, bad = algo._pair
    v = max(good, bad) + 1
    logits = torch.zeros(1, 3, v)
    logits[0, 0, good], logits[0, 0, bad] = 2.0, 0.5  # z = 1.5, label 1
    logits[0, 2, good], logits[0, 2, bad] = 0.0, 1.0  # z = -1, label 0
    batch = token_batch([[1, 0, 1]], {"step_labels": torch.tensor([[1.0, 0.0, 0.0]])}, {"tokens": 2.0})
    out = algo.loss(batch, PolicyOutput(logps=torch.zeros(1, 3), logits=logits))
    want = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(-1.0))) / 2
    assert out.loss.item() == pytest.approx(want, abs=1e-6)
    assert out.metrics["prm/accuracy"] == 1.0 and out.metrics["prm/good_fraction"] == 0.5
    flat = algo.loss(batch, PolicyOutput(logps=torch.zeros(1, 3), logits=torch.zeros(1, 3, v)))
    assert flat.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # z = 0: log 2 whatever the label


def test_config_checks():
    with pytest.raises(ValueError, match="separator"):
        PRMConfig(separator="")
    with pytest.raises(ValueError, match="two different tokens"):
        PRMConfig(good_token="+", bad_token="+")
    assert PRMConfig(separator="\\n\\n").separator == "\n\n"


def _stepwise_file(path, n=12):
    import random

    r = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(1, 9), r.randint(1, 9)
            ok = r.random() < 0.5
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completions": [f"{a}+{b}", f"= {a + b + (0 if ok else 1)}"],
                                "labels": [True, ok]}) + "\n")
    return path


@pytest.mark.slow
def test_trained_prm_scores_through_the_reward(tmp_path):
    """train prm (TRL's stepwise file as it is) -> a causal-LM checkpoint -> --reward prm reads its steps back:
    the reward's step scores are tanh(z / 2) of the trained model at the tags the training saw."""
    from tokalign.rewards.prm import PRM as Reward, PRMConfig as RewardConfig
    from tokalign.protocols import Sample
    from tokalign.data.render import completion_ids
    from tokalign.tiny import build_tokenizer

    data = _stepwise_file(tmp_path / "steps.jsonl")
    metrics = train_changes_weights(tmp_path, "prm", "--data", str(data), steps=2)
    assert all("prm/accuracy" in m for m in metrics)
    ckpt = tmp_path / "x"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    tok = build_tokenizer()
    reward = Reward(RewardConfig(model=str(ckpt), separator="\\n"))
    text = "2+3\n= 6\n"
    (r,) = reward([Sample("s", "2+3=", text, completion_ids(tok, text))])
    assert r.info["steps"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    ids, reads, _ = encode_steps(tok, "2+3=", text, split_steps(text, "\n"), " ки", True)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    good, bad = (tok.get_vocab()[t] for t in ("+", "-"))
    want = [math.tanh(float(logits[p, good] - logits[p, bad]) / 2) for p in reads]
    assert r.info["step_scores"] == pytest.approx(want, abs=1e-5)


def test_stepwise_data_for_another_algorithm_is_one_line(tmp_path):
    data = _stepwise_file(tmp_path / "steps.jsonl", n=2)
    proc = cli("train", "sft", "--data", str(data), "--out", "X", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "'sft' trains on completions data, but" in proc.stderr and "stepwise" in proc.stderr
