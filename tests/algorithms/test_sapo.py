"""SAPO (arXiv:2509.08721): the swarm directory (atomic writes, which peer file is read, partial / corrupt files skipped
with their reason), the seeded draw by hand, the hook on two fake nodes (own files excluded, re-encoding and
re-scoring, extra groups), the loss on a mixed batch by hand, ``swarm_dir`` "" / ``external`` 0 ⇒ GRPO bit for bit, the
config's errors, and two nodes exchanging rollouts through the real CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from algo_helpers import run_metrics, same_as_base, weights_changed
from conftest import cli, leaf, token_batch
from torch.testing import assert_close

from tokalign.algorithms import sapo as sapo_mod
from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.algorithms.sapo import (
    EXTERNAL_FIELD,
    FORMAT,
    SAPO,
    SAPOConfig,
    SwarmExchange,
    draw,
    encode_group,
    peer_files,
    prune,
    read_swarm,
    shared_groups,
    step_path,
    wait_for_peers,
    write_rollouts,
)
from tokalign.errors import UserError
from tokalign.protocols import PolicyOutput
from tokalign.rows import dumps, loads

SAPO_PATH = "tokalign.algorithms.sapo:SAPO"
EOS, BOS = 2, 1


class Tok:
    """Character k → id 100 + ord(k) % 100; BOS 1 before plain text prompts (add_special_tokens), EOS 2."""

    eos_token_id = EOS
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        def enc(t):
            return ([BOS] if add_special_tokens else []) + [100 + ord(ch) % 100 for ch in t]

        return {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)}


def ids(text):
    return [100 + ord(ch) % 100 for ch in text]


class ChatTok(Tok):
    chat_template = "fake"

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=True, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def group(prompt, reference, completions, reward=0.0):
    """A shared group: completion texts, every shared reward ``reward`` (what the peer says; re-scoring ignores it)."""
    return {"prompt_id": prompt, "prompt": prompt, "prompt_text": prompt, "reference": reference,
            "completions": [{"completion": c, "finish_reason": "stop", "reward": reward, "rewards": {"exact": reward}} for c in completions]}


def ctx(step, seed=0, max_new_tokens=8, tokenizer=None):
    """The part of the online source the hook reads; ``score``: exact match of the completion with the reference."""
    calls = []

    def score(rows):
        calls.append([r["completion"] for r in rows])
        out = []
        for r in rows:
            x = float(r["completion"] == loads(r["reference"]))
            out.append({**r, "reward": x, "rewards": {"exact": x}, "token_rewards": None})
        return out

    return SimpleNamespace(step=step - 1, seed=seed, tokenizer=tokenizer or Tok(), spec=SimpleNamespace(max_new_tokens=max_new_tokens),
                           score=score, calls=calls)


def local_rows():
    """The node's own batch: two groups of two (prompt "5+5=", "6+1=")."""
    rows = []
    for g, (p, ref, comps, rs) in enumerate([("5+5=", "10", ["10", "11"], [1.0, 0.0]), ("6+1=", "7", ["7", "7"], [1.0, 1.0])]):
        for k, (c, r) in enumerate(zip(comps, rs)):
            rows.append({"id": f"{p}#{k}", "prompt_id": p, "group_id": g, "sample_idx": k, "prompt": dumps(p), "prompt_text": p,
                         "prompt_ids": [BOS, *ids(p)], "reference": dumps(ref), "completion": c, "completion_ids": [*ids(c), EOS],
                         "sampler_logps": [-0.5] * (len(c) + 1), "finish_reason": "stop", "reward": r, "rewards": {"exact": r},
                         "prompt_index": 3 + g})
    return rows


# ---------------------------------------------------------------------------------------------------
# the swarm directory


