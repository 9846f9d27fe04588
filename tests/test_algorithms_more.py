"""PURE, MODPO, Single-stream PO and Reinforce-Ada: hand cases (expected numbers worked out in each docstring),
limiting cases from /work/shared/reference/algorithms.md, and a slow run of each through the real CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import CLI_ENV, ROOT, cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.dpo import DPO, DPOConfig
from tokalign.algorithms.modpo import MODPO, MODPOConfig
from tokalign.algorithms.pure import PURE, PUREConfig, min_form_weights, step_lengths
from tokalign.algorithms.reinforce_ada import ReinforceAda, ReinforceAdaConfig, Selection
from tokalign.algorithms.sspo import SSPO, SSPOConfig
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput

# ---------------------------------------------------------------------------------------------------
# PURE


def test_pure_min_form_is_soft_minimum():
    """r = (0.9, −0.5, 0.8) on three step ends: as T → 0, Σ_k softmax(−r/T)_k r_k → min r = −0.5. At T = 1 the
    weights are softmax(−0.9, 0.5, −0.8) = (0.1673, 0.6784, 0.1849)/…, worked out below."""
    r = torch.tensor([[0.9, 0.0, -0.5, 0.8]])
    steps = r != 0
    assert_close((min_form_weights(r, steps, 1e-3) * r).sum(), torch.tensor(-0.5))
    e = [math.exp(-0.9), math.exp(0.5), math.exp(-0.8)]
    w = [x / sum(e) for x in e]
    assert_close(min_form_weights(r, steps, 1.0), torch.tensor([[w[0], 0.0, w[1], w[2]]]))
    assert_close(min_form_weights(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool), 0.1), torch.zeros(1, 3))


def test_pure_step_lengths():
    """Completion tokens per step: steps end at t = 1 and 4 of a 5-token completion that starts at t = 0 → 2 and 3."""
    mask = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    steps = torch.tensor([[False, True, False, False, True, False]])
    assert_close(step_lengths(steps, mask), torch.tensor([[0.0, 2, 0, 0, 3, 0]]))


def _pure_batch():
    """G = 2, two tokens each. Row 0: one step (score 0.5 at t = 1), verifiable 1 → R = 1.5. Row 1: two steps (0.2,
    −0.4), verifiable 0 → R = −0.2."""
    return token_batch(torch.ones(2, 2), {"token_rewards": torch.tensor([[0.0, 0.5], [0.2, -0.4]]),
                                          "rewards": torch.tensor([1.5, -0.2]), "group_ids": torch.tensor([0, 0])})


def test_pure_step_baseline_hand():
    """Summation (min_form false), step baseline: per-step means (0.5, −0.1), leave-one-out → baselines (−0.1, 0.5):
    row 0 (0, 0.6), row 1 (−0.3, −0.9); verifiable v = (1, 0) → LOO (1, −1) on the last token: (0, 1.6), (−0.3, −1.9);
    returns (1.6, 1.6), (−2.2, −1.9)."""
    batch = PURE(PUREConfig(min_form=False, baseline="step")).prepare(_pure_batch())
    assert_close(batch.fields["advantages"], torch.tensor([[1.6, 1.6], [-2.2, -1.9]]))


def test_pure_token_baseline_hand():
    """Token baseline: the others' reward per token, row 0: −0.2/2 = −0.1, row 1: 0.5/2 = 0.25, times the step's length
    (row 0: one step of 2 tokens; row 1: two of 1): row 0 (0, 0.7), row 1 (−0.05, −0.65); plus v: (0, 1.7),
    (−0.05, −1.65); returns (1.7, 1.7), (−1.7, −1.65)."""
    batch = PURE(PUREConfig(min_form=False)).prepare(_pure_batch())
    assert_close(batch.fields["advantages"], torch.tensor([[1.7, 1.7], [-1.7, -1.65]]))


def test_pure_min_form_changes_only_the_process_part():
    """Min-form with T = 0.1 on row 1's steps (0.2, −0.4): w ∝ (e^−2, e^4) → r' ≈ (0.2·0.00247, −0.4·0.99753); row 0's
    single step keeps weight 1. The verifiable remainder v = R − Σ raw token values is unchanged, and a loss step is
    finite with gradient −A_t/… (GRPO's surrogate)."""
    algo = PURE(PUREConfig(baseline="step", verifiable_coef=0.0))
    batch = algo.prepare(_pure_batch())
    w = torch.softmax(torch.tensor([-2.0, 4.0]), 0)
    r1 = torch.tensor([0.2, -0.4]) * w
    per_step = torch.tensor([0.5, float(r1.sum()) / 2])
    expected_row1 = r1 - per_step[0]
    returns1 = torch.tensor([expected_row1.sum(), expected_row1[1]])
    assert_close(batch.fields["advantages"][1], returns1)
    batch.fields["old_logps"] = torch.zeros(2, 2)
    lp = leaf(torch.zeros(2, 2))
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    assert_close(lp.grad, -batch.fields["advantages"] / 4)


def test_pure_without_token_rewards_is_a_user_error():
    batch = token_batch(torch.ones(2, 2), {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])})
    with pytest.raises(UserError, match="per-token process reward"):
        PURE(PUREConfig()).prepare(batch)


