"""HAPO's Adaptive Temperature Sampling (tokalign.decoding.adaptive_temperature): the rescaling by hand on a fixed
[2, V] logits tensor, the clamp and banned tokens, the limiting case (τ = 0 or base temperature 0: logits unchanged
bit for bit), the official sign, config validation, the HF engine's sampler log-probs, and a steered CLI rollout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cli

from tokalign import artifacts, decoding
from tokalign.decoding.adaptive_temperature import (
    AdaptiveTemperature,
    AdaptiveTemperatureConfig,
)

PATH = "tokalign.decoding.adaptive_temperature:AdaptiveTemperature"

# Row 0 uniform over V = 4: H = ln 4. Row 1 p = (0.7, 0.1, 0.1, 0.1): H = −(0.7 ln 0.7 + 0.3 ln 0.1).
LOGITS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(0.7), math.log(0.1), math.log(0.1), math.log(0.1)]])
H0 = math.log(4)
H1 = -(0.7 * math.log(0.7) + 0.3 * math.log(0.1))


def _proc(**options):
    return AdaptiveTemperature(AdaptiveTemperatureConfig(**options))


def test_rescaling_by_hand():
    """τ = 0.5, T = 0.8, pivot 1 nat (m = 0), high 0 → ln V = ln 4, low 0.01 nats.
    Row 0: ℓ = ln ln 4 = m + (ℓ_hi − m) ⇒ ĥ = +1, T_0 = 0.8 · 1.5 = 1.2, factor T/T_0 = 2/3.
    Row 1: ℓ = ln H1 < 0 = m ⇒ ĥ = ln H1 / (0 − ln 0.01) = ln H1 / ln 100, T_1 = 0.8(1 + 0.5 ĥ)."""
    proc = _proc(tau=0.5, temperature=0.8, entropy_pivot=1.0, entropy_low=0.01)
    h1 = math.log(H1) / math.log(100)
    assert H1 == pytest.approx(0.940447, abs=1e-6) and h1 == pytest.approx(-0.013333, abs=1e-6)
    torch.testing.assert_close(proc.h_hat(LOGITS), torch.tensor([1.0, h1]), rtol=1e-6, atol=1e-7)
    want_t = [0.8 * 1.5, 0.8 * (1 + 0.5 * h1)]
    torch.testing.assert_close(proc.temperatures(LOGITS), torch.tensor(want_t), rtol=1e-6, atol=0)
    out = proc(LOGITS.clone(), [[1], [1]], [[], [2]])
    want = LOGITS * torch.tensor([0.8 / want_t[0], 0.8 / want_t[1]])[:, None]
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    # the engine's division by the run's temperature 0.8 samples row b at T_b
    torch.testing.assert_close(torch.softmax(out / 0.8, -1), torch.softmax(LOGITS / torch.tensor(want_t)[:, None], -1),
                               rtol=1e-6, atol=1e-7)


def test_high_entropy_side_and_clamp_and_banned_tokens():
    """entropy_high 2 nats: row 0's ĥ = (ln ln 4 − 0)/(ln 2) on the positive side. A one-hot row (the others banned,
    −inf) has H = 0 below entropy_low: ĥ = −1, factor 1/(1 − τ) = 2 on the finite logit; −inf stays −inf."""
    proc = _proc(tau=0.5, entropy_pivot=1.0, entropy_high=2.0, entropy_low=0.01)
    onehot = torch.tensor([[3.0, float("-inf"), float("-inf"), float("-inf")]])
    logits = torch.cat([LOGITS[:1], onehot])
    want = torch.tensor([math.log(H0) / math.log(2.0), -1.0])
    torch.testing.assert_close(proc.h_hat(logits), want, rtol=1e-6, atol=0)
    out = proc(logits.clone(), [[1], [1]], [[], []])
    assert out[1, 0] == 6.0 and torch.isneginf(out[1, 1:]).all() and not out.isnan().any()


def test_official_sign_heats_low_entropy_tokens_too():
    paper = _proc(tau=0.5, entropy_pivot=1.0, entropy_low=0.01)
    official = _proc(tau=0.5, entropy_pivot=1.0, entropy_low=0.01, official_sign=True)
    torch.testing.assert_close(official.h_hat(LOGITS), paper.h_hat(LOGITS).abs())
    assert paper.temperatures(LOGITS)[1] < 1.0 < official.temperatures(LOGITS)[1]


@pytest.mark.parametrize("options", [{"tau": 0.0}, {"temperature": 0.0}])
def test_neutral_setting_leaves_logits_unchanged_bit_for_bit(options):
    """τ = 0: T_b = T for every row; base temperature 0 (greedy): nothing rescaled."""
    logits = torch.randn(5, 384, generator=torch.Generator().manual_seed(0))
    logits[0, 3] = float("-inf")
    out = _proc(**options)(logits.clone(), [[1]] * 5, [[]] * 5)
    assert torch.equal(out, logits)


def test_defaults_are_the_recipes_and_validation():
    cfg = AdaptiveTemperatureConfig()
    assert (cfg.tau, cfg.temperature, cfg.entropy_pivot, cfg.entropy_high, cfg.entropy_low, cfg.official_sign) == (
        0.05, 1.0, 0.672, 0.0, 1e-6, False)
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\)"):
        AdaptiveTemperatureConfig(tau=1.0)
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\)"):
        AdaptiveTemperatureConfig(tau=-0.1)
    with pytest.raises(ValueError, match="base temperature, ≥ 0"):
        AdaptiveTemperatureConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="0 < entropy_low < entropy_pivot"):
        AdaptiveTemperatureConfig(entropy_low=1.0)
    with pytest.raises(ValueError, match="entropy_high must be > entropy_pivot"):
        AdaptiveTemperatureConfig(entropy_high=0.5)
    chain = decoding.resolve([PATH], decoding.parse_options([f"{PATH}.tau=0.2"]))
    assert chain.config() == [{"name": PATH, "options": {**vars(cfg), "tau": 0.2}}]
    with pytest.raises(Exception, match="tau must be in"):
        decoding.resolve([PATH], decoding.parse_options([f"{PATH}.tau=2"]))


def test_hf_sampler_logps_are_the_adapted_distributions():
    """Through the HF engine at temperature 0.7 (base temperature 0.7): each recorded log-prob is that of
    softmax(logits / T_b) with T_b = 0.7 (1 + τ ĥ_b) from the model's own logits at that position."""
    from tokalign import models
    from tokalign.data.render import render_prompts
    from tokalign.rollout import SamplingSpec
    from tokalign.rollout.hf import HFEngine

    tok, model = models.load_tokenizer(""), models.load_model("")
    proc = _proc(tau=0.5, temperature=0.7)
    chain = decoding.Chain([decoding.Resolved("adaptive_temperature", proc, None, None)])
    messages = [[{"role": "user", "content": f"{9 * a}+{a + 1}="}] for a in range(3)]
    prompts = [ids for _, ids in render_prompts(tok, messages)]
    torch.manual_seed(0)
    out = HFEngine(model, tok, processors=chain).generate(prompts, SamplingSpec(n=2, temperature=0.7, max_new_tokens=6))
    model.eval()
    for prompt, group in zip(prompts, out):
        for c in group:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + c.ids])).logits[0, len(prompt) - 1 : -1].float()
            temps = proc.temperatures(logits)
            want = torch.log_softmax(logits / temps[:, None], -1)[torch.arange(len(c.ids)), torch.tensor(c.ids)]
            torch.testing.assert_close(torch.tensor(c.logps), want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_rollout_cli_with_adaptive_temperature(tmp_path):
    """Same seed, with and without the processor (by module:Class path): some sampled completions differ (the tiny
    model is confident on arith, so a low pivot and τ = 0.5 make the tempering visible: 11 of 64 differ at seed 0),
    the sampler log-probs are those of another distribution, and the manifest records the processor and its options."""
    cli("prepare", "arith", "--limit", "16", "--out", str(tmp_path / "P"))
    cli("rollout", str(tmp_path / "P"), "--n", "4", "--seed", "0", "--out", str(tmp_path / "R0"))
    cli("rollout", str(tmp_path / "P"), "--n", "4", "--seed", "0", "--out", str(tmp_path / "R1"),
        "--logits-processor", PATH, "--processor-opt", f"{PATH}.tau=0.5",
        "--processor-opt", f"{PATH}.entropy_pivot=0.05")
    plain, steered = (artifacts.read(tmp_path / r, ["rollouts"]).rows() for r in ("R0", "R1"))
    assert len(plain) == len(steered) == 64
    differ = sum(list(a["completion_ids"]) != list(b["completion_ids"]) for a, b in zip(plain, steered))
    assert differ >= 3, differ
    same = [(a, b) for a, b in zip(plain, steered) if list(a["completion_ids"]) == list(b["completion_ids"])]
    assert sum(a["sampler_logps"] != pytest.approx(b["sampler_logps"], abs=1e-6) for a, b in same) >= len(same) // 2
    manifest = json.loads((tmp_path / "R1" / "manifest.json").read_text())
    want = {**vars(AdaptiveTemperatureConfig()), "tau": 0.5, "entropy_pivot": 0.05}
    assert manifest["config"]["logits_processors"] == [{"name": PATH, "options": want}]
    assert {"kind": "logits_processor", "name": PATH}.items() <= manifest["plugins"][0].items()
