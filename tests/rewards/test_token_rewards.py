"""Token-level reward sources: ``implicit`` (β·(log π_dpo − log π_ref) per completion token) and ``prm``
(process-reward step scores on the step-end tokens). Both give exactly one value per completion token,
and the scalar is the sum of the token values."""

from __future__ import annotations

import pytest
import torch

from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards import normalise
from tokalign.rewards.implicit import Implicit
from tokalign.rewards.prm import PRM, split_steps


@pytest.fixture(scope="module")
def tok():
    from tokalign.tiny import build_tokenizer

    return build_tokenizer()


def sample(tok, prompt, text: str, sid: str = "s") -> Sample:
    from tokalign.data.render import completion_ids

    return Sample(sid, prompt, text, completion_ids(tok, text))


def direct_logps(path, prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    """log π(y_t | x, y_<t) of one row, unpadded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0].log_softmax(-1)
    n = len(prompt_ids)
    return lp[n - 1: -1].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------- implicit


@pytest.fixture(scope="module")
def dpo_model(tmp_path_factory):
    from tokalign.tiny import make_random

    return make_random(tmp_path_factory.mktemp("dpo") / "dpo", seed=7)


def implicit_samples(tok):
    return [
        sample(tok, [{"role": "user", "content": "12+30="}], "42", "a"),
        sample(tok, "what is the sum", " the answer is good\n\nyes", "b"),
        sample(tok, [{"role": "user", "content": "hello"}], "", "c"),  # EOS only
    ]


def test_implicit_token_values_are_beta_times_the_logp_difference(tok, tiny_model, dpo_model):
    from tokalign.data.render import render_prompts

    samples = implicit_samples(tok)
    got = Implicit(Implicit.Config(model=str(dpo_model), ref=str(tiny_model), beta=0.1, device="cpu"))(samples)
    for s, r, (_, pids) in zip(samples, got, render_prompts(tok, [s.prompt for s in samples])):
        expected = 0.1 * (direct_logps(dpo_model, pids, s.completion_ids) - direct_logps(tiny_model, pids, s.completion_ids))
        assert len(r.token_values) == len(s.completion_ids)
        torch.testing.assert_close(torch.tensor(r.token_values), expected, rtol=1e-5, atol=1e-6)
        assert r.value == sum(r.token_values)
        assert normalise("implicit", s, r) is r
    assert [len(r.token_values) for r in got] == [3, 10, 1]


def test_implicit_batching_beta_and_limits(tok, tiny_model, dpo_model):
    samples = implicit_samples(tok)

    def run(**opts):
        return Implicit(Implicit.Config(model=str(dpo_model), ref=str(tiny_model), device="cpu", **opts))(samples)

    base, one, doubled = run(), run(batch_size=1), run(beta=0.2)
    for a, b, c in zip(base, one, doubled):
        torch.testing.assert_close(torch.tensor(a.token_values), torch.tensor(b.token_values), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(c.token_values), 2 * torch.tensor(a.token_values), rtol=1e-5, atol=1e-6)
    same = Implicit(Implicit.Config(model=str(tiny_model), ref=str(tiny_model), device="cpu"))(samples)
    assert all(v == 0.0 for r in same for v in r.token_values) and all(r.value == 0.0 for r in same)


def test_implicit_errors(tiny_model):
    with pytest.raises(UserError, match=r"^implicit needs a model: --reward-opt implicit.model=PATH$"):
        Implicit()
    with pytest.raises(UserError, match=r"^implicit needs a model: --reward-opt implicit.ref=PATH$"):
        Implicit(Implicit.Config(model=str(tiny_model)))
    with pytest.raises(ValueError, match="beta must be > 0"):
        Implicit.Config(beta=0)
    with pytest.raises(UserError, match="outside the DPO model's vocabulary"):
        Implicit(Implicit.Config(model=str(tiny_model), ref=str(tiny_model), device="cpu"))([Sample("x", "p", "c", [10**6])])


# ---------------------------------------------------------------------------------------------- prm


def test_split_steps():
    text = "\n\nfirst\n\nsecond\n\n \n\nthird\n\n"
    steps = split_steps(text, "\n\n")
    assert [(text[a:b], text[b:e]) for a, b, e in steps] == [("\n\nfirst", "\n\n"), ("second", "\n\n \n\n"), ("third", "\n\n")]
    assert split_steps("", "\n\n") == [] and split_steps(" \n\n ", "\n\n") == []
    assert split_steps("one line", "\n") == [(0, 8, 8)]


def make_token_prm(out, num_labels: int = 2, seed: int = 5):
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    from tokalign.tiny import build_tokenizer

    tk = build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tk), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      num_labels=num_labels, pad_token_id=tk.pad_token_id)
    torch.manual_seed(seed)
    Qwen2ForTokenClassification(cfg).save_pretrained(out)
    tk.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def token_prm(tmp_path_factory):
    return make_token_prm(tmp_path_factory.mktemp("prm") / "token")


PROMPT = [{"role": "user", "content": "12+30="}]
STEPS_TEXT = "think step one\n\nadd the number\n\nthe answer is 42"


def prefix_text(tok, prompt) -> str:
    """The PRM input before the completion: the chat template's generation prompt (tiny template)."""
    return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def step_end_tokens(tok, text: str, ends: list[int]) -> list[int]:
    """Index of the completion token ending at each character end (prefix tokenisation; stable at these boundaries)."""
    return [len(tok(text[:e], add_special_tokens=False)["input_ids"]) - 1 for e in ends]


def test_token_prm_scores_step_ends(tok, token_prm):
    """PURE-style: score = p(label 1) − p(label 0) at the PRM token ending each step (its "\\n\\n" included),
    placed on the completion token ending the step, 0 elsewhere."""
    from transformers import AutoModelForTokenClassification

    s = sample(tok, PROMPT, STEPS_TEXT)
    (r,) = PRM(PRM.Config(model=str(token_prm), device="cpu"))([s])
    ends = [len("think step one\n\n"), len("think step one\n\nadd the number\n\n"), len(STEPS_TEXT)]
    # the PRM reads prompt + completion (no tag) through its chat template; read positions by prefix tokenisation
    full = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": STEPS_TEXT}], tokenize=False)
    head = prefix_text(tok, PROMPT)
    reads = [len(tok(head + STEPS_TEXT[:e], add_special_tokens=False)["input_ids"]) - 1 for e in ends]
    model = AutoModelForTokenClassification.from_pretrained(token_prm, dtype=torch.float32).eval()
    with torch.no_grad():
        p = model(input_ids=torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])).logits[0].softmax(-1)
    expected = (p[reads, 1] - p[reads, 0]).tolist()

    places = step_end_tokens(tok, STEPS_TEXT, ends)
    assert len(r.token_values) == len(s.completion_ids) == places[-1] + 2  # + EOS
    assert [t for t, v in enumerate(r.token_values) if v != 0] == places
    torch.testing.assert_close(torch.tensor([r.token_values[t] for t in places]), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert r.value == sum(r.token_values) and r.value == pytest.approx(sum(expected), abs=1e-6)
    assert r.info["steps"] == 3 and all(-1 <= v <= 1 for v in r.info["step_scores"])
    assert normalise("prm", s, r) is r
    # the separator's tokens ("\n", "\n") are in the step: the score is on the second one
    assert tok.convert_ids_to_tokens([s.completion_ids[places[0]], s.completion_ids[places[0] - 1]]) == ["Ċ", "Ċ"]


def test_causal_prm_math_shepherd(tok, tiny_model):
    """Math-Shepherd-style: the tag follows each step; score = p(+) − p(−) renormalised over the two,
    read at the tag tokens (found by id, as Math-Shepherd does)."""
    from transformers import AutoModelForCausalLM

    tag = "<|endoftext|>"  # one vocabulary token in the tiny tokenizer, like Math-Shepherd's "ки"
    text = "step one plus\nstep two equals\nthe answer is 42"
    s = sample(tok, "12+30=", text)
    (r,) = PRM(PRM.Config(model=str(tiny_model), separator="\\n", step_tag=tag, device="cpu"))([s])

    steps = text.split("\n")
    prm_input = "\n".join(st + tag for st in steps)  # the text prompt becomes a user turn of the chat template
    full = tok.apply_chat_template([{"role": "user", "content": "12+30="}, {"role": "assistant", "content": prm_input}], tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    tag_id = tok.convert_tokens_to_ids(tag)
    reads = [i for i, t in enumerate(ids) if t == tag_id]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    p = logits[reads][:, [plus, minus]].softmax(-1)
    expected = (p[:, 0] - p[:, 1]).tolist()
    assert len(reads) == 3

    ends = [len("step one plus\n"), len("step one plus\nstep two equals\n"), len(text)]
    places = step_end_tokens(tok, text, ends)
    assert len(r.token_values) == len(s.completion_ids)
    assert [t for t, v in enumerate(r.token_values) if v != 0] == places
    torch.testing.assert_close(torch.tensor([r.token_values[t] for t in places]), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert r.value == sum(r.token_values)


def test_prm_default_tag_batching_and_edge_cases(tok, tiny_model, token_prm):
    samples = [
        sample(tok, PROMPT, STEPS_TEXT, "a"),
        sample(tok, PROMPT, "", "empty"),  # EOS only: no step
        sample(tok, "what", "one single step", "single"),
        sample(tok, PROMPT, "a\n\n\n\nb\n\n", "blank"),
    ]
    for path in (tiny_model, token_prm):  # causal with the default " ки" tag; token-classification
        got = PRM(PRM.Config(model=str(path), device="cpu"))(samples)
        one = PRM(PRM.Config(model=str(path), device="cpu", batch_size=1))(samples)
        for s, r, q in zip(samples, got, one):
            assert len(r.token_values) == len(s.completion_ids)
            assert r.value == sum(r.token_values)
            torch.testing.assert_close(torch.tensor(r.token_values), torch.tensor(q.token_values), rtol=1e-5, atol=1e-6)
        assert [r.info["steps"] for r in got] == [3, 0, 1, 2]
        assert got[1].token_values == [0.0] and got[1].value == 0.0
        nonzero = [[t for t, v in enumerate(r.token_values) if v != 0] for r in got]
        assert nonzero[2] == [len(samples[2].completion_ids) - 2]  # the last token before EOS
        # "a\n\n\n\nb\n\n": step "a" ends with all four newlines, step "b" with its two
        assert nonzero[3] == step_end_tokens(tok, "a\n\n\n\nb\n\n", [5, 8])


def test_prm_errors(tok, tiny_model, token_prm, tmp_path):
    s = sample(tok, PROMPT, STEPS_TEXT)
    with pytest.raises(UserError, match=r"^prm needs a model: --reward-opt prm.model=PATH$"):
        PRM()
    with pytest.raises(ValueError, match="separator must not be empty"):
        PRM.Config(separator="")
    with pytest.raises(ValueError, match="kind must be one of auto, causal, token"):
        PRM.Config(kind="generative")
    assert PRM.Config(separator="\\n").separator == "\n" and PRM.Config(step_tag=" \\t").step_tag == " \t"
    bad = Sample("x", PROMPT, "not what the ids say", s.completion_ids)
    with pytest.raises(UserError, match="do not decode to its completion"):
        PRM(PRM.Config(model=str(token_prm), device="cpu"))([bad])
    with pytest.raises(UserError, match="needs 2 labels"):
        PRM(PRM.Config(model=str(make_token_prm(tmp_path / "three", num_labels=3)), device="cpu"))([s])
    with pytest.raises(UserError, match="good_token 'plus' is 2 tokens"):
        PRM(PRM.Config(model=str(tiny_model), good_token="plus", device="cpu"))([s])


def test_scoring_carries_token_values(tok, token_prm, tiny_model, dpo_model):
    """Through tokalign's scoring (batched calls, the per-token contract check): token_rewards = weight × token values."""
    from tokalign.rewards import resolve
    from tokalign.scoring import score_samples

    samples = [sample(tok, PROMPT, STEPS_TEXT, "a"), sample(tok, "what", "one single step", "b")]
    rewards = resolve(["prm*2", "implicit"], {"prm": {"model": str(token_prm), "device": "cpu"},
                                              "implicit": {"model": str(dpo_model), "ref": str(tiny_model), "device": "cpu"}})
    rows, _ = score_samples(rewards, samples)
    prm = PRM(PRM.Config(model=str(token_prm), device="cpu"))(samples)
    imp = Implicit(Implicit.Config(model=str(dpo_model), ref=str(tiny_model), device="cpu"))(samples)
    for row, s, p, i in zip(rows, samples, prm, imp):
        assert not row.get("reward_errors")
        assert len(row["token_rewards"]) == len(s.completion_ids)
        expected = [2 * a + b for a, b in zip(p.token_values, i.token_values)]
        torch.testing.assert_close(torch.tensor(row["token_rewards"]), torch.tensor(expected), rtol=1e-5, atol=1e-6)
        assert row["reward"] == pytest.approx(2 * p.value + i.value, abs=1e-6)


@pytest.mark.slow
def test_score_cli_with_token_rewards(tiny_model, token_prm, dpo_model, tmp_path):
    """prepare | rollout | score through the real CLI with options from --reward-opt: the scored
    artifact's token_rewards has one value per completion token and sums to the reward."""
    from conftest import cli

    from tokalign import artifacts

    cli("prepare", "arith", "--limit", "2", "--model", str(tiny_model), "--out", "P", cwd=tmp_path)
    cli("rollout", "P", "--model", str(tiny_model), "--n", "2", "--max-new-tokens", "16", "--out", "R", cwd=tmp_path)
    cli("score", "R", "--reward", "prm", "--reward", "implicit*0.5",
        "--reward-opt", f"prm.model={token_prm}", "--reward-opt", "prm.separator=\\n",
        "--reward-opt", f"implicit.model={dpo_model}", "--reward-opt", f"implicit.ref={tiny_model}",
        "--reward-opt", "implicit.beta=0.2", "--out", "S", cwd=tmp_path)
    rows = artifacts.read(tmp_path / "S", ["scored"]).rows()
    assert len(rows) == 4
    for r in rows:
        assert len(r["token_rewards"]) == len(r["completion_ids"])
        assert sum(r["token_rewards"]) == pytest.approx(r["reward"], abs=1e-5)
        assert r["reward"] == pytest.approx(r["rewards"]["prm"] + 0.5 * r["rewards"]["implicit"], abs=1e-6)
    assert any(r["rewards"]["implicit"] != 0 for r in rows)
    proc = cli("score", "R", "--reward", "judge", "--out", "J", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: judge needs a server: --reward-opt judge.base_url=http://HOST:PORT/v1"