# ---------------------------------------------------------------------------------------------------
# MODPO


def _pair_batch(fields):
    return token_batch(torch.ones(2, 1), {"is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                          "ref_logps": torch.zeros(2, 1), **fields}, {"groups": 1.0})


def test_modpo_hand_with_data_margins():
    """β = 0.1, w = (0.5, 0.5), Δ_w = 2, Δ_l = −1, m_w = 0.2, m_l = 0: r_w = (0.2 − 0.1)/0.5 = 0.2,
    r_l = (−0.1 − 0)/0.5 = −0.2, L = −log σ(0.4) = 0.513015."""
    algo = MODPO(MODPOConfig(margin_source="data"))
    assert algo.needs.models == () and algo.needs.reference
    batch = algo.prepare(_pair_batch({"margin_0": torch.tensor([0.2, 0.0])}))
    out = algo.loss(batch, PolicyOutput(leaf([[2.0], [-1.0]])))
    assert_close(out.loss, torch.tensor(math.log1p(math.exp(-0.4))))


def test_modpo_no_margins_w0_1_is_dpo():
    """No margin objectives and w_0 = 1: MODPO ≡ DPO (loss and gradients)."""
    torch.manual_seed(0)
    pol = torch.randn(2, 3)
    batch = _pair_batch({"ref_logps": torch.randn(2, 3)})
    batch.completion_mask = torch.ones(2, 3)
    algo = MODPO(MODPOConfig(weights=[1.0], margin_source="data"))
    a, b = leaf(pol), leaf(pol)
    la = algo.loss(algo.prepare(batch), PolicyOutput(a)).loss
    lb = DPO(DPOConfig()).loss(batch, PolicyOutput(b)).loss
    la.backward()
    lb.backward()
    assert_close(la, lb)
    assert_close(a.grad, b.grad)


def test_modpo_margin_model_is_its_implicit_reward():
    """margin_source model: m(y) = β_m Σ_t (ℓ^margin − ℓ^ref) = 0.1·(3 − 0) = 0.3 for the chosen row, 0.1·(−1) for the
    rejected; the loss then uses those as data margins would."""
    algo = MODPO(MODPOConfig(margin_beta=0.1))
    assert algo.needs.models == ("margin",)
    batch = algo.prepare(_pair_batch({"margin_logps": torch.tensor([[3.0], [-1.0]])}))
    assert_close(batch.fields["margins"], torch.tensor([[0.3], [-0.1]]))
    data = MODPO(MODPOConfig(margin_source="data")).prepare(_pair_batch({"margin_0": torch.tensor([0.3, -0.1])}))
    pol = leaf([[1.0], [0.5]])
    assert_close(algo.loss(batch, PolicyOutput(pol)).loss, MODPO(MODPOConfig(margin_source="data")).loss(data, PolicyOutput(pol)).loss)


def test_modpo_validation():
    with pytest.raises(ValueError, match="w_0"):
        MODPOConfig(weights=[0.0, 1.0])
    with pytest.raises(ValueError, match="one margin objective"):
        MODPOConfig(weights=[0.5, 0.3, 0.2])
    with pytest.raises(UserError, match="chosen_margins"):
        MODPO(MODPOConfig(margin_source="data")).prepare(_pair_batch({}))


# ---------------------------------------------------------------------------------------------------
# Single-stream PO


def test_sspo_hand_advantages_and_tracker():
    """Unseen prompts: p̂ = 0.5. R = (1, 0, 1) for prompts (0, 1, 0): A = (0.5, −0.5, 0.5) → batch-normalised
    (unbiased std 1/√3 of deviations (1/3, −2/3, 1/3)) = (0.57735, −1.15470, 0.57735). Tracker, ρ = 0.96, row by row:
    prompt 0: (0.96·0.5 + 1, 0.96·0.5) = (1.48, 0.48) then (0.96·1.48 + 1, 0.96·0.48) = (2.4208, 0.4608);
    prompt 1: (0.48, 1.48)."""
    algo = SSPO(SSPOConfig())
    assert not algo.needs.groups
    batch = token_batch(torch.ones(3, 1), {"rewards": torch.tensor([1.0, 0.0, 1.0]), "prompt_index": torch.tensor([0, 1, 0]),
                                           "group_ids": torch.tensor([0, 1, 2])})
    algo.prepare(batch)
    s = 1 / math.sqrt(3)
    assert_close(batch.fields["advantages"], torch.tensor([(1 / 3) / s, (-2 / 3) / s, (1 / 3) / s]))
    assert algo.tracker[0] == pytest.approx((2.4208, 0.4608))
    assert algo.tracker[1] == pytest.approx((0.48, 1.48))
    assert algo.prompt_weights(3)[2] == pytest.approx(0.55)  # unseen: √(0.25) + 0.05
    clone = SSPO(SSPOConfig())
    clone.load_state_dict(json.loads(json.dumps(algo.state_dict())))
    assert clone.tracker == algo.tracker


def test_sspo_constant_reward_drives_p_hat_to_r():
    """Constant R = 1 and ρ: α → 1/(1 − ρ), β → 0, so p̂ → 1 and the raw advantage R − p̂ → 0."""
    algo = SSPO(SSPOConfig())
    for _ in range(400):
        algo.prepare(token_batch(torch.ones(1, 1), {"rewards": torch.tensor([1.0]), "prompt_index": torch.tensor([0]),
                                                    "group_ids": torch.tensor([0])}))
    assert 1 - algo.p_hat(0) < 1e-6


# ---------------------------------------------------------------------------------------------------
# Reinforce-Ada


def _pool(rewards):
    return [{"id": str(i), "reward": r} for i, r in enumerate(rewards)]


def test_reinforce_ada_balanced_selection():
    """n = 4, balanced: needs 2 positives (R ≥ 0.7) and 2 negatives. (1, 1, 1) → keep sampling; (1, 1, 0, 1, 0) →
    2 positives + 2 negatives; at the last round (1, 1, 1) keeps what it has."""
    a = Selection("balanced", 4, 4, 0.7)
    assert a.select(_pool([1, 1, 1]), 4, final=False) is None
    chosen = a.select(_pool([1, 1, 0, 1, 0]), 4, final=False)
    assert [r["reward"] for r in chosen] == [1, 1, 0, 0]
    assert [r["reward"] for r in a.select(_pool([1, 1, 1]), 4, final=True)] == [1, 1, 1]
    assert [r["reward"] for r in a.select(_pool([1, 0, 0, 0, 0]), 4, final=True)] == [1, 0, 0, 0]


def test_reinforce_ada_positive_focused_selection():
    a = Selection("positive_focused", 4, 4, 0.7)
    assert a.select(_pool([0, 0, 0, 0]), 4, final=False) is None
    assert [r["reward"] for r in a.select(_pool([0, 0, 1, 0, 0]), 4, final=False)] == [1, 0, 0, 0]


def test_reinforce_ada_pool_baseline():
    """A = R − mean_pool (scale_rewards none): pool mean 0.25 → (0.75, −0.25); with group scaling ÷ (pool std + 1e-6).
    Without pool fields (offline scored data) it is GRPO's group advantage."""
    f = {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]), "pool_mean": torch.tensor([0.25, 0.25]),
         "pool_std": torch.tensor([0.5, 0.5])}
    batch = ReinforceAda(ReinforceAdaConfig()).prepare(token_batch(torch.ones(2, 1), dict(f)))
    assert_close(batch.fields["advantages"], torch.tensor([0.75, -0.25]))
    batch = ReinforceAda(ReinforceAdaConfig(scale_rewards="group")).prepare(token_batch(torch.ones(2, 1), dict(f)))
    assert_close(batch.fields["advantages"], torch.tensor([0.75, -0.25]) / (0.5 + 1e-6))
    del f["pool_mean"], f["pool_std"]
    batch = ReinforceAda(ReinforceAdaConfig()).prepare(token_batch(torch.ones(2, 1), f))
    assert_close(batch.fields["advantages"], torch.tensor([0.5, -0.5]))