def test_write_is_atomic(tmp_path, monkeypatch):
    """The file appears by one rename of a complete hidden temporary file in the node's own directory; a failed
    rename leaves neither file and is one UserError naming the path."""
    seen = {}
    real = sapo_mod.os.replace

    def spy(src, dst):
        seen["src"], seen["dst"] = src, dst
        seen["src_data"], seen["dst_existed"] = json.loads(Path(src).read_text()), step_path(tmp_path, "a", 3).exists()
        real(src, dst)

    monkeypatch.setattr(sapo_mod.os, "replace", spy)
    path = write_rollouts(tmp_path, "a", 3, [group("1+1=", "2", ["2"])])
    assert path == tmp_path / "a" / "step-00000003.json" and seen["dst"] == path and not seen["dst_existed"]
    assert seen["src"].parent == path.parent and seen["src"].name.startswith(".step-00000003.json.tmp-")
    assert seen["src_data"] == json.loads(path.read_text()) == {"format": FORMAT, "node": "a", "step": 3,
                                                                 "groups": [group("1+1=", "2", ["2"])]}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["step-00000003.json"]

    def broken(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sapo_mod.os, "replace", broken)
    with pytest.raises(UserError, match=r"could not write its rollouts to '.*step-00000004.json' \(Permission denied\)"):
        write_rollouts(tmp_path, "a", 4, [])
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["step-00000003.json"]


