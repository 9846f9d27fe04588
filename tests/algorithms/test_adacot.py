"""AdaCoT (arXiv:2505.11896): the think-block reader on the bundled tokenizer, the trigger penalties, loss and gradient
by hand with Selective Loss Masking, zero penalties = GRPO (and PPO) bit for bit, the decision token's exactly-zero
gradient, micro-batch invariance of the masked normaliser, config and label errors, and a short run through the real
CLI (the bundled model writes no think tags: nothing is masked)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from algo_helpers import check_run, off_policy_loss_and_grad, ppo_batch, same_as_base
from conftest import cli, leaf, micro_batch_check, token_batch
from torch.testing import assert_close

from tokalign.algorithms.adacot import (
    AdaCoT,
    AdaCoTConfig,
    AdaCoTPPO,
    AdaCoTPPOConfig,
    ThinkDecision,
    ThinkRead,
    ThinkReader,
)
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.ppo import PPO, PPOConfig
from tokalign.batching import Seq, collate
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tokalign.models import BUNDLED_MODEL

    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------
# reading the think block


def test_reader_on_the_bundled_tokenizer(tok):
    """The tiny tokenizer spells <think> as 5 tokens ('<', 'th', 'i', 'nk', '>'): the decision token is completion
    token 5, the first after the tag — '1' of a non-empty block, '<' of an empty block's </think>. EOS is ignored."""
    r, eos = ThinkReader(tok), [tok.eos_token_id]
    assert r.read([1, 2], enc(tok, "<think>12+3</think>15") + eos) == ThinkRead(True, True, 5)
    assert r.read([1, 2], enc(tok, "<think></think>15") + eos) == ThinkRead(False, True, 5)
    assert r.read([1, 2], enc(tok, " <think> </think>15") + eos) == ThinkRead(False, True, 6)  # ' ' then the tag
    assert r.read([1, 2], enc(tok, "15") + eos) == ThinkRead(False, False, None)  # no block: P_fmt, nothing to mask
    assert r.read([1, 2], enc(tok, "<think>12") + eos) == ThinkRead(True, False, 5)  # never closed
    assert r.read([1, 2], enc(tok, "<think>") + eos) == ThinkRead(False, False, None)
    assert r.read([1, 2], enc(tok, "15<think>1</think>") + eos) == ThinkRead(False, False, None)  # not first
    # a prompt that opens the block: the decision is the completion's first token
    prompt = enc(tok, "1+2=<think>\n")
    assert r.read(prompt, enc(tok, "</think>3") + eos) == ThinkRead(False, True, 0)
    assert r.read(prompt, enc(tok, "ok</think>3") + eos) == ThinkRead(True, True, 0)


def test_single_token_tags_and_special_ids():
    """A tokenizer whose tags are single vocabulary tokens that are also special (dropped ids must not drop them)."""

    class Tiny:
        def __init__(self):
            self.words = {0: "<pad>", 1: "<think>", 2: "</think>", 3: "x", 4: "y", 5: "\n"}
            self.all_special_ids = [0, 1, 2]

        def get_vocab(self):
            return {w: i for i, w in self.words.items()}

        def decode(self, ids, skip_special_tokens=False):
            return "".join(self.words[i] for i in ids)

    r = ThinkReader(Tiny())
    assert r.read([3], [1, 5, 2, 4, 0]) == ThinkRead(False, True, 1)  # '\n' decides, </think> follows
    assert r.read([3], [1, 3, 3, 2, 4, 0]) == ThinkRead(True, True, 1)
    assert r.read([3, 1], [2, 4, 0]) == ThinkRead(False, True, 0)  # the prompt ends with <think>


# ---------------------------------------------------------------------------------------------------
# the penalties and SLM by hand

LENGTHS = [3, 2, 4, 2, 3]
REWARDS = [1.0, 1.0, 0.0, 1.0, 0.5]
GROUPS = [0, 0, 1, 1, 1]
NEEDS = [1.0, 1.0, -1.0, -1.0, 0.0]
TRIGGERED = [1.0, 0.0, 1.0, 0.0, 1.0]
FORMAT_OK = [1.0, 1.0, 1.0, 0.0, 1.0]
DECISION = [0, 0, 1, None, 0]  # column of each row's decision token (row 3 has no think block)