# ---------------------------------------------------------------------------------------------------
# the real CLI

STEP_REWARD = '''
from tokalign.protocols import Reward

class Steps:
    """A per-token test reward: +0.5 on even completion tokens after the first, -0.25 on odd ones, 0 on token 0."""
    def __call__(self, samples):
        out = []
        for s in samples:
            vals = [0.0] + [0.5 if i % 2 == 0 else -0.25 for i in range(1, len(s.completion_ids))]
            out.append(Reward(sum(vals), vals))
        return out
'''


def _weights_changed(out) -> bool:
    from safetensors.torch import load_file

    from tokalign.models import BUNDLED_MODEL

    base, trained = load_file(BUNDLED_MODEL / "model.safetensors"), load_file(out / "model.safetensors")
    return max(float((trained[k] - base[k]).abs().max()) for k in base) > 0


def _check_run(out, steps=2):
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert _weights_changed(out)
    return metrics


@pytest.mark.slow
def test_cli_pure_with_a_token_level_reward(tmp_path):
    (tmp_path / "steps_reward.py").write_text(STEP_REWARD)
    out = tmp_path / "pure"
    env = {**CLI_ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{CLI_ENV.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "tokalign", "train", "pure", "--data", "arith", "--n", "4", "--reward", "exact_match",
                           "--reward", "steps_reward:Steps", "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    _check_run(out)


@pytest.mark.slow
def test_cli_pure_without_token_reward_is_one_line(tmp_path):
    proc = cli("train", "pure", "--data", "arith", "--n", "2", "--max-steps", "1", "--batch-size", "1",
               "--out", str(tmp_path / "p"), "--quiet", check=False)
    assert proc.returncode == 2 and "per-token process reward" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_modpo_data_and_model_margins(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r, "chosen_margins": [m], "rejected_margins": 0.0}) + "\n"
                            for (q, c, r), m in zip([("1+1=", "2", "3"), ("2+3=", "5", "6"), ("4+4=", "8", "9")], (0.1, 0.2, 0.3))))
    out = tmp_path / "modpo-data"
    cli("train", "modpo", "--data", str(data), "--set", "algorithm.margin_source=data", "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet")
    _check_run(out)
    from tokalign.models import BUNDLED_MODEL

    out = tmp_path / "modpo-model"
    cli("train", "modpo", "--data", str(data), "--with", f"margin={BUNDLED_MODEL}", "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet")
    _check_run(out)


