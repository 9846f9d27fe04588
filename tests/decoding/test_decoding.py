"""Decoding hooks (tokalign.decoding): CyclicReflex's triangular wave by hand, its limit (amplitude 0 changes nothing),
ban_tokens, the chain's per-token temperature and its contract checks, and the registry/option plumbing."""

from __future__ import annotations

import pytest
import torch

from tokalign import decoding, registry
from tokalign.decoding.ban_tokens import BanTokens, BanTokensConfig
from tokalign.decoding.cyclic_reflex import CyclicReflex, CyclicReflexConfig, wave
from tokalign.errors import ContractViolation, UserError


@pytest.fixture(scope="module")
def tok():
    from tokalign import models

    return models.load_tokenizer("")  # the bundled tiny model's: digits are single tokens


@pytest.mark.parametrize("position,want", [
    (0, 0.0),  # c = 0: the wave starts at 0
    (150, 2.5),  # c = 1/8: 4·5·(1/8) = 2.5, rising
    (300, 5.0),  # c = 1/4: the peak +A
    (450, 2.5),  # c = 3/8: 5 − 4·5·(1/8) = 2.5, falling
    (600, 0.0),  # c = 1/2: 5 − 4·5·(1/4) = 0
    (900, -5.0),  # c = 3/4: 5 − 4·5·(1/2) = −5, the trough
    (1050, -2.5),  # c = 7/8: −5 + 4·5·(1/8) = −2.5
    (1200, 0.0),  # one period later: back to 0
    (1500, 5.0),  # and the peak again
])
def test_wave_by_hand(position, want):
    """A = 5, period 1200 (the paper's recipe): c = (p mod 1200) / 1200, w = 4Ac | A − 4A(c − ¼) | −A + 4A(c − ¾)."""
    assert wave(position, 5.0, 1200.0) == pytest.approx(want)


def test_wave_shift_moves_the_phase():
    """shift ¼ of a period: position 0 is at c = ¼, the peak; position 300 at c = ½, zero; 600 at c = ¾, the trough."""
    assert [wave(p, 5.0, 1200.0, shift=0.25) for p in (0, 300, 600)] == pytest.approx([5.0, 0.0, -5.0])


def _bound(tok, **options):
    proc = CyclicReflex(CyclicReflexConfig(**options))
    proc.bind(tok)
    return proc


def test_cyclic_reflex_biases_the_reflection_tokens_by_position(tok):
    """Rows at positions 0, 300 and 900 (A = 5, period 1200): biases 0, +5 and −5 on the reflection tokens' logits, no
    change elsewhere."""
    proc = _bound(tok, tokens=["1", "2"], windows=[])
    ids = [tok.get_vocab()["1"], tok.get_vocab()["2"]]
    logits = torch.zeros(3, len(tok))
    out = proc(logits.clone(), [[7]] * 3, [[9] * 0, [9] * 300, [9] * 900])
    want = torch.zeros(3, len(tok))
    want[1, ids] = 5.0
    want[2, ids] = -5.0
    torch.testing.assert_close(out, want)


def test_cyclic_reflex_stops_after_the_end_token_and_outside_its_windows(tok):
    end = tok.get_vocab()["<|im_end|>"]
    proc = _bound(tok, tokens=["1"], end_token="<|im_end|>", windows=[0, 400])
    assert proc.bias([9] * 300) == pytest.approx(5.0)
    assert proc.bias([9] * 299 + [end]) == 0.0  # the row wrote the end token: no more bias
    assert proc.bias([9] * 900) == 0.0  # position 900 is outside [0, 400)
    assert _bound(tok, tokens=["1"], end_token="").bias([end] * 300) == pytest.approx(5.0)  # "": never stops


def test_cyclic_reflex_with_amplitude_zero_changes_nothing(tok):
    """The limiting case: A = 0 is plain decoding, at every position."""
    proc = _bound(tok, tokens=["1", "2"], amplitude=0.0, windows=[])
    logits = torch.randn(4, len(tok), generator=torch.Generator().manual_seed(0))
    out = proc(logits.clone(), [[1]] * 4, [[3] * k for k in (0, 150, 300, 900)])
    assert torch.equal(out, logits)


def test_cyclic_reflex_defaults_are_the_papers_and_unknown_tokens_are_refused(tok):
    cfg = CyclicReflexConfig()
    assert (cfg.amplitude, cfg.period, cfg.shift, cfg.windows, cfg.end_token) == (5.0, 1200.0, 0.0, [0, 8192], "</think>")
    assert cfg.tokens == ["wait", "Wait", "but", "But", "Alternatively"]
    with pytest.raises(UserError, match="none of its reflection tokens"):
        CyclicReflex().bind(tok)  # the tiny tokenizer has none of them as one token
    with pytest.raises(ValueError, match="period must be > 0"):
        CyclicReflexConfig(period=0)
    with pytest.raises(ValueError, match="start < end"):
        CyclicReflexConfig(windows=[5, 2])