def _batch(old=None, needs=True, decision=DECISION):
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in LENGTHS])
    d = torch.zeros(5, 4)
    for i, k in enumerate(decision):
        if k is not None:
            d[i, k] = 1.0
    f = {"rewards": torch.tensor(REWARDS), "group_ids": torch.tensor(GROUPS), "cot_triggered": torch.tensor(TRIGGERED),
         "cot_format_ok": torch.tensor(FORMAT_OK), "cot_decision": d}
    if needs:
        f["needs_cot"] = torch.tensor(NEEDS)
    if old is not None:
        f["old_logps"] = old
    return token_batch(mask, f, {"tokens": float(mask.sum()), "seqs": 5.0, "max_completion_len": 4.0})


def test_penalties_loss_and_gradient_by_hand():
    """α₁ = ½, α₂ = ¼, γ = 1, scale none, SLM on.
    P_miss = 0 1 0 0 0 (row 1: needed, not thought), P_over = 0 0 1 0 0 (row 2: thought, not needed), P_fmt = 0 0 0 1 0
    (row 3: no block; labelled 'not needed' and not triggered, so no P_over); row 4 is unlabelled: no penalty.
    R' = 1, 1 − ½ | 0 − ¼, 1 − 1, ½ = 1, ½ | −¼, 0, ½.  Group means ¾ and ¼/3 = 1/12:
    A = ¼, −¼ | −1/3, −1/12, 5/12.
    SLM masks the decision tokens of rows 0, 1, 2, 4 (row 3 has none): tokens left n' = 2, 1, 3, 2, 2, N' = 14 − 4 = 10.
    On policy, token-mean: loss = −Σ A_i n'_i / N' = −(½ − ¼ − 1 − 1/6 + 5/6) / 10 = (1/12) / 10 = 1/120;
    ∂loss/∂logp_it = −A_i / 10 on the kept tokens, exactly 0 on the decision tokens and the padding."""
    algo = AdaCoT(AdaCoTConfig(miss_penalty=0.5, over_penalty=0.25, format_penalty=1.0, selective_loss_masking=True,
                               scale_rewards="none"))
    old = -torch.rand(5, 4, generator=torch.Generator().manual_seed(3))
    batch = algo.prepare(_batch(old=old))
    assert_close(batch.fields["raw_rewards"], torch.tensor(REWARDS))
    assert_close(batch.fields["adacot_penalty"], torch.tensor([0.0, 0.5, 0.25, 1.0, 0.0]))
    assert_close(batch.fields["rewards"], torch.tensor([1.0, 0.5, -0.25, 0.0, 0.5]))
    adv = [0.25, -0.25, -1 / 3, -1 / 12, 5 / 12]
    assert_close(batch.fields["advantages"], torch.tensor(adv))
    kept = torch.tensor([[0.0, 1, 1, 0], [0, 1, 0, 0], [1, 0, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]])
    assert torch.equal(batch.completion_mask, kept)
    assert batch.totals["tokens"] == 10.0 and batch.totals["seqs"] == 5.0 and batch.totals["max_completion_len"] == 4.0
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(1 / 120, rel=1e-5)
    assert_close(lp.grad, torch.tensor(adv).unsqueeze(-1) * kept / -10, rtol=1e-6, atol=1e-9)
    assert lp.grad[_batch().fields["cot_decision"].bool()].eq(0).all()
    m = out.metrics
    assert m["adacot/miss_rate"] == pytest.approx(0.2) and m["adacot/over_rate"] == pytest.approx(0.2)
    assert m["adacot/labelled"] == pytest.approx(0.8) and m["adacot/decision_masked"] == 4.0
    assert m["adacot/penalty_mean"] == pytest.approx(1.75 / 5)


def test_slm_off_keeps_every_token():
    """SLM off: the mask and the token count are untouched, and the decision token gets −A_i/N (N = 14) like any."""
    algo = AdaCoT(AdaCoTConfig(miss_penalty=0.5, over_penalty=0.25, scale_rewards="none"))
    old = -torch.rand(5, 4, generator=torch.Generator().manual_seed(4))
    batch = algo.prepare(_batch(old=old))
    assert torch.equal(batch.completion_mask, _batch().completion_mask) and batch.totals["tokens"] == 14.0
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    adv = batch.fields["advantages"].unsqueeze(-1)
    assert_close(lp.grad, -adv * batch.completion_mask / 14)
    assert float(lp.grad[0, 0]) == pytest.approx(-0.25 / 14)  # row 0's decision token
    assert out.metrics["adacot/decision_masked"] == 0.0