@pytest.mark.slow
def test_cli_sspo_single_stream(tmp_path):
    out = tmp_path / "sspo"
    cli("train", "sspo", "--data", "arith", "--n", "1", "--max-steps", "2", "--batch-size", "4", "--out", str(out), "--quiet")
    _check_run(out)


@pytest.mark.slow
def test_cli_reinforce_ada_adaptive_rounds(tmp_path):
    out = tmp_path / "ada"
    cli("train", "reinforce_ada", "--data", "arith", "--n", "4", "--set", "algorithm.round_n=4", "--set", "algorithm.max_rounds=2",
        "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet")
    metrics = _check_run(out)
    assert all(1 <= m["sampling/rounds"] <= 2 and m["sampling/pool_size_mean"] >= 4 for m in metrics)


# ---------------------------------------------------------------------------------------------------
# PRIME

from tokalign.algorithms.prime import PRIME, PRIMEConfig, rloo_source  # noqa: E402


def test_prime_phi_equals_ref_zero_rewards_and_ln2():
    """π_φ = π_ref ⇒ every implicit token reward is 0 and the PRM's cross-entropy is ln 2 whatever the labels."""
    algo = PRIME(PRIMEConfig())
    prm = [c for c in algo.needs.components if c.name == "prm"][0]
    assert prm.roles() == {"prm": False} and algo.needs.reference and prm.lr == 1e-6 and prm.loss == algo.prm_loss
    ref = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    batch = token_batch(torch.ones(4, 3), {"rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]), "group_ids": torch.tensor([0, 0, 1, 1]),
                                           "ref_logps": ref}, {"seqs": 4.0})
    out = algo.prm_loss(batch, PolicyOutput(leaf(ref)))
    assert_close(out.loss, torch.tensor(math.log(2)))
    batch.fields["prm_logps"] = ref.clone()
    algo.prepare(batch)
    assert_close(batch.fields["process_rewards"], torch.zeros(4, 3))


