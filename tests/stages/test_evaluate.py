"""The eval stage (tokalign/stages/evaluate.py): pass@k (the unbiased estimator by hand), maj@k (hand-made votes), the
verifiers' answer hooks, entropy and KL from the train loop's forward pass, and the CLI end to end (results.json, rows,
the table, --compare)."""

import json
from math import comb

import pytest

from conftest import cli
from tokalign.protocols import Sample
from tokalign.stages.evaluate import ks_for, maj_at_k, majority_vote, pass_at_k, summarise

T, F = True, False


# pass@k


def test_pass_at_k_unbiased_estimator_by_hand():
    """n=4 samples, c=1 correct: pass@1 = 1 − C(3,1)/C(4,1) = 1/4; pass@2 = 1 − C(3,2)/C(4,2) = 1 − 3/6 = 1/2."""
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - comb(7, 5) / comb(10, 5))


def test_ks():
    assert ks_for(1) == [1] and ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6]


def test_summary_averages_over_prompts():
    rows = [{"group_id": g, "rewards": {"v": r}, "reward": r, "completion_ids": [1] * (g + 1), "finish_reason": "stop"}
            for g, rs in enumerate([[1, 0], [0, 0]]) for r in rs]
    res = summarise(rows, 2, "v")
    assert res["pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert res["pass@2"] == pytest.approx((1 + 0) / 2)
    assert res["mean_completion_tokens"] == pytest.approx(1.5)


# maj@k and the rest


def test_majority_vote_by_hand():
    """["7","3","7"]: 7 has 2 votes → the first '7' (index 0) decides: passed. A tie 7:1, 3:1 goes to the answer
    appearing first. None does not vote; a block with no answer is wrong."""
    assert majority_vote(["7", "3", "7"], [T, F, T]) is True
    assert majority_vote(["3", "7", "7"], [F, T, T]) is True
    assert majority_vote(["3", "7", "7"], [T, F, F]) is False
    assert majority_vote(["7", "3"], [T, F]) is True  # tie → '7' (first)
    assert majority_vote(["3", "7"], [F, T]) is False  # tie → '3' (first)
    assert majority_vote([None, None, "3"], [T, T, F]) is False  # the only vote is '3'
    assert majority_vote([None, None], [T, T]) is False


def test_maj_at_k_blocks_by_hand():
    """answers 3 7 7 None, passed F T T F:
    k=1: blocks [3] [7] [7] [None] → F T T F → 2/4 = 0.5 (= pass@1's mean);
    k=2: [3,7] tie → 3 → F; [7,None] → 7 → T → 1/2 = 0.5;
    k=4: 7 has 2 votes, 3 has 1 → T → 1.0."""
    answers, passed = ["3", "7", "7", None], [F, T, T, F]
    assert maj_at_k(answers, passed, 1) == 0.5
    assert maj_at_k(answers, passed, 2) == 0.5
    assert maj_at_k(answers, passed, 4) == 1.0
    # n=6, k=4: one block (samples 0-3), samples 4-5 unused; k=6 votes over all: 3:3, 7:2, 9:1 → 3 → F
    answers6, passed6 = ["7", "3", "3", "7", "3", "9"], [T, F, F, T, F, F]
    assert maj_at_k(answers6, passed6, 4) == 1.0  # tie 7:2, 3:2 → 7 (first)
    assert maj_at_k(answers6, passed6, 6) == 0.0
    assert maj_at_k(["1"], [T], 2) is None


def test_maj_at_k_n6_k2_by_hand():
    """Blocks of 2 over 7 3 | 3 7 | 3 9 with passed T F | F T | F F: ties each time → first answer:
    7 (T), 3 (F), 3 (F) → 1/3."""
    assert maj_at_k(["7", "3", "3", "7", "3", "9"], [T, F, F, T, F, F], 2) == pytest.approx(1 / 3)


def _rows(groups):
    """[(answers, passed, entropies)] per prompt -> eval rows (completion length 1 + sample index)."""
    rows = []
    for g, (answers, passed) in enumerate(groups):
        for i, (a, p) in enumerate(zip(answers, passed)):
            rows.append({"group_id": g, "sample_idx": i, "answer": a, "rewards": {"v": float(p)}, "reward": float(p),
                         "completion_ids": [1] * (i + 1), "finish_reason": "stop"})
    return rows


def test_summarise_maj_over_prompts_and_sample_order():
    """Prompt 0: answers 3 7 7 None / F T T F → maj@1 .5, maj@2 .5, maj@4 1.
    Prompt 1: 5 5 6 6 / F F T T → maj@1 .5, maj@2: [5,5]→F, [6,6]→T → .5, maj@4: tie → 5 (first) → F → 0.
    Means: maj@1 .5, maj@2 .5, maj@4 .5. Rows arrive shuffled: votes follow sample_idx, not row order."""
    rows = _rows([(["3", "7", "7", None], [F, T, T, F]), (["5", "5", "6", "6"], [F, F, T, T])])
    res = summarise(list(reversed(rows)), 4, "v")
    assert (res["maj@1"], res["maj@2"], res["maj@4"]) == (0.5, 0.5, 0.5)
    assert res["maj@1"] == res["pass@1"]
    assert "mean_entropy" not in res and "kl" not in res


def test_summarise_entropy_and_kl_are_token_weighted():
    """Two samples of 1 and 3 tokens: entropy means 2.0 and 1.0 → (2·1 + 1·3)/4 = 1.25 per token;
    kl (sequence sums) 0.5 and 1.5 → mean over samples 1.0; kl_k3 (per-sample means) .1 and .3 → (.1 + .9)/4 = .25."""
    rows = _rows([(["1", "2"], [T, F])])
    rows[1]["completion_ids"] = [1, 1, 1]
    for r, e, k1, k3 in zip(rows, (2.0, 1.0), (0.5, 1.5), (0.1, 0.3)):
        r.update(entropy=e, kl=k1, kl_k3=k3)
    res = summarise(rows, 2, "v")
    assert res["mean_entropy"] == pytest.approx(1.25)
    assert res["kl"] == pytest.approx(1.0)
    assert res["kl_k3_per_token"] == pytest.approx(0.25)


def test_answer_hooks():
    from tokalign import rewards
    from tokalign.stages.evaluate import answer_fn

    s = lambda c: Sample("a", "p", c)  # noqa: E731
    em = answer_fn(rewards.resolve(["exact_match"])[0])
    assert em(s("  7 \n  1 ")) == "7 1" and em(s("   ")) is None
    math = answer_fn(rewards.resolve(["math"])[0])
    assert math(s("so \\boxed{3/4}.")) == "3/4"
    assert math(s("The answer is $1,234$")) == "1234"
    assert math(s("\\boxed{1")) is None  # unclosed box: no answer

    class NoHook:
        def verify(self, sample):
            raise AssertionError

    from tokalign.rewards import ResolvedReward, _verifier_as_reward

    plain = answer_fn(ResolvedReward("x", 1.0, _verifier_as_reward(NoHook()), None, True))
    assert plain(s("  forty two \n")) == "forty two"


def test_entropy_and_kl_match_direct_computation(tiny_model):
    """add_token_stats against a by-hand forward pass: entropy = mean over completion tokens of −Σ p log p;
    kl = Σ (log π − log π_ref) (k1) and kl_k3 = mean of exp(Δ) − Δ − 1 with Δ = log π_ref − log π (clamped as in
    ops.kl_penalty: a random reference is far from the trained model); a model
    against itself has KL exactly 0."""
    import torch

    from tokalign import models
    from tokalign.stages.evaluate import add_token_stats

    tok = models.load_tokenizer(str(tiny_model))
    rows = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9], "group_id": 0},
            {"prompt_ids": [5], "completion_ids": [10, 11, 12, 13], "group_id": 0},
            {"prompt_ids": [5, 6], "completion_ids": [], "group_id": 1}]
    add_token_stats(rows, "", tok, ref=str(tiny_model))
    policy, ref = models.load_model(""), models.load_model(str(tiny_model))
    for r in rows[:2]:
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        with torch.no_grad():
            lp, lr = (torch.log_softmax(m(ids).logits[0, :-1].float(), -1) for m in (policy, ref))
        pos = torch.arange(len(r["prompt_ids"]) - 1, ids.shape[1] - 1)
        tgt = ids[0, 1:][pos]
        ent = -(lp[pos].exp() * lp[pos]).sum(-1)
        d = lp[pos].gather(-1, tgt[:, None]).squeeze(-1) - lr[pos].gather(-1, tgt[:, None]).squeeze(-1)
        assert r["entropy"] == pytest.approx(float(ent.mean()), rel=1e-4)
        assert r["kl"] == pytest.approx(float(d.sum()), rel=1e-4, abs=1e-5)
        lr_ = (-d).clamp(-20, 20)  # ops.kl_penalty's clamps: log-ratio to ±20, k3 per token to ±10
        assert r["kl_k3"] == pytest.approx(float((lr_.exp() - lr_ - 1).clamp(-10, 10).mean()), rel=1e-4, abs=1e-6)
    assert rows[2]["entropy"] is None and rows[2]["kl"] is None
    fresh = lambda: [{k: r[k] for k in ("prompt_ids", "completion_ids", "group_id")} for r in rows[:2]]  # noqa: E731
    no_ref = fresh()
    add_token_stats(no_ref, "", tok, ref="", entropy=True)
    assert "kl" not in no_ref[0] and no_ref[0]["entropy"] == pytest.approx(rows[0]["entropy"])
    self_kl = fresh()
    add_token_stats(self_kl, str(tiny_model), tok, ref=str(tiny_model), entropy=False)
    assert all(r["kl"] == 0.0 and r["kl_k3"] == 0.0 for r in self_kl)


