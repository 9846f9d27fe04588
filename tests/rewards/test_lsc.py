"""The log-sigmoid-centred sum of rewards (arXiv:2402.00742): R = Σ_k w_k log σ(r_k − r_k^ref), by hand with two
components (``score_plugins:Counting``: the completion's length in characters × scale, and ``exact_match``), the
reference values from the options, the prompt's ``ref_rewards`` or its reference responses, and the limit of one
component with r^ref = 0 (log σ(r)); through ``tokalign score``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT, cli
from score_plugins import make_rollouts

from tokalign import rewards
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards.lsc import LSC, LSCConfig, log_sigmoid, quantile

COUNTING = "score_plugins:Counting"
ENV = {"PYTHONPATH": str(ROOT / "tests")}
LOG_SIG_1 = -math.log1p(math.exp(-1))  # log σ(1) = −0.3133; log σ(−1) = log σ(1) − 1; log σ(0) = −log 2


def s(completion: str, reference="ab", id="s") -> Sample:
    return Sample(id, "q", completion, [], reference)


def lsc(samples, **cfg) -> list:
    return LSC(LSCConfig(**{"components": [COUNTING, "exact_match"], **cfg}))(samples)


def value(sample, **cfg) -> float:
    return lsc([sample], **cfg)[0].value


def test_two_components_by_hand():
    """r^ref = (3, 0). "ab" (right, 2 characters): log σ(2 − 3) + log σ(1 − 0) = (log σ(1) − 1) + log σ(1) = −1.6265.
    "abc" (wrong, 3): log σ(0) + log σ(0) = −log 4. With exact_match*2: "ab" scores log σ(−1) + 2 log σ(1)."""
    got = lsc([s("ab"), s("abc")], reference={COUNTING: 3})
    want = torch.tensor([2 * LOG_SIG_1 - 1, -math.log(4)], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor([r.value for r in got], dtype=torch.float64), want)
    assert got[0].info == {"r": {COUNTING: 2.0, "exact_match": 1.0}, "r_ref": {COUNTING: 3.0, "exact_match": 0.0},
                           "u": {COUNTING: pytest.approx(LOG_SIG_1 - 1), "exact_match": pytest.approx(LOG_SIG_1)}}
    weighted = value(s("ab"), components=[COUNTING, "exact_match*2"], reference={COUNTING: 3})
    assert weighted == pytest.approx(3 * LOG_SIG_1 - 1)
    halved = value(s("ab"), component_options={COUNTING: {"scale": 0.5}})  # r = 1, r^ref = 0: log σ(1) twice
    assert halved == pytest.approx(2 * LOG_SIG_1)


def test_one_component_without_reference_is_log_sigmoid():
    """The limit: R = log σ(r), here r = 1 … 5 (the completion's length), against torch's logsigmoid."""
    samples = [s("x" * n) for n in range(1, 6)]
    got = torch.tensor([r.value for r in LSC(LSCConfig(components=[COUNTING]))(samples)], dtype=torch.float64)
    torch.testing.assert_close(got, torch.nn.functional.logsigmoid(torch.arange(1, 6, dtype=torch.float64)))
    assert log_sigmoid(-800.0) == -800.0 and log_sigmoid(800.0) == 0.0  # no overflow


def test_reference_rewards_given_per_prompt():
    """ref_rewards beats the option: exact_match's r^ref = 1, so "ab" gains log σ(0) = −log 2 from it; the dict's
    "answer" is what exact_match compares with; Counting (not given) keeps the option's 3."""
    ref = {"answer": "ab", "ref_rewards": {"exact_match": 1}}
    assert value(s("ab", ref), reference={COUNTING: 3}) == pytest.approx(LOG_SIG_1 - 1 - math.log(2))


def test_reference_responses_scored_once_per_prompt(tmp_path):
    """Reference responses "a", "abcd", "ab": Counting 1, 4, 2 (median 2; 0.75-quantile 2 + ½·(4 − 2) = 3), exact_match
    0, 0, 1 (median 0; 0.75-quantile ½). "abc": log σ(3 − 2) + log σ(0 − 0) = log σ(1) − log 2; with quantile 0.75:
    log σ(3 − 3) + log σ(0 − ½) = −log 2 − log(1 + e^½).
    Two samples of the prompt: its three responses are scored once (5 Counting calls logged, not 8)."""
    log = tmp_path / "calls"
    ref = {"answer": "ab", "ref_completions": ["a", "abcd", "ab"]}
    got = lsc([s("abc", ref, "s0"), s("abc", ref, "s1")], component_options={COUNTING: {"log": str(log)}})
    assert [r.value for r in got] == pytest.approx([LOG_SIG_1 - math.log(2)] * 2)
    assert got[0].info["r_ref"] == {COUNTING: 2.0, "exact_match": 0.0}
    assert sorted(log.read_text().split()) == ["s0", "s0#ref0", "s0#ref1", "s0#ref2", "s1"]
    assert value(s("abc", ref), quantile=0.75) == pytest.approx(-math.log(2) - math.log1p(math.exp(0.5)))
    assert quantile([5.0], 0.3) == 5.0 and quantile([1.0, 2.0, 4.0], 1.0) == 4.0


@pytest.mark.parametrize("cfg, message", [
    ({"components": []}, "components must name one or more rewards"),
    ({"components": ["lsc"]}, "components must be other rewards"),
    ({"components": ["exact_match", "exact_match*2"]}, "each once"),
    ({"components": ["exact_match"], "reference": {"math": 1}}, "reference must map some of the components"),
    ({"components": ["exact_match"], "quantile": 1.5}, "quantile must be in"),
])
def test_bad_options(cfg, message):
    with pytest.raises(ValueError, match=message):
        LSCConfig(**cfg)


def test_named_on_the_command_line_options():
    (r,) = rewards.resolve(["lsc"], {"lsc": {"components": f"{COUNTING},exact_match", "reference": {COUNTING: 3}}})
    assert r.fn.config.components == [COUNTING, "exact_match"] and r.fn([s("ab")])[0].value == pytest.approx(2 * LOG_SIG_1 - 1)
    with pytest.raises(UserError, match="components must name one or more rewards"):
        rewards.resolve(["lsc"])
    assert not r.fn.batched and LSC(LSCConfig(components=["score_plugins:Batched", "exact_match"])).batched


@pytest.mark.slow
def test_score_cli(tmp_path):
    """s_i has i + 1 characters and reference "a" (exact_match 0): R = log σ(i + 1 − 3) + log σ(0)."""
    make_rollouts(tmp_path / "R", 4)
    cli("score", "R", "-r", "lsc", "--reward-opt", f"lsc.components={COUNTING},exact_match",
        "--reward-opt", f"lsc.reference={{{COUNTING}: 3}}", "--no-cache", "--out", "S", cwd=tmp_path, env=ENV)
    from tokalign import artifacts

    rows = sorted(artifacts.read(tmp_path / "S", ["scored"]).rows(), key=lambda r: r["id"])
    got = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    want = torch.nn.functional.logsigmoid(torch.arange(4, dtype=torch.float64) - 2) - math.log(2)
    torch.testing.assert_close(got, want)
    m = json.loads((tmp_path / "S" / "manifest.json").read_text())
    assert m["plugins"][0]["name"] == "lsc" and m["plugins"][0]["options"]["components"] == [COUNTING, "exact_match"]