def test_prime_rloo_sources_hand():
    """Outcome (last token), G = 2, R = (1, 0): (1 − 0, 0 − 1) = (1, −1). Process x = [[0.1, 0.3], [0.2, 0]]: means
    (0.2, 0.1), 2x − 0.3/1 → row 0 (−0.1, 0.3), row 1 (0.1, −0.3)."""
    gids = torch.tensor([0, 0])
    last = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert_close(rloo_source(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), last, gids), torch.tensor([[0.0, 1.0], [0.0, -1.0]]))
    assert_close(rloo_source(torch.tensor([[0.1, 0.3], [0.2, 0.0]]), torch.ones(2, 2), gids), torch.tensor([[-0.1, 0.3], [0.1, -0.3]]))


def test_prime_prepare_hand():
    """β = 0.05, coefficients 5 and 5: prm − ref = [[2, 6], [4, 0]] ⇒ r = [[0.1, 0.3], [0.2, 0]]; with R = (1, 0):
    x = 5·(−0.1, 0.3 + 1) and 5·(0.1, −0.3 − 1) = (−0.5, 6.5), (0.5, −6.5); returns (6, 6.5), (−6, −6.5);
    whitened over the 4 tokens (mean 0, unbiased var (36 + 42.25)·2/3 = 52.1667)."""
    batch = token_batch(torch.ones(2, 2), {"rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                           "ref_logps": torch.zeros(2, 2), "prm_logps": torch.tensor([[2.0, 6.0], [4.0, 0.0]])})
    PRIME(PRIMEConfig()).prepare(batch)
    returns = torch.tensor([[6.0, 6.5], [-6.0, -6.5]])
    assert_close(batch.fields["advantages"], returns / math.sqrt((36 + 42.25) * 2 / 3 + 1e-8))


@pytest.mark.slow
def test_cli_prime_trains_policy_and_prm(tmp_path):
    """`tokalign train prime` online: the policy and the implicit PRM both change; the PRM is saved in <out>/prm/ as a
    plain transformers model, and its CE loss is logged each step."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tokalign.models import BUNDLED_MODEL

    out = tmp_path / "prime"
    cli("train", "prime", "--data", "arith", "--n", "4", "--reward", "exact_match", "--set", "algorithm.prm_lr=1e-3",
        "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet")
    metrics = _check_run(out)
    assert all(math.isfinite(m["prm/loss"]) and m["prm/grad_norm"] > 0 for m in metrics)
    base, prm = load_file(BUNDLED_MODEL / "model.safetensors"), load_file(out / "prm" / "model.safetensors")
    assert max(float((prm[k] - base[k]).abs().max()) for k in base) > 0
    assert AutoModelForCausalLM.from_pretrained(out / "prm") is not None


# ---------------------------------------------------------------------------------------------------
# PAR

from tokalign.algorithms.par import PAR, PARConfig, par_reward  # noqa: E402


def test_par_reward_hand_and_limits():
    """k = 1: r = r_ref ⇒ 0.5; r = 1 against references (0, 1) ⇒ (σ(1) + 0.5)/2 = 0.615529; bounded in (0, 1) and
    monotone in r."""
    assert_close(par_reward(torch.tensor([0.3]), torch.tensor([[0.3, 0.3]]), 1.0), torch.tensor([0.5]))
    assert_close(par_reward(torch.tensor([1.0]), torch.tensor([[0.0, 1.0]]), 1.0), torch.tensor([(1 / (1 + math.exp(-1)) + 0.5) / 2]))
    r = torch.linspace(-10, 10, 101)
    shaped = par_reward(r, torch.zeros(101, 3), 1.0)
    assert bool((shaped > 0).all() and (shaped < 1).all() and (shaped.diff() >= 0).all())


def test_par_prepare_shapes_then_group_advantages():
    """Two samples of one prompt, R = (2, 0), references (1,): shaped (σ(1), σ(−1)) → GRPO's ±0.7071."""
    algo = PAR(PARConfig(num_references=1))
    assert [h.count for h in algo.needs.hooks if h.name == "reference_samples"] == [1]
    assert algo.needs.reference and algo.needs.data == ("online",)
    batch = token_batch(torch.ones(2, 1), {"rewards": torch.tensor([2.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                           "ref_reward_0": torch.tensor([1.0, 1.0])})
    algo.prepare(batch)
    assert_close(batch.fields["rewards"], torch.sigmoid(torch.tensor([1.0, -1.0])))
    assert_close(batch.fields["advantages"], torch.tensor([0.70710, -0.70710]), atol=1e-4, rtol=0)


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


@pytest.mark.slow
def test_cli_par(tmp_path):
    out = tmp_path / "par"
    cli("train", "par", "--data", "arith", "--n", "4", "--set", "algorithm.num_references=2", "--max-steps", "2", "--batch-size", "2",
        "--out", str(out), "--quiet")
    metrics = _check_run(out)
    assert all(0 <= m["reward/reference_mean"] <= 1 for m in metrics)


# ---------------------------------------------------------------------------------------------------
# SPO (segments)

from tokalign.algorithms.spo import SPO, SPOConfig, cut_points  # noqa: E402


def test_spo_cut_points_hand():
    """p = (0.95, 0.5, 0.99, 0.3, 0.2), threshold 0.9: low-probability tokens 1, 3, 4; every 2nd from the first → 1, 4."""
    logps = [math.log(p) for p in (0.95, 0.5, 0.99, 0.3, 0.2)]
    assert cut_points(logps, 0.9, 2) == [1, 4]
    assert cut_points(logps, 0.9, 1) == [1, 3, 4]


def test_spo_one_segment_is_r_minus_root_value_with_probability_mask():
    """No cut: every token gets R − V(root) = 1 − 0.25; a token with π_old = 0.95 > 0.9 gets 0 (probability mask off:
    it keeps 0.75)."""
    f = {"segment_value_start": torch.full((1, 3), 0.25), "segment_value_end": torch.ones(1, 3),
         "sampler_logps": torch.log(torch.tensor([[0.5, 0.95, 0.2]])), "rewards": torch.ones(1), "group_ids": torch.zeros(1)}
    batch = SPO(SPOConfig()).prepare(token_batch(torch.ones(1, 3), dict(f)))
    assert_close(batch.fields["advantages"], torch.tensor([[0.75, 0.0, 0.75]]))
    batch = SPO(SPOConfig(probability_mask=False)).prepare(token_batch(torch.ones(1, 3), dict(f)))
    assert_close(batch.fields["advantages"], torch.full((1, 3), 0.75))


def test_online_source_segment_values_hand():
    """A completion (1, 2, 3, 4) with reward 0 cut at token 2 (the only π_old < 0.9); each continuation appends token 7
    and the test reward is len(completion_ids)/10: V(0) = 0.1 (prefix () + 7), V(2) = 0.3 (1, 2, 7), V(end) = R = 0.
    Tokens 0–1: (0.1 → 0.3); tokens 2–3: (0.3 → 0)."""
    from tokalign.protocols import Reward
    from tokalign.rewards import ResolvedReward
    from tokalign.rollout import Completion, SamplingSpec
    from tokalign.sampling import SegmentRollouts
    from tokalign.train.sources import OnlineSource

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    class Engine:
        tokenizer = Tok()

        def generate(self, prompts, spec):
            return [[Completion([7], [0.0], "stop", "7") for _ in range(spec.n)] for _ in prompts]

    reward = ResolvedReward("len", 1.0, lambda samples: [Reward(len(s.completion_ids) / 10) for s in samples], None, False)
    src = OnlineSource([], Engine(), [reward], SamplingSpec(n=1, max_new_tokens=8), 1, 0)
    hook = SegmentRollouts(lambda logps: cut_points(logps, 0.9, 1), 3)
    row = {"id": "a#0", "prompt": '"q"', "prompt_ids": [5], "reference": None, "completion": "1 2 3 4", "completion_ids": [1, 2, 3, 4],
           "sampler_logps": [math.log(p) for p in (0.99, 0.99, 0.5, 0.99)], "finish_reason": "stop", "reward": 0.0}
    assert hook.after_batch([row], src) == {"segments/per_completion": 2}
    assert row["token_fields"]["segment_value_start"] == pytest.approx([0.1, 0.1, 0.3, 0.3])
    assert row["token_fields"]["segment_value_end"] == pytest.approx([0.3, 0.3, 0.0, 0.0])


@pytest.mark.slow
def test_cli_spo(tmp_path):
    out = tmp_path / "spo"
    cli("train", "spo", "--data", "arith", "--n", "2", "--set", "algorithm.rollouts=2", "--max-steps", "2", "--batch-size", "4",
        "--out", str(out), "--quiet")
    metrics = _check_run(out)
    assert all(m["segments/per_completion"] >= 1 for m in metrics)


# ---------------------------------------------------------------------------------------------------
# THR

from tokalign.algorithms.thr import THR, THRConfig, reweight, token_hidden_rewards  # noqa: E402


def _thr_case():
    """A group of two one-token responses over a vocabulary of 2, π = (0.5, 0.5) at both positions (logits 0).
    Row 0 (correct, R = 1) emits token 0 with hidden state 1; row 1 (R = 0) emits token 1 with hidden state 2.
    GRPO: A = (+0.7071, −0.7071)."""
    logits = torch.zeros(2, 1, 2)
    hidden = torch.tensor([[[1.0]], [[2.0]]])
    targets = torch.tensor([[0], [1]])
    return logits, hidden, targets, torch.ones(2, 1), torch.tensor([1.0, 0.0]), torch.tensor([0, 0])


def test_thr_hand():
    """Row 0: K = 1 − 0.5 − 0.5 + 0.5 = 0.5, ⟨h, h'⟩ = 1 → THR = 0.7071·0.5 = 0.35355.
    Row 1: K = 0 − 0.5 − 0.5 + 0.5 = −0.5, ⟨h, h'⟩ = 2 → THR = −0.7071·(−1) = +0.7071 (pushing the wrong token down
    raises the correct one). top_fraction 1, p = 0.5 → weights 1.5 on both."""
    logits, hidden, targets, mask, rewards, gids = _thr_case()
    adv = torch.tensor([2 ** -0.5, -(2 ** -0.5)])
    thr = token_hidden_rewards(logits, hidden, targets, mask, adv, rewards > 0.5, gids)
    assert_close(thr, torch.tensor([[0.353553], [0.707107]]))
    assert_close(reweight(thr, mask, gids, 0.5, 1.0), torch.full((2, 1), 1.5))
    assert_close(reweight(thr, mask, gids, 0.5, 0.5), torch.tensor([[1.0], [1.5]]))  # only the larger |THR|
    assert_close(reweight(-thr, mask, gids, 0.5, 0.5), torch.tensor([[1.0], [0.5]]))


def test_thr_p0_is_grpo_and_weights_scale_the_gradient():
    """p = 0 ⇒ GRPO's loss and gradient exactly; p = 0.5 with every token reweighted by 1.5 ⇒ 1.5 × GRPO's gradient."""
    from tokalign.algorithms.grpo import GRPO, GRPOConfig

    logits, hidden, targets, mask, rewards, gids = _thr_case()
    fields = {"rewards": rewards, "group_ids": gids, "old_logps": torch.full((2, 1), -math.log(2))}
    batch = token_batch(mask, dict(fields))
    batch.input_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), targets], 1)
    grads = {}
    for name, algo in {"grpo": GRPO(GRPOConfig()), "p0": THR(THRConfig(p=0.0)), "p05": THR(THRConfig(p=0.5, top_fraction=1.0))}.items():
        b = algo.prepare(token_batch(mask, dict(fields)))
        b.input_ids = batch.input_ids
        lp = leaf(torch.full((2, 1), -math.log(2)))
        algo.loss(b, PolicyOutput(lp, logits=logits, hidden=hidden)).loss.backward()
        grads[name] = lp.grad
    assert THR(THRConfig()).needs.full_vocab and [c.forward_outputs for c in THR(THRConfig()).needs.components] == [("hidden",)]
    assert_close(grads["p0"], grads["grpo"])
    assert_close(grads["p05"], 1.5 * grads["grpo"])


@pytest.mark.slow
def test_cli_thr(tmp_path):
    out = tmp_path / "thr"
    cli("train", "thr", "--data", "arith", "--n", "4", "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet")
    metrics = _check_run(out)
    assert all(0 <= m["thr/reweighted_fraction"] <= 1 for m in metrics)


# ---------------------------------------------------------------------------------------------------
# T-REG

from tokalign.algorithms.treg import TREG, TREGConfig, self_token_rewards, with_instruction  # noqa: E402
from tokalign.batching import Seq, move_completion_values  # noqa: E402


def _treg_batch():
    return token_batch(torch.ones(2, 1), {"is_chosen": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0]),
                                          "ref_logps": torch.zeros(2, 1), "better_logps": torch.tensor([[0.0], [-1.0]]),
                                          "worse_logps": torch.tensor([[-1.0], [0.0]])}, {"groups": 1.0, "tokens": 2.0})