def test_unlabelled_rows_get_only_the_format_penalty():
    """No needs_cot field: P_miss = P_over = 0; R' = R − γ P_fmt = 1, 1 | 0, 1 − 1, ½."""
    batch = AdaCoT(AdaCoTConfig()).prepare(_batch(needs=False))
    assert_close(batch.fields["rewards"], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5]))


def test_bad_labels_are_refused():
    batch = _batch()
    batch.fields["needs_cot"] = torch.tensor([1.0, 0.5, -1.0, 0.0, 2.0])
    with pytest.raises(UserError, match=r"needs_cot.*\[0\.5, 2\.0\]"):
        AdaCoT(AdaCoTConfig()).prepare(batch)


# ---------------------------------------------------------------------------------------------------
# limits: GRPO and PPO bit for bit


@pytest.mark.parametrize("slm,decision,needs", [(False, DECISION, True), (False, DECISION, False), (True, [None] * 5, True)],
                         ids=["labels", "no-labels", "slm-nothing-found"])
def test_zero_penalties_is_grpo_bit_for_bit(slm, decision, needs):
    """α₁ = α₂ = γ = 0 with SLM off — or SLM on where no decision token was found (the bundled model) — is GRPO."""
    torch.manual_seed(0)
    values = -torch.rand(5, 4) * 3
    old = values + 0.3 * torch.randn(5, 4)
    cfg = {"miss_penalty": 0.0, "over_penalty": 0.0, "format_penalty": 0.0, "selective_loss_masking": slm, "beta": 0.04}
    same_as_base([AdaCoT(AdaCoTConfig(**cfg)), GRPO(GRPOConfig(beta=0.04))],
                 lambda: _batch(old=old.clone(), needs=needs, decision=decision), values)


def _ppo_batch(decision):
    batch = ppo_batch([1.0, 0.0, 0.5], [[1.0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]],
                      old_values=[[0.1, 0.2, 0.3, 0.0], [0.0, -0.1, 0.0, 0.0], [0.0, 0.2, 0.1, 0.4]])
    batch.totals["max_completion_len"] = 3.0
    d = torch.zeros(3, 4)
    for i, k in enumerate(decision):
        if k is not None:
            d[i, k] = 1.0
    batch.fields.update(cot_triggered=torch.tensor([1.0, 0.0, 1.0]), cot_format_ok=torch.tensor([1.0, 1.0, 0.0]),
                        needs_cot=torch.tensor([1.0, 1.0, -1.0]), cot_decision=d)
    return batch


def _ppo_run(algo, batch, seed=5):
    g = torch.Generator().manual_seed(seed)
    batch = algo.prepare(batch)
    lp, v = leaf(0.2 * torch.randn(3, 4, generator=g)), leaf(0.3 * torch.randn(3, 4, generator=g))
    out = algo.loss(batch, PolicyOutput(lp, values=v))
    out.loss.backward()
    return batch, out.loss.detach(), lp.grad, v.grad


def test_adacot_ppo_limit_and_slm():
    """AdaCoTPPO with zero penalties and SLM off is PPO bit for bit; with SLM the decision tokens' policy and value
    gradients are exactly 0 and the rows' penalties reach the returns."""
    base = PPOConfig(kl_coef=0.0)
    zero = {"miss_penalty": 0.0, "over_penalty": 0.0, "format_penalty": 0.0}
    a = _ppo_run(AdaCoTPPO(AdaCoTPPOConfig(kl_coef=0.0, **zero)), _ppo_batch([0, 0, 1]))
    b = _ppo_run(PPO(base), _ppo_batch([0, 0, 1]))
    for x, y in zip(a[1:], b[1:]):
        assert torch.equal(x, y)
    for k in ("advantages", "returns"):
        assert torch.equal(a[0].fields[k], b[0].fields[k])
    batch, _, g_lp, g_v = _ppo_run(AdaCoTPPO(AdaCoTPPOConfig(kl_coef=0.0, selective_loss_masking=True)), _ppo_batch([0, 0, 1]))
    decision = _ppo_batch([0, 0, 1]).fields["cot_decision"].bool()
    assert g_lp[decision].eq(0).all() and g_v[decision].eq(0).all()
    assert batch.totals["tokens"] == 8.0 - 3.0
    assert_close(batch.fields["rewards"], torch.tensor([1.0, 0.0 - 0.3, 0.5 - 0.3 - 1.0]))  # miss; over + format


# ---------------------------------------------------------------------------------------------------
# the real pipeline: the component on collated sequences


