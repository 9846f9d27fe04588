"""PRIME (arXiv:2502.01456): the implicit PRM's limit (π_φ = π_ref ⇒ zero token rewards, CE = ln 2), the RLOO sources and
the prepared advantages by hand, and slow runs through the real CLI (the PRM trains, is saved, and resumes with the
policy after a kill)."""

from __future__ import annotations

import math

import pytest
import torch
from algo_helpers import check_run
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms.prime import PRIME, PRIMEConfig, rloo_source
from tokalign.protocols import PolicyOutput


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


# ---------------------------------------------------------------------------------------------------
# the real CLI


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
    metrics = check_run(out)
    assert all(math.isfinite(m["prm/loss"]) and m["prm/grad_norm"] > 0 for m in metrics)
    base, prm = load_file(BUNDLED_MODEL / "model.safetensors"), load_file(out / "prm" / "model.safetensors")
    assert max(float((prm[k] - base[k]).abs().max()) for k in base) > 0
    assert AutoModelForCausalLM.from_pretrained(out / "prm") is not None


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