def test_treg_hand():
    """ρ = 2σ(±1) − 1 = ±0.462117. Δ = (1, −1), β = 0.1: DPO = softplus(−0.2) = 0.598139; regulariser per token
    −log σ(0.462117·0.1) (both tokens agree in sign) = softplus(−0.0462117) = 0.670337; L = 0.598139 + 0.5·0.670337."""
    algo = TREG(TREGConfig())
    assert [c.names for c in algo.needs.components] == [("better", "worse")] and algo.needs.reference
    batch = algo.prepare(_treg_batch())
    rho = 2 / (1 + math.exp(-1)) - 1
    assert_close(batch.fields["self_token_rewards"], torch.tensor([[rho], [-rho]]))
    out = algo.loss(batch, PolicyOutput(leaf([[1.0], [-1.0]])))
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert_close(out.loss, torch.tensor(softplus(-0.2) + 0.5 * softplus(-0.1 * rho)))


def test_treg_alpha0_is_dpo():
    pol = [[0.7], [-0.3]]
    a, b = leaf(pol), leaf(pol)
    algo = TREG(TREGConfig(alpha=0.0))
    la = algo.loss(algo.prepare(_treg_batch()), PolicyOutput(a)).loss
    lb = DPO(DPOConfig()).loss(_treg_batch(), PolicyOutput(b)).loss
    la.backward()
    lb.backward()
    assert_close(la, lb)
    assert_close(a.grad, b.grad)
    assert_close(self_token_rewards(torch.zeros(1), torch.zeros(1)), torch.zeros(1))