def _seqs(tok):
    eos = [tok.eos_token_id]
    texts = ["<think>1+2</think>3", "<think></think>3", "3", "<think>ok</think>4", "<think>2+2=4</think>4", "<think></think>5"]
    needs = [1.0, 1.0, 0.0, -1.0, 0.0, -1.0]
    rewards = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    g = torch.Generator().manual_seed(7)
    seqs = []
    for i, (t, n, r) in enumerate(zip(texts, needs, rewards)):
        ids = enc(tok, t) + eos
        pol = -torch.rand(len(ids), generator=g) * 2
        seqs.append(Seq([1] * (1 + i % 2) + [2], ids, i // 2, row={"rewards": r, "needs_cot": n},
                        token={"pol": pol.tolist(), "old_logps": (pol + 0.2 * torch.randn(len(ids), generator=g)).tolist()}))
    return seqs


def _filled(tok, seqs):
    batch = collate(seqs, pad_id=0)
    metrics = ThinkDecision().fill(batch, SimpleNamespace(tokenizer=tok, seqs=seqs))
    return batch, metrics


def test_the_decision_token_is_masked_and_gets_exactly_zero_gradient(tok):
    seqs = _seqs(tok)
    batch, metrics = _filled(tok, seqs)
    assert batch.fields["cot_triggered"].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert batch.fields["cot_format_ok"].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    where = batch.fields["cot_decision"].nonzero().tolist()  # completion token 5 at column len(prompt) − 1 + 5
    assert where == [[i, len(s.prompt_ids) - 1 + 5] for i, s in enumerate(seqs) if i != 2]
    assert metrics == {"adacot/trigger_rate": 0.5, "adacot/format_ok": pytest.approx(5 / 6),
                       "adacot/decision_found": pytest.approx(5 / 6)}
    tokens = batch.totals["tokens"]
    algo = AdaCoT(AdaCoTConfig(selective_loss_masking=True))
    batch = algo.prepare(batch)
    decision = batch.fields["cot_decision"].bool()
    assert batch.completion_mask[decision].eq(0).all() and batch.totals["tokens"] == tokens - 5
    _, grad = off_policy_loss_and_grad(algo, batch, seed=2)
    assert grad[decision].eq(0).all()  # exactly zero
    kept = batch.completion_mask.bool()
    assert grad[kept].ne(0).float().mean() > 0.5  # the rest learn (rows of zero advantage excepted)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_masked_normaliser_is_micro_batch_invariant(tok, aggregation):
    """With SLM the micro-batch losses and gradients (groups kept whole, 2 rows each) add up to the full batch's."""
    batch, _ = _filled(tok, _seqs(tok))
    algo = AdaCoT(AdaCoTConfig(selective_loss_masking=True, aggregation=aggregation, beta=0.0))
    algo.prepare(batch)
    full, summed, full_grad, mb_grad, n = micro_batch_check(algo, batch)
    assert n == 3
    assert_close(summed, full)
    assert_close(mb_grad, full_grad)
    assert float(full_grad.abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("name,value", [("miss_penalty", -0.1), ("over_penalty", math.nan), ("format_penalty", math.inf),
                                        ("think_open", ""), ("think_close", " </think>")])
def test_config_errors(name, value):
    for cfg in (AdaCoTConfig, AdaCoTPPOConfig):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            cfg(**{name: value})


def test_config_equal_tags_and_base_checks():
    with pytest.raises(ValueError, match="think_open and think_close must differ"):
        AdaCoTConfig(think_open="<t>", think_close="<t>")
    with pytest.raises(ValueError, match="aggregation must be one of"):  # GRPO's own checks still run
        AdaCoTConfig(aggregation="nope")
    with pytest.raises(ValueError, match="gamma and lam"):  # and PPO's
        AdaCoTPPOConfig(gamma=2.0)


# ---------------------------------------------------------------------------------------------------
# the real CLI


@pytest.mark.slow
def test_cli_adacot(tmp_path):
    out = tmp_path / "adacot"
    cli("train", "adacot", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2",
        "--set", "algorithm.selective_loss_masking=true", "--out", str(out), "--quiet")
    metrics = check_run(out)
    # the bundled model writes no think tags: no block, no decision token, nothing masked, P_fmt = 1 for every row
    for m in metrics:
        assert m["adacot/decision_found"] == 0 and m["adacot/decision_masked"] == 0 and m["adacot/format_ok"] == 0
        assert m["adacot/penalty_mean"] == pytest.approx(1.0)
