"""Value Augmented Sampling (tokalign.decoding.vas, tokalign.algorithms.vas): the processor's logits by hand on a fake
value model, β = 0 leaves logits (and the HF engine's samples) unchanged bit for bit, the value model's left-padded
batch equals one sequence at a time, the TD(λ) regression by hand, and through the CLI: a value model that rates one
token +100 makes `rollout --logits-processor vas` sample only it; `train vas` on scored rollouts lowers its loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cli, token_batch

from tokalign import artifacts, decoding
from tokalign.algorithms.vas import VAS as VASAlgo
from tokalign.algorithms.vas import VASConfig as VASAlgoConfig
from tokalign.decoding.vas import HEAD_FILE, VAS, ValueModel, VASConfig
from tokalign.protocols import PolicyOutput

PROC = "tokalign.decoding.vas:VAS"
ALGO = "tokalign.algorithms.vas:VAS"


class LastToken:
    """A fake value model: V(seq) = last token id + 10 · len(seq); records the sequences it was given."""

    def __init__(self):
        self.seen: list[list[int]] = []

    def __call__(self, sequences):
        self.seen += [list(s) for s in sequences]
        return torch.tensor([s[-1] + 10.0 * len(s) for s in sequences])


def processor(beta: float, topk: int, batch_rows: int = 64) -> VAS:
    proc = VAS(VASConfig(model="unused", beta=beta, topk=topk, batch_rows=batch_rows))
    proc.value = LastToken()
    return proc


def test_processor_by_hand():
    """Row 0: z = [1, 2, 3, 0, −1], k = 2 → candidates 2 (z 3) and 1 (z 2); s = [7] ⊕ [8], so Q(2) = 2 + 30 = 32,
    Q(1) = 1 + 30 = 31, mean 31.5 → Q̃ = +0.5, −0.5; β = 2: z' = [1, 2 − 1, 3 + 1, 0, −1] = [1, 1, 4, 0, −1].
    Row 1: z = [−inf, −inf, −inf, −inf, 5] (four banned), k = 2 → candidates 4 (z 5) and one −inf; only 4 is
    allowed, so the mean is Q(4) alone: Q̃ = 0 → z' = z (the −inf ones stay −inf)."""
    proc = processor(beta=2.0, topk=2, batch_rows=3)  # 4 candidate sequences in forwards of ≤ 3
    inf = float("-inf")
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0, -1.0], [inf, inf, inf, inf, 5.0]])
    out = proc(logits.clone(), [[7], [5, 6]], [[8], []])
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 4.0, 0.0, -1.0], [inf, inf, inf, inf, 5.0]]))
    assert proc.value.seen[:2] == [[7, 8, 2], [7, 8, 1]] and proc.value.seen[2][:2] == [5, 6] and len(proc.value.seen) == 4


def test_beta_zero_is_plain_sampling_bit_for_bit():
    """β = 0: the logits come back untouched (same object, same bits) and the value model is never asked."""
    proc = processor(beta=0.0, topk=3)
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = proc(logits, [[1]] * 3, [[2]] * 3)
    assert out is logits and torch.equal(out, before) and proc.value.seen == []


def test_beta_zero_in_the_hf_engine_samples_as_plain():
    from tokalign import models
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.hf import HFEngine

    tok, model = models.load_tokenizer(""), models.load_model("")
    prompts = [tok.encode("3+4=", add_special_tokens=False), tok.encode("12+9=", add_special_tokens=False)]
    spec = SamplingSpec(n=2, temperature=1.0, max_new_tokens=6)
    chain = decoding.resolve([PROC], {PROC: {"model": "unused", "beta": 0.0}}).bind(tok)  # β = 0 loads nothing
    torch.manual_seed(0)
    plain = HFEngine(model, tok).generate(prompts, spec)
    torch.manual_seed(0)
    steered = HFEngine(model, tok, processors=chain).generate(prompts, spec)
    assert [[c.ids for c in g] for g in plain] == [[c.ids for c in g] for g in steered]
    assert [[c.logps for c in g] for g in plain] == [[c.logps for c in g] for g in steered]