def test_ref_with_another_tokenizer_is_a_user_error(tiny_model, tmp_path):
    from tokalign import models
    from tokalign.errors import UserError
    from tokalign.stages.evaluate import add_token_stats

    tok = models.load_tokenizer(str(tiny_model))
    other = tmp_path / "other"
    tok.save_pretrained(other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["zzz-extra"] = len(vocab["model"]["vocab"]) + 1000
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    import shutil

    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / f, other / f)
    with pytest.raises(UserError, match="different tokenizer"):
        add_token_stats([{"prompt_ids": [5], "completion_ids": [6], "group_id": 0}], str(tiny_model), tok, ref=str(other))


@pytest.mark.slow
def test_eval_cli_reports_maj_entropy_kl_and_compares(tiny_model, tmp_path):
    """`eval --data arith` (a built-in task) with --ref: results.json holds maj@k, mean_entropy, kl; the rows hold
    answer, entropy, kl, kl_k3; the model against itself has KL 0; a user JSONL dataset works too; --compare shows
    the new keys with deltas; the table on stderr lists them."""
    fast = ["--n", "4", "--max-new-tokens", "8", "--limit", "6"]
    proc = cli("eval", "--data", "arith", "--ref", str(tiny_model), "--out", "A", *fast, cwd=tmp_path)
    assert proc.stdout.strip() == "A"
    for key in ("maj@1", "maj@2", "maj@4", "mean_entropy", "kl"):
        assert key in proc.stderr
    a = json.loads((tmp_path / "A" / "results.json").read_text())
    assert {"pass@4", "maj@1", "maj@2", "maj@4", "mean_entropy", "kl", "kl_k3_per_token"} <= set(a)
    assert a["maj@1"] == pytest.approx(a["pass@1"]) and a["ref"] == str(tiny_model) and a["num_prompts"] == 6
    assert a["mean_entropy"] > 0 and a["kl"] != 0

    from tokalign import artifacts

    rows = artifacts.read(tmp_path / "A", ["eval"]).rows()
    assert len(rows) == 24 and {"answer", "entropy", "kl", "kl_k3"} <= set(rows[0])
    for r in rows:  # exact_match's answer: the whitespace-collapsed completion
        assert r["answer"] == (" ".join(r["completion"].split()) or None)

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(3)))
    cli("eval", "--data", str(data), "--model", str(tiny_model), "--ref", str(tiny_model), "--out", "B", "-q", *fast, cwd=tmp_path)
    b = json.loads((tmp_path / "B" / "results.json").read_text())
    assert b["num_prompts"] == 3 and b["kl"] == 0.0 and b["kl_k3_per_token"] == 0.0 and "maj@4" in b

    cmp = json.loads(cli("eval", "--compare", "A", "B", "--json", cwd=tmp_path).stdout)
    for key in ("maj@2", "mean_entropy", "kl"):
        assert cmp["metrics"][key]["deltas"][1] == pytest.approx(b[key] - a[key])
    assert cmp["runs"][1]["settings"]["ref"] == str(tiny_model)
    table = cli("eval", "--compare", "A", "B", cwd=tmp_path).stdout
    assert "maj@4" in table and "kl_k3_per_token" in table