def _swarm(tmp_path):
    """Peers of node "b" at step 2: a (steps 1, 2 and a future 3, a write in progress), c (step 2, cut off mid-write),
    d (a file that claims node "x"), e (no step file), "bad name!" (not a node name); b's own files."""
    d = tmp_path / "swarm"
    d.mkdir()
    write_rollouts(d, "a", 1, [group("9+9=", "18", ["18", "1"])])
    write_rollouts(d, "a", 2, [group("1+1=", "2", ["2", "3"]), group("2+2=", "4", ["4", "4"]), group("3+3=", "6", ["6", "5"]),
                               group("1+2=", "3", ["0", "3"])])
    write_rollouts(d, "a", 3, [group("7+7=", "14", ["14", "0"])])
    (d / "a" / ".step-00000002.json.tmp-dead").write_text('{"format": "tokalign.sapo/1", "gro')
    write_rollouts(d, "b", 1, [group("4+4=", "8", ["8", "0"])])
    write_rollouts(d, "c", 2, [group("8+1=", "9", ["9", "0"])])
    text = step_path(d, "c", 2).read_text()
    step_path(d, "c", 2).write_text(text[: len(text) // 2])
    write_rollouts(d, "d", 1, [group("8+2=", "10", ["10", "0"])])
    data = json.loads(step_path(d, "d", 1).read_text())
    step_path(d, "d", 1).write_text(json.dumps({**data, "node": "x"}))
    (d / "e").mkdir()
    (d / "e" / "notes.txt").write_text("hello")
    (d / "bad name!").mkdir()
    write_rollouts(d, "bad name!", 1, [group("0+0=", "0", ["0", "1"])])
    return d


def test_which_peer_files_are_read(tmp_path):
    """At step 2 node b reads a's step 2 (not the future 3, not the hidden temporary file), c's step 2 and d's step 1,
    never its own; c's half file and d's file are skipped with their reasons; e and "bad name!" are no peers."""
    d = _swarm(tmp_path)
    assert [(p, s, path.name, why) for p, s, path, why in peer_files(d, "b", 2)] == [
        ("a", 2, "step-00000002.json", None), ("c", 2, "step-00000002.json", None), ("d", 1, "step-00000001.json", None)]
    assert [(p, s) for p, s, _, _ in peer_files(d, "b", 1)] == [("a", 1), ("d", 1)]
    assert [(p, s) for p, s, _, _ in peer_files(d, "a", 9)] == [("b", 1), ("c", 2), ("d", 1)]
    payloads, skipped = read_swarm(d, "b", 2)
    assert [(p["node"], p["step"], len(p["groups"])) for p in payloads] == [("a", 2, 4)]
    assert [path.rsplit("/", 2)[-2] for path, _ in skipped] == ["c", "d"]
    assert skipped[0][1].startswith("not valid JSON (") and "partial or corrupt write" in skipped[0][1]
    assert skipped[1][1] == "it claims node 'x', but lies in the directory of node 'd'"


@pytest.mark.parametrize("change,reason", [
    ({"format": "other/9"}, "format 'other/9', expected 'tokalign.sapo/1'"),
    ({"step": 5}, "it claims step 5, but its name says step 1"),
    ({"groups": {}}, "no list of groups"),
    ({"groups": [{"prompt": 3, "completions": []}]}, "group 0 has no prompt"),
    ({"groups": [{"prompt": [{"role": "user"}], "completions": []}]}, "group 0 has no prompt"),
    ({"groups": [{"prompt": "q", "completions": []}]}, "group 0 has no completions"),
    ({"groups": [{"prompt": "q", "completions": [{"completion": "a", "reward": float("nan")}]}]}, "group 0 has a completion without"),
    ({"groups": [{"prompt": "q", "completions": [{"completion": 1, "reward": 1.0}]}]}, "group 0 has a completion without"),
])
def test_malformed_files_are_skipped_with_their_reason(tmp_path, change, reason):
    write_rollouts(tmp_path, "a", 1, [group("q", "r", ["a"])])
    data = json.loads(step_path(tmp_path, "a", 1).read_text())
    step_path(tmp_path, "a", 1).write_text(json.dumps({**data, **change}))
    payloads, skipped = read_swarm(tmp_path, "b", 1)
    assert payloads == [] and len(skipped) == 1 and skipped[0][1].startswith(reason)


def test_prune_keeps_the_last_steps(tmp_path):
    for s in range(1, 5):
        write_rollouts(tmp_path, "a", s, [])
    prune(tmp_path, "a", 4, 0)
    assert len(list((tmp_path / "a").iterdir())) == 4
    prune(tmp_path, "a", 4, 2)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-00000003.json", "step-00000004.json"]


def test_wait_for_a_peer_of_this_step(tmp_path):
    """Lock-step: waiting for step 2, a peer's step-2 file written meanwhile is the one read; no peer file of step 2
    in time: the newest earlier one."""
    write_rollouts(tmp_path, "a", 1, [])
    wait_for_peers(tmp_path, "b", 2, 0.2)  # a never writes step 2 here: the wait ends
    assert [s for _, s, _, _ in peer_files(tmp_path, "b", 2)] == [1]
    writer = threading.Timer(0.1, write_rollouts, (tmp_path, "a", 2, []))
    writer.start()
    wait_for_peers(tmp_path, "b", 2, 60.0)
    writer.join()
    assert [s for _, s, _, _ in peer_files(tmp_path, "b", 2)] == [2]


# ---------------------------------------------------------------------------------------------------
# drawing, re-encoding, the hook


def test_draw_by_hand():
    """The draw is torch.randperm(n) under the generator seeded seed·100003 + step·7919 + 65537 (step 0-based), its first
    k sorted: n = 3, k = 2, seed 0, step 1 → [0, 2]; n = 5, seed 3 at steps 0 and 1 → [0, 2], [2, 3]; n ≤ k: all."""
    assert draw(3, 2, 0, 1) == [0, 2]
    assert draw(5, 2, 3, 0) == [0, 2] and draw(5, 2, 3, 1) == [2, 3]
    assert draw(4, 3, 7, 4) == [0, 1, 3]
    assert draw(2, 4, 0, 1) == [0, 1] and draw(0, 4, 0, 1) == []
    g = torch.Generator().manual_seed(0 * 100_003 + 1 * 7919 + 65_537)
    assert sorted(torch.randperm(3, generator=g)[:2].tolist()) == [0, 2]


def test_encode_group_hand():
    """Plain prompt "1+1=" → BOS + its characters; "2" (stop) → its id + EOS; "33" cut by the peer ("length") → no
    EOS; "123456" under max_new_tokens 4 → its first 4 ids, now "length"; messages → this tokenizer's chat template."""
    payload = {"node": "a", "step": 2}
    g = {"prompt_id": "p7", "prompt": "1+1=", "reference": "2",
         "completions": [{"completion": "2", "finish_reason": "stop", "reward": 0.5}, {"completion": "33", "finish_reason": "length", "reward": 0.0},
                         {"completion": "123456", "finish_reason": "stop", "reward": 1.0}]}
    rows = encode_group(payload, g, Tok(), 4)
    assert [r["prompt_ids"] for r in rows] == [[BOS, *ids("1+1=")]] * 3
    assert [r["completion_ids"] for r in rows] == [[*ids("2"), EOS], ids("33"), ids("1234")]
    assert [r["finish_reason"] for r in rows] == ["stop", "length", "length"]
    assert [r["reward"] for r in rows] == [0.5, 0.0, 1.0] and all(r["sampler_logps"] is None for r in rows)
    assert [r["id"] for r in rows] == ["a/2/p7#0", "a/2/p7#1", "a/2/p7#2"] and rows[0]["reference"] == '"2"'
    chat = encode_group(payload, {**g, "prompt": [{"role": "user", "content": "1+1="}]}, ChatTok(), 8)
    assert chat[0]["prompt_text"] == "<user>1+1=<assistant>" and chat[0]["prompt_ids"] == ids("<user>1+1=<assistant>")


def test_hook_two_nodes_hand(tmp_path, capsys):
    """Node b at step 2, J = 2, seed 0. It writes its own two groups, then reads only a's step-2 file (c, d skipped).
    a shared every reward as 0, but b re-scores (exact match): "1+1=" 1, 0 · "2+2=" 1, 1 (all equal: dropped) · "3+3=" 1,
    0 · "1+2=" 0, 1 → pool ["1+1=", "3+3=", "1+2="]; draw(3, 2, 0, 1) = [0, 2] → "1+1=" and "1+2=", as groups 2 and 3
    after b's 0, 1, external reward mean (1 + 0 + 0 + 1)/4 = 0.5."""
    d = _swarm(tmp_path)
    cfg = SAPOConfig(swarm_dir=str(d), node="b", external=2)
    hook = next(h for h in SAPO(cfg).needs.hooks if isinstance(h, SwarmExchange))
    rows = local_rows()
    c = ctx(step=2)
    metrics = hook.after_batch(rows, c)
    assert metrics == {"swarm/shared_rows": 4.0, "swarm/peers": 1.0, "swarm/skipped_files": 2.0, "swarm/peer_lag_mean": 0.0,
                       "swarm/pool_groups": 3.0, "swarm/external_groups": 2.0, "swarm/external_rows": 4.0,
                       "swarm/external_reward_mean": 0.5}
    assert c.calls == [["2", "3", "4", "4", "6", "5", "0", "3"]]  # the whole pool, one call, before the filter
    own, ext = rows[:4], rows[4:]
    assert [r["fields"][EXTERNAL_FIELD] for r in own] == [0.0] * 4 and [r["prompt_index"] for r in own] == [3, 3, 4, 4]
    assert [(r["group_id"], r["prompt_id"], r["completion"], r["reward"]) for r in ext] == [
        (2, "a/2/1+1=", "2", 1.0), (2, "a/2/1+1=", "3", 0.0), (3, "a/2/1+2=", "0", 0.0), (3, "a/2/1+2=", "3", 1.0)]
    assert all(r["fields"][EXTERNAL_FIELD] == 1.0 and r["prompt_index"] == -1 and r["sampler_logps"] is None for r in ext)
    assert ext[0]["prompt_ids"] == [BOS, *ids("1+1=")] and ext[0]["completion_ids"] == [*ids("2"), EOS]
    # b's own file holds its batch as text, with its rewards
    mine = json.loads(step_path(d, "b", 2).read_text())
    assert mine["node"] == "b" and mine["step"] == 2 and mine["groups"] == shared_groups(local_rows())
    assert [[x["completion"] for x in g["completions"]] for g in mine["groups"]] == [["10", "11"], ["7", "7"]]
    assert mine["groups"][0]["completions"][1] == {"completion": "11", "finish_reason": "stop", "reward": 0.0, "rewards": {"exact": 0.0}}
    err = capsys.readouterr().err
    assert err.count("warning: sapo skipped the swarm file") == 2 and "claims node 'x'" in err and "not valid JSON" in err
    hook.after_batch(local_rows(), ctx(step=2))  # the same bad files again: no second warning
    assert "warning" not in capsys.readouterr().err


def test_hook_without_rescoring_or_filter(tmp_path):
    """rescore off: a's shared rewards (all 0) are used, so the zero-advantage filter leaves no pool and the batch is
    the node's own (its rows get sapo_external 0); the filter off too: J = 2 of a's 4 groups, draw(4, 2, 0, 1) = [1, 3],
    with the peer's rewards and no scoring call."""
    d = _swarm(tmp_path)
    rows, c = local_rows(), ctx(step=2)
    metrics = SwarmExchange(SAPOConfig(swarm_dir=str(d), node="b", external=2, rescore=False)).after_batch(rows, c)
    assert len(rows) == 4 and metrics["swarm/pool_groups"] == 0 and metrics["swarm/external_rows"] == 0 and c.calls == []
    rows = local_rows()
    hook = SwarmExchange(SAPOConfig(swarm_dir=str(d), node="b", external=2, rescore=False, filter_zero_advantage=False))
    metrics = hook.after_batch(rows, c)
    assert [(r["group_id"], r["prompt_id"], r["reward"]) for r in rows[4:]] == [
        (2, "a/2/2+2=", 0.0), (2, "a/2/2+2=", 0.0), (3, "a/2/1+2=", 0.0), (3, "a/2/1+2=", 0.0)]
    assert metrics["swarm/pool_groups"] == 4 and metrics["swarm/external_reward_mean"] == 0.0 and c.calls == []
    # re-scoring without the filter: only the drawn groups are scored
    c = ctx(step=2)
    SwarmExchange(SAPOConfig(swarm_dir=str(d), node="b", external=2, filter_zero_advantage=False)).after_batch(local_rows(), c)
    assert c.calls == [["4", "4", "0", "3"]]


def test_hook_share_only_and_empty_swarm(tmp_path):
    """external 0: the node writes its file, reads nothing, leaves its rows as they were. The first node of a swarm
    (no peer yet): its rows only, marked 0."""
    rows = local_rows()
    metrics = SwarmExchange(SAPOConfig(swarm_dir=str(tmp_path), node="a", external=0)).after_batch(rows, ctx(step=1))
    assert metrics == {"swarm/shared_rows": 4.0} and rows == local_rows() and step_path(tmp_path, "a", 1).exists()
    rows = local_rows()
    metrics = SwarmExchange(SAPOConfig(swarm_dir=str(tmp_path), node="b", external=4)).after_batch(rows, ctx(step=1))
    assert metrics["swarm/peers"] == 1 and metrics["swarm/pool_groups"] == 1 and metrics["swarm/external_groups"] == 1
    rows = local_rows()
    empty = tmp_path / "empty"
    empty.mkdir()
    metrics = SwarmExchange(SAPOConfig(swarm_dir=str(empty), node="b")).after_batch(rows, ctx(step=1))
    assert len(rows) == 4 and metrics["swarm/peers"] == 0 and metrics["swarm/external_rows"] == 0
    assert [r["fields"] for r in rows] == [{EXTERNAL_FIELD: 0.0}] * 4


def test_multi_turn_rows_are_not_shared():
    rows = local_rows()
    rows[0]["episode"] = rows[1]["episode"] = dumps({"turns": []})
    assert [g["prompt"] for g in shared_groups(rows)] == ["6+1="]


# ---------------------------------------------------------------------------------------------------
# the loss

LENGTHS = [2, 1, 1, 2]  # rows 0, 1: local group 0 (R = 1, 0); rows 2, 3: external group 1 (R = 1, 0)


def _mixed(old, external=(0.0, 0.0, 1.0, 1.0)):
    mask = torch.tensor([[1.0] * n + [0.0] * (2 - n) for n in LENGTHS])
    sampler = old + torch.log(torch.tensor(2.0))  # local rows: the sampler gave each token twice the trainer's probability
    sampler[2:] = 0.0  # external rows: no sampler log-probs (what collate leaves for None)
    f = {"rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]), "group_ids": torch.tensor([0, 0, 1, 1]), "old_logps": old.clone(),
         "sampler_logps": sampler * mask, EXTERNAL_FIELD: torch.tensor(external)}
    return token_batch(mask, f, {"tokens": float(mask.sum()), "seqs": 4.0})


def test_mixed_batch_loss_hand():
    """Both groups R = 1, 0 → A = ±0.5/(√0.5 + 1e-6) = ±a, a = 0.70711. Token-level mismatch correction: the local rows'
    weight w = min(π_trainer/π_sampler, 2) = ½; the external rows', whose sampler log-probs are none, 1 (not
    exp(ℓ^old − 0)). On policy (ρ = 1), token-mean over N = 6: loss = −Σ_i A_i w_i |o_i| / N
    = −(a·½·2 − a·½·1 + a·1·1 − a·1·2)/6 = a/12 = 0.058926; ∂loss/∂ℓ_t = −A_i w_i / N."""
    old = -torch.rand(4, 2, generator=torch.Generator().manual_seed(4)) - 0.5
    algo = SAPO(SAPOConfig(mismatch_correction="token"))
    batch = algo.prepare(_mixed(old))
    a = 0.5 / (0.5 ** 0.5 + 1e-6)
    assert_close(batch.fields["advantages"], torch.tensor([a, -a, a, -a]))
    lp = leaf(old)
    out = algo.loss(batch, PolicyOutput(lp))
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(a / 12, rel=1e-6)
    w = torch.tensor([0.5, 0.5, 1.0, 1.0])
    grad = torch.tensor([[-x * wi / 6] * n + [0.0] * (2 - n) for x, wi, n in zip([a, -a, a, -a], w, LENGTHS)])
    assert_close(lp.grad, grad)
    assert out.metrics["swarm/external_fraction"] == 0.5
    assert out.metrics["mismatch/is_weight_mean"] == pytest.approx((0.5 * 3 + 1.0 * 3) / 6)
    assert torch.equal(batch.fields["sampler_logps"][2:], torch.zeros(2, 2))  # the batch itself is left as it was
    # = GRPO on the same batch with the external rows' sampler log-probs set to the trainer's own
    fixed = _mixed(old)
    fixed.fields["sampler_logps"][2:] = old[2:] * fixed.completion_mask[2:]
    grpo = GRPO(GRPOConfig(mismatch_correction="token", epsilon_high=0.28))
    lp2 = leaf(old)
    res = grpo.loss(grpo.prepare(fixed), PolicyOutput(lp2))
    res.loss.backward()
    assert torch.equal(res.loss.detach(), out.loss.detach()) and torch.equal(lp2.grad, lp.grad)


def test_off_policy_external_rows_clip_like_grpo():
    """ρ ≠ 1 (a second update on the batch): external rows are clipped like local ones; row 2 (A = a > 0) at
    ρ = e^0.5 > 1.28 has no gradient."""
    old = torch.full((4, 2), -1.0)
    algo = SAPO(SAPOConfig())
    batch = algo.prepare(_mixed(old))
    lp = leaf(old + torch.tensor([0.0, 0.0, 0.5, 0.0]).unsqueeze(-1))
    algo.loss(batch, PolicyOutput(lp)).loss.backward()
    assert lp.grad[2, 0] == 0.0 and lp.grad[0, 0] != 0.0 and lp.grad[3, 0] != 0.0


# ---------------------------------------------------------------------------------------------------
# limits: no swarm, or external 0, is GRPO bit for bit


def test_no_swarm_is_grpo(tmp_path):
    """swarm_dir "": GRPO's needs (no hook, scored data allowed); external 0 with a swarm: only the sharing hook. On
    any batch — with the external field (all 0) or without — rewards, advantages, loss and gradient are GRPO's (with
    the paper's ε_high 0.28), bit for bit."""
    assert SAPO(SAPOConfig()).needs == GRPO(GRPOConfig(epsilon_high=0.28)).needs
    share_only = SAPO(SAPOConfig(swarm_dir=str(tmp_path), node="a", external=0)).needs
    assert share_only.data == ("online",) and [type(h) for h in share_only.hooks] == [SwarmExchange]
    torch.manual_seed(0)
    values = -torch.rand(4, 2) * 3
    old = values + 0.3 * torch.randn(4, 2)
    cfg = {"beta": 0.04, "mismatch_correction": "token", "epsilon_high": 0.28}
    for external in ((0.0,) * 4, None):
        def make(external=external):
            b = _mixed(old.clone())
            if external is None:
                del b.fields[EXTERNAL_FIELD]
            else:
                b.fields[EXTERNAL_FIELD] = torch.tensor(external)
            return b

        same_as_base([SAPO(SAPOConfig(**cfg)), SAPO(SAPOConfig(swarm_dir=str(tmp_path), node="a", external=0, **cfg)),
                      GRPO(GRPOConfig(**cfg))], make, values)


# ---------------------------------------------------------------------------------------------------
# config


def test_swarm_dir_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"swarm directory '.*nowhere' does not exist .*mkdir -p"):
        SAPOConfig(swarm_dir=str(tmp_path / "nowhere"), node="a")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is not a directory"):
        SAPOConfig(swarm_dir=str(tmp_path / "file"), node="a")
    monkeypatch.setattr(sapo_mod.os, "access", lambda *a, **k: False)  # as a read-only mount answers (root passes chmod)
    with pytest.raises(UserError, match=r"swarm directory '.*' is not writable by this user"):
        SAPOConfig(swarm_dir=str(tmp_path), node="a")


@pytest.mark.parametrize("kwargs,match", [
    ({"node": ""}, "node must name this node"), ({"node": "a/b"}, "node must name this node"),
    ({"node": ".hidden"}, "node must name this node"), ({"external": -1}, "external and keep must be ≥ 0"),
    ({"keep": -2}, "external and keep must be ≥ 0"), ({"wait_s": float("inf")}, "wait_s must be"),
    ({"aggregation": "bogus"}, "aggregation must be"),
])
def test_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAPOConfig(**{"swarm_dir": str(tmp_path), "node": "a", **kwargs})


def test_config_without_swarm_needs_no_node():
    assert SAPOConfig(external=0).node == "" and SAPOConfig().external == 4 and SAPOConfig().epsilon_high == 0.28


def test_cli_missing_swarm_dir_is_one_line(tmp_path):
    proc = cli("train", SAPO_PATH, "--data", "arith", "--set", f"algorithm.swarm_dir={tmp_path / 'nowhere'}",
               "--set", "algorithm.node=a", "--max-steps", "1", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------
# the real CLI: two nodes sharing one swarm directory, one after the other


def _train(tmp_path, name, *args):
    out = tmp_path / name
    proc = cli("train", *args, "--data", "arith", "--n", "2", "--max-steps", "2", "--batch-size", "2", "--out", str(out), "--quiet")
    assert proc.stdout.strip() == str(out)
    return out, run_metrics(out)


def _no_swarm(metrics):
    return [{k: v for k, v in m.items() if not k.startswith("swarm/")} for m in metrics]


@pytest.mark.slow
def test_cli_two_nodes(tmp_path):
    """grpo (ε_high 0.28) and sapo without a swarm log the same metrics. Node a (external 0) shares and trains as
    grpo — the same metrics but swarm/*, the same weights. Node b (another seed, J = 2, no filter) then draws a's two
    groups of the same step (a's newest file at or before it) into every batch: 4 external rows, whose re-scored
    reward mean is a's own logged reward mean."""
    from safetensors.torch import load_file

    swarm = tmp_path / "swarm"
    swarm.mkdir()
    grpo, grpo_m = _train(tmp_path, "grpo", "grpo", "--set", "algorithm.epsilon_high=0.28")
    _, plain_m = _train(tmp_path, "plain", SAPO_PATH)
    assert plain_m == grpo_m
    a, a_m = _train(tmp_path, "a", SAPO_PATH, "--set", f"algorithm.swarm_dir={swarm}", "--set", "algorithm.node=a",
                    "--set", "algorithm.external=0")
    assert _no_swarm(a_m) == grpo_m and [m["swarm/shared_rows"] for m in a_m] == [4.0, 4.0]
    wa, wg = load_file(a / "model.safetensors"), load_file(grpo / "model.safetensors")
    assert all(torch.equal(wa[k], wg[k]) for k in wg)
    assert sorted(p.name for p in (swarm / "a").iterdir()) == ["step-00000001.json", "step-00000002.json"]

    b, b_m = _train(tmp_path, "b", SAPO_PATH, "--seed", "1", "--set", f"algorithm.swarm_dir={swarm}", "--set", "algorithm.node=b",
                    "--set", "algorithm.external=2", "--set", "algorithm.filter_zero_advantage=false")
    for mb, ma in zip(b_m, a_m):
        assert mb["swarm/peers"] == 1 and mb["swarm/peer_lag_mean"] == 0 and mb["swarm/skipped_files"] == 0
        assert mb["swarm/external_groups"] == 2 and mb["swarm/external_rows"] == 4 and mb["swarm/external_fraction"] == 0.5
        assert mb["swarm/external_reward_mean"] == pytest.approx(ma["reward/mean"])
    assert weights_changed(b) and (swarm / "b" / "step-00000002.json").exists()
    shared = json.loads((swarm / "a" / "step-00000002.json").read_text())
    assert [len(g["completions"]) for g in shared["groups"]] == [2, 2] and shared["node"] == "a" and shared["step"] == 2