def test_config_validation_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="vas.model"):
        VASConfig()
    with pytest.raises(ValueError, match="topk"):
        VASConfig(model="m", topk=0)
    from tokalign.errors import UserError

    with pytest.raises(UserError, match="train vas"):
        ValueModel.load(str(tmp_path))
    assert VASConfig(model="m").beta == 1.0 and VASConfig(model="m").topk == 20  # the official defaults


def test_head_file_is_the_critic_heads():
    from tokalign.components import value_head

    assert HEAD_FILE == value_head.FILE


def test_value_model_left_padding_matches_one_sequence_at_a_time(tiny_model):
    """V of sequences of different lengths in one left-padded forward = each alone (position ids from the mask)."""
    from tokalign import models

    torch.manual_seed(0)
    model = models.load_model(str(tiny_model))
    head = torch.nn.Linear(model.config.hidden_size, 1)
    value = ValueModel(model, head)
    seqs = [[5, 9, 11, 3], [7, 2], [4, 4, 4, 4, 4, 8]]
    together = value(seqs)
    alone = torch.cat([value([s]) for s in seqs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    with torch.no_grad():  # and alone = the head on the plain forward's last hidden state
        h = model(torch.tensor([seqs[1]]), output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(alone[1], head(h).squeeze(-1), atol=1e-5, rtol=0)


def test_td_lambda_regression_by_hand():
    """One row of 3 tokens, R = 2, V^old = [0.5, 1, 1.5], γ = 1, λ = 0.5:
    δ = [0 + 1 − 0.5, 0 + 1.5 − 1, 2 + 0 − 1.5] = [0.5, 0.5, 0.5]; A_2 = 0.5, A_1 = 0.5 + 0.5·0.5 = 0.75,
    A_0 = 0.5 + 0.5·0.75 = 0.875; G = A + V^old = [1.375, 1.75, 2.0].
    With V = [1, 2, 2]: L = ½ · mean((1 − 1.375)², (2 − 1.75)², 0²) = ½ · (0.140625 + 0.0625) / 3 = 0.033854…
    Limit λ = 1 (or V^old = 0): G = R = 2 at every token (Monte-Carlo)."""
    fields = {"rewards": torch.tensor([2.0]), "old_values": torch.tensor([[0.5, 1.0, 1.5]])}
    algo = VASAlgo(VASAlgoConfig(gamma=1.0, lam=0.5))
    batch = algo.prepare(token_batch([[1, 1, 1]], dict(fields), {"tokens": 3, "seqs": 1}))
    torch.testing.assert_close(batch.fields["returns"], torch.tensor([[1.375, 1.75, 2.0]]))
    values = torch.tensor([[1.0, 2.0, 2.0]], requires_grad=True)
    res = algo.loss(batch, PolicyOutput(torch.zeros(1, 3), values=values))
    assert float(res.loss.detach()) == pytest.approx(0.5 * (0.140625 + 0.0625) / 3)
    res.loss.backward()  # ∂L/∂V_t = (V_t − G_t) / 3
    torch.testing.assert_close(values.grad, torch.tensor([[-0.375, 0.25, 0.0]]) / 3)
    mc = VASAlgo(VASAlgoConfig(lam=1.0)).prepare(token_batch([[1, 1, 1]], dict(fields), {"tokens": 3, "seqs": 1}))
    torch.testing.assert_close(mc.fields["returns"], torch.full((1, 3), 2.0))


def one_token_value_model(path, token: int, bonus: float = 100.0):
    """The bundled model's architecture as a value model that rates `token` +bonus and every other token 0: the blocks'
    output projections zeroed (the final hidden state is the normed embedding of the last token), every embedding's
    coordinate 0 zeroed but the target's, whose embedding is e_0: RMSNorm makes it √H·w_0 e_0; the head reads
    coordinate 0 scaled to `bonus`."""
    from safetensors.torch import save_file

    from tokalign import models

    model = models.load_model("")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 0.0
        emb[token] = 0.0
        emb[token, 0] = 1.0
        scale = math.sqrt(model.config.hidden_size) * float(model.model.norm.weight[0])
        weight = torch.zeros(1, model.config.hidden_size)
        weight[0, 0] = bonus / scale
    model.save_pretrained(path)
    models.load_tokenizer("").save_pretrained(path)
    save_file({"weight": weight, "bias": torch.zeros(1)}, str(path / HEAD_FILE))
    value = ValueModel.load(str(path))
    got = value([[3, 4, token], [3, 4, token + 1]])
    torch.testing.assert_close(got, torch.tensor([bonus, 0.0]), atol=0.05, rtol=0)  # RMSNorm eps: ≈ bonus


@pytest.mark.slow
def test_rollout_cli_samples_the_token_the_value_model_rates(tmp_path):
    """Top-k = the whole vocabulary (so the target is always a candidate), β = 1: the target's logit gains ≈ 100 and it
    is sampled at every position (the plain rollout of the bundled model does not do that)."""
    from tokalign import models

    tok = models.load_tokenizer("")
    target = tok.get_vocab()["7"]
    one_token_value_model(tmp_path / "V", target)
    cli("prepare", "arith", "--limit", "4", "--out", str(tmp_path / "P"))
    cli("rollout", str(tmp_path / "P"), "--n", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "R"),
        "--logits-processor", PROC, "--processor-opt", f"{PROC}.model={tmp_path / 'V'}",
        "--processor-opt", f"{PROC}.topk={len(tok)}", "--processor-opt", f"{PROC}.beta=1.0")
    rows = artifacts.read(tmp_path / "R", ["rollouts"]).rows()
    assert len(rows) == 8 and all(list(r["completion_ids"]) == [target] * 6 for r in rows)
    manifest = json.loads((tmp_path / "R" / "manifest.json").read_text())
    assert manifest["config"]["logits_processors"][0]["options"]["beta"] == 1.0


@pytest.mark.slow
def test_train_vas_through_the_cli_lowers_its_loss_and_decodes(tmp_path):
    """Scored rollouts of the frozen bundled model; the value model (the bundled model's copy + a zero head) regresses
    the exact-match reward: the first step's loss is ½·mean(G²) with V = 0 and falls over steps on the same batch; the
    checkpoint then steers a rollout through the `vas` processor."""
    cli("prepare", "arith", "--limit", "4", "--out", "P", cwd=tmp_path)
    cli("rollout", "P", "--n", "2", "--max-new-tokens", "8", "--out", "R", cwd=tmp_path)
    cli("score", "R", "--reward", "exact_match", "--out", "S", cwd=tmp_path)
    cli("train", ALGO, "--data", "S", "--max-steps", "6", "--batch-size", "4", "--out", "V", "--quiet",
        "--set", "train.lr=1e-3", cwd=tmp_path)
    metrics = [json.loads(x) for x in (tmp_path / "V" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["vf_loss"] for m in metrics]
    assert all(math.isfinite(x) for x in losses) and len(losses) == 6
    assert losses[0] > 0 and losses[-1] < losses[0], losses
    assert (tmp_path / "V" / HEAD_FILE).is_file()
    cli("rollout", "P", "--n", "2", "--max-new-tokens", "4", "--out", "R2", "--logits-processor", PROC,
        "--processor-opt", f"{PROC}.model=V", "--processor-opt", f"{PROC}.topk=5", cwd=tmp_path)
    rows = artifacts.read(tmp_path / "R2", ["rollouts"]).rows()
    assert len(rows) == 8 and all(all(lp > float("-inf") for lp in r["sampler_logps"]) for r in rows)