def test_ban_tokens_sets_minus_inf_and_checks_its_tokens(tok):
    proc = BanTokens(BanTokensConfig(ids=[3], tokens=["1"]))
    proc.bind(tok)
    assert proc.ids == sorted({3, tok.get_vocab()["1"]})
    logits = torch.randn(2, len(tok), generator=torch.Generator().manual_seed(1))
    out = proc(logits.clone(), [[1], [2]], [[], [5]])
    assert torch.isneginf(out[:, proc.ids]).all()
    keep = [i for i in range(len(tok)) if i not in proc.ids]
    assert torch.equal(out[:, keep], logits[:, keep])
    with pytest.raises(UserError, match="'12' is 2 tokens"):
        BanTokens(BanTokensConfig(tokens=["12"])).bind(tok)
    with pytest.raises(UserError, match="beyond this tokenizer"):
        BanTokens(BanTokensConfig(ids=[10_000])).bind(tok)
    with pytest.raises(UserError, match="all 384 tokens"):
        BanTokens(BanTokensConfig(ids=list(range(len(tok))))).bind(tok)
    with pytest.raises(ValueError, match="name the tokens to ban"):
        BanTokensConfig()


class Hot:
    """A processor with a per-token temperature: 0.5 for the first token of a row, the run's afterwards."""

    def __call__(self, logits, prompt_ids, output_ids):
        return logits

    def temperature(self, prompt_ids, output_ids):
        return [0.5 if not out else None for out in output_ids]


def _chain(*procs):
    return decoding.Chain([decoding.Resolved(type(p).__name__, p, None, None) for p in procs])


def test_per_token_temperature_rescales_so_the_engine_division_gives_it():
    """Run temperature 0.8; row 0 (first token) at t = 0.5: logits · 0.8/0.5 = 1.6 · logits, so that the engine's
    division by 0.8 leaves logits / 0.5; row 1 keeps the run's. Greedy (temperature 0) rescales nothing."""
    logits = torch.tensor([[1.0, 2.0, -1.0], [1.0, 2.0, -1.0]])
    out = _chain(Hot())(logits.clone(), [[1], [1]], [[], [4]], 0.8)
    torch.testing.assert_close(out, torch.tensor([[1.6, 3.2, -1.6], [1.0, 2.0, -1.0]]))
    torch.testing.assert_close(out[0] / 0.8, logits[0] / 0.5)
    assert torch.equal(_chain(Hot())(logits.clone(), [[1], [1]], [[], [4]], 0.0), logits)


def test_the_chain_applies_processors_in_order_and_checks_their_contract(tok):
    ban = BanTokens(BanTokensConfig(ids=[5]))
    ban.bind(tok)
    logits = torch.zeros(1, len(tok))
    out = _chain(ban, Hot())(logits, [[1]], [[]], 1.0)
    assert torch.isneginf(out[0, 5]) and out[0, 6] == 0  # −inf stays −inf under the temperature's rescaling

    class Shrinks:
        def __call__(self, logits, prompt_ids, output_ids):
            return logits[:, :3]

    class Freezing:
        def __call__(self, logits, prompt_ids, output_ids):
            return logits

        def temperature(self, prompt_ids, output_ids):
            return [0.0 for _ in output_ids]

    with pytest.raises(ContractViolation, match=r"must return logits of shape \[1, 384\], got \[1, 3\]"):
        _chain(Shrinks())(torch.zeros(1, 384), [[1]], [[]], 1.0)
    with pytest.raises(ContractViolation, match="a temperature must be a number > 0"):
        _chain(Freezing())(torch.zeros(1, 384), [[1]], [[]], 1.0)


def test_resolve_names_options_and_manifest_entries():
    assert {"ban_tokens", "cyclic_reflex"} <= set(registry.available("logits_processor"))
    assert registry.check("logits_processor", "cyclic_reflex") is None
    chain = decoding.resolve(["cyclic_reflex", "tokalign.decoding.ban_tokens:BanTokens"],
                             decoding.parse_options(["cyclic_reflex.period=600", "tokalign.decoding.ban_tokens:BanTokens.ids=[5]"]))
    assert chain.names() == ["cyclic_reflex", "tokalign.decoding.ban_tokens:BanTokens"]
    entries = chain.config()
    assert entries[0]["options"]["period"] == 600.0 and entries[0]["options"]["amplitude"] == 5.0
    assert entries[1]["options"]["ids"] == [5]
    refs = chain.plugin_refs()
    assert refs[0]["kind"] == "logits_processor" and refs[0]["distribution"] == "tokalign"
    with pytest.raises(UserError, match="Unknown logits processor 'cyclic_reflx'. Did you mean 'cyclic_reflex'?"):
        decoding.resolve(["cyclic_reflx"])
    with pytest.raises(UserError, match="Options given for logits processor 'ban_tokens'"):
        decoding.resolve(["cyclic_reflex"], {"ban_tokens": {"ids": [1]}})
    assert not decoding.resolve([])