def test_treg_prompt_rewrite_and_realignment():
    """The instruction goes after the text prompt, or after the last user turn; a completion's per-token values move
    from the variant's positions (longer prompt) to the row's own."""
    assert with_instruction("q", "do better") == "q\n\ndo better"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert with_instruction(msgs, "x")[1]["content"] == "u\n\nx" and msgs[1]["content"] == "u"
    src = [Seq([1, 2, 3, 4], [7, 8], 0)]  # completion values at columns 3, 4
    dst = [Seq([1, 2], [7, 8], 0)]  # ... belong at columns 1, 2
    values = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.25]])
    assert_close(move_completion_values(values, src, dst, 3), torch.tensor([[0.0, 0.5, 0.25]]))


@pytest.mark.slow
def test_cli_treg(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                            for q, c, r in [("1+1=", "2", "3"), ("2+3=", "5", "6"), ("4+4=", "8", "9")]))
    out = tmp_path / "treg"
    cli("train", "treg", "--data", str(data), "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet")
    metrics = _check_run(out)
    assert all(m["reg"] > 0 for m in metrics)


@pytest.mark.slow
def test_cli_prime_killed_run_resumes_policy_and_prm(tmp_path):
    """SIGKILL a PRIME run once checkpoint-2 exists; --resume ends with the policy *and* the trained PRM equal to an
    uninterrupted run's (the PRM and its optimiser state travel in the checkpoint)."""
    from safetensors.torch import load_file

    from conftest import run_and_kill

    args = ["train", "prime", "--data", "arith", "--n", "4", "--max-steps", "4", "--batch-size", "2", "--set", "train.save_every=2",
            "--set", "algorithm.prm_lr=1e-3", "--quiet"]
    cli(*args, "--out", "full", cwd=tmp_path)
    run_and_kill(args, "cut", "checkpoint-2", tmp_path)
    cli(*args, "--out", "cut", "--resume", cwd=tmp_path)
    for sub in ("", "prm/"):
        a, b = load_file(tmp_path / "full" / f"{sub}model.safetensors"), load_file(tmp_path / "cut" / f"{sub}model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), sub or "policy"
