"""T-PPO — "Truncated Proximal Policy Optimization", Fan, Liu, Yue, Chen, Wang, Yu, Zhang, Lin, Zhu, Yuan, Zuo, Ma,
Zhang, Liu, Zhang, Zhou, Xie, Zhu, Zhang, Liu, Wang, Yan, Wu (ByteDance Seed) 2025, arXiv:2506.15050 (no official code
found). PPO (tokalign/algorithms/ppo.py: value head, GAE, clipped losses) whose long responses are generated a window
at a time: each step gives a response at most L = ``rollout.max_new_tokens`` new tokens. A response cut at the window
is trained on at once — its advantages from Extended GAE (EGAE), which bootstraps from the critic at the cut — and
continued at the next step; fresh prompts fill the rest of the batch. The critic fits finished responses only.

Shapes: ``rewards``, ``tppo_unfinished`` (1: cut at the window and continued next step; the hook's): [B];
``tppo_window`` (1 on the tokens generated at this step; the hook's), ``logps``, ``old_logps``, ``ref_logps``,
``old_values``, ``values``, ``token_rewards``, mask: [B, T]; ``tppo_policy_mask`` / ``tppo_value_mask`` (the tokens
each loss uses, from ``prepare``): [B, T].

    windows    a response has at most W = ``windows`` windows; after one it is finished (EOS, or the total budget W·L:
               finish_reason "length", terminal as in PPO) or unfinished (cut at the window, fewer than W so far)
    rewards    r_t = −β·k1_t + token_rewards_t + 1[t = last]·(R − Σ token_rewards)      (finished: PPO's)
               r_t = −β·k1_t                                                          (unfinished: no reward yet)
    EGAE       unfinished after l tokens: V(s_l) := V(s_{l−1}), so δ_{l−1} = r_{l−1} + γ V_{l−1} − V_{l−1};
               otherwise δ_t = r_t + γ V_{t+1} − V_t,  A_t = Σ_k (γλ)^k δ_{t+k} up to the row's last token,
               G_t = A_t + V_t  (finished: PPO's GAE, V = 0 past the end)
    policy     PPO's clipped (dual-clip) surrogate over P = the tokens generated at this step, of every row (finished
               and unfinished); A whitened over P
    value      PPO's clipped value loss over C = every token of the finished rows (earlier windows' included)
    loss = aggregate_P(L^π) + vf_coef · aggregate_C(L^V)       (each over its own tokens and rows of the whole batch)

EGAE is PPO's GAE with the bootstrap folded into the reward: ``dense_reward`` adds γ·V_{l−1} on an unfinished row's
last token, where ``ops.gae`` takes V = 0 past it. A response's earlier windows were sampled by older policies: the
trainer's ``old_logps`` of them are recomputed with the others, but only the critic (once the response finishes)
trains on them — they are the policy's "prompt". The hook (``WindowedSampling``, via ``collect``) keeps the unfinished
rows between steps (in checkpoints too), continues them from prompt + their tokens so far with one sample each, and
fills the batch's ``batch_size`` groups with fresh prompts (``rollout.n`` samples each); only finished responses are
scored (the length-aware rewards see the budget W·L as ``max_new_tokens``).

Defaults and their source: PPO's (TRL's PPO with verl's dual clip, see ppo.py); ``windows`` 3 (tokalign's, ⚠);
``value_on_unfinished`` False (the critic fits finished responses only, as the reviews below describe the paper).

Limits: ``windows`` = 1 is PPO bit for bit (no hook, every response terminal; tested), and so is any batch whose
responses all finish in their first window (tested). γ = 1 (PPO's default) makes the bootstrap cancel V_{l−1}:
δ_{l−1} = r_{l−1}, so an unfinished row's advantages are the discounted TD errors of its own values and KL terms —
all 0 with a fresh critic (V = 0) before the policy leaves the reference: a step whose rows are all unfinished then
has no gradient (the CLI test's first step; a review of the paper raises the same point).
Online only with W > 1 (scored data cannot be continued: a scored row cut at the sampler's limit is terminal, which is
PPO). Single-turn completions (a multi-turn episode cannot be resumed mid-turn: refused). The prompt plus W·L tokens
must fit ``train.max_length``: the loop's truncation cuts a completion's end, which here is the policy's window.

⚠ unchecked: the paper's text past the abstract was not readable offline. Read from its ICLR 2026 reviews (stored in
the code index) and third-party summaries: EGAE truncates the advantage sum at the window assuming V(s_l) = V(s_{l−1})
("the core assumption of TPPO, V(s_l) = V(s_{l−1})"); "the policy is updated frequently on partial data, while the
value function is updated less frequently on completed trajectories"; "during policy updates, all generated tokens
are included", while the value update's token count varies with the completed responses. From these, tokalign's
readings: an unfinished row's outcome (and per-token) rewards are not used before it finishes; the policy trains on
the step's new tokens only (the abstract's "filtering prompt and truncated tokens"); advantages are whitened over
those tokens; the critic's returns use PPO's λ (the paper's critic λ is unknown; VAPO, arXiv:2504.05118, by the same
group, fits its critic with λ = 1); W = 3 and every other hyperparameter (the paper's window length, γ, λ, learning rates) are tokalign's.

Departures: the critic updates at every step, on the batch's finished rows (the paper updates it "less frequently");
the batch is ``batch_size`` prompt groups — carried rows grouped by the prompt they came from, then fresh prompts —
so with ``rollout.n`` > 1 its row count varies (summaries describe a constant number of sequences). Reward metrics
(``reward/*``) are over the responses finished at the step (over every row, unscored ones 0, at a step where none
finished). Several processes: every process samples the whole batch itself (as MRT's and SPO's hooks do), so they
must sample alike (vLLM's per-call seeds). The seq-mean-token-sum-norm normaliser stays ``rollout.max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokalign import ops
from tokalign.algorithms.ppo import PPO, PPOConfig
from tokalign.errors import UserError
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch
from tokalign.rows import rollout_rows
from tokalign.sampling import Hook, set_field, set_token_field

UNFINISHED, WINDOW = "tppo_unfinished", "tppo_window"
POLICY_MASK, VALUE_MASK = "tppo_policy_mask", "tppo_value_mask"
# the hook's bookkeeping on each row: windows sampled so far, where this step's window starts, the prompt group it came
# from ([step, group]); the row schema ignores keys it does not know
WINDOWS_USED, START, GROUP = "tppo_windows", "tppo_start", "tppo_group"


@dataclass
class TPPOConfig(PPOConfig):
    windows: int = 3  # W: the most windows of rollout.max_new_tokens tokens a response gets; 1 = PPO
    value_on_unfinished: bool = False  # the critic also fits unfinished rows (their EGAE returns); the paper: no

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.windows, bool) or not isinstance(self.windows, int) or self.windows < 1:
            raise ValueError(f"windows must be an integer ≥ 1 (1 = PPO), got {self.windows!r}")


class WindowedSampling(Hook):
    """T-PPO's sampling: each step continues the rows left unfinished by the last one (one sample each, from prompt +
    completion so far, one more window) and samples fresh prompts for the rest of the ``batch_size`` groups. A row is
    unfinished when its window was cut ("length") and it has had fewer than ``windows`` windows; only finished rows
    are scored. Row field ``tppo_unfinished``, token field ``tppo_window`` (1 on the step's new tokens)."""

    name = "tppo_windows"

    def __init__(self, windows: int):
        self.windows = windows
        self.pool: list[dict] = []  # the unfinished rows, continued at the next step

    def state_dict(self) -> dict:
        return {"pool": [dict(r) for r in self.pool]}

    def load_state_dict(self, state: dict) -> None:
        self.pool = [dict(r) for r in state["pool"]]

    def collect(self, ctx):
        budget = ctx.spec.max_new_tokens * self.windows
        carried: dict[tuple, list[dict]] = {}  # the prompt group each unfinished row came from
        for r in self.pool:
            carried.setdefault(tuple(r[GROUP]), []).append(r)
        picked = ctx.pick(ctx.step, 0)[: max(ctx.batch_size - len(carried), 0)]
        rows = self._continue(ctx, [r for g in carried.values() for r in g])
        if picked:
            prompts = [ctx.rows[i] for i in picked]
            fresh = rollout_rows(prompts, _single_turn(ctx.generate([p["prompt_ids"] for p in prompts])), budget)
            rows += [{**r, "prompt_index": picked[r["group_id"]], WINDOWS_USED: 1, START: 0, GROUP: [ctx.step, r["group_id"]]}
                     for r in fresh]
        unfinished = [r["finish_reason"] == "length" and r[WINDOWS_USED] < self.windows for r in rows]
        scored = iter(ctx.score([r for r, u in zip(rows, unfinished) if not u]) if not all(unfinished) else [])
        out = []
        for r, u in zip(rows, unfinished):
            r = {**r, "reward": 0.0, "token_rewards": None} if u else next(scored)  # no reward before it finishes
            set_field(r, UNFINISHED, float(u))
            set_token_field(r, WINDOW, [0.0] * r[START] + [1.0] * (len(r["completion_ids"]) - r[START]))
            out.append(r)
        self.pool = [{k: v for k, v in r.items() if k not in ("fields", "token_fields")} for r, u in zip(out, unfinished) if u]
        groups: dict[tuple, list[dict]] = {}
        for r in out:
            groups.setdefault(tuple(r[GROUP]), []).append(r)
        done = [r for r, u in zip(out, unfinished) if not u]
        metrics = {"tppo/carried_rows": float(sum(map(len, carried.values()))), "tppo/fresh_prompts": float(len(picked)),
                   "tppo/finished_rows": float(len(done)), "tppo/unfinished_fraction": sum(unfinished) / len(out),
                   "tppo/windows_mean": sum(r[WINDOWS_USED] for r in done) / len(done) if done else 0.0}
        return list(groups.values()), done or out, metrics

    def _continue(self, ctx, rows: list[dict]) -> list[dict]:
        """Each row with one more window: prompt + completion so far, sampled once more."""
        if not rows:
            return []
        outs = _single_turn(ctx.generate([r["prompt_ids"] + list(r["completion_ids"]) for r in rows], n=1))
        continued = []
        for r, (k, *_) in zip(rows, outs):
            ids = list(r["completion_ids"]) + list(k.ids)
            continued.append({**r, "completion_ids": ids, "completion": ctx.tokenizer.decode(ids, skip_special_tokens=True),
                              "sampler_logps": list(r["sampler_logps"] or []) + list(k.logps), "finish_reason": k.finish_reason,
                              WINDOWS_USED: r[WINDOWS_USED] + 1, START: len(r["completion_ids"])})
        return continued


def _single_turn(completions):
    if any(k.loss_mask is not None for ks in completions for k in ks):
        raise UserError("tppo continues single-turn completions; a multi-turn episode (rollout.env) cannot be resumed "
                        "mid-turn: drop rollout.env, or set --set algorithm.windows=1 for PPO")
    return completions


def _value_loss(values, old_values, returns, eps: float) -> torch.Tensor:
    """PPO's clipped value loss per token: ½ max((V − G)², (clip(V, V_old ± ε) − G)²)."""
    clipped = old_values + (values - old_values).clamp(-eps, eps)
    return 0.5 * torch.maximum((values - returns).square(), (clipped - returns).square())


class TPPO(PPO):
    Config = TPPOConfig

    def __init__(self, config: TPPOConfig):
        super().__init__(config)
        if config.windows > 1:  # W = 1: every response is terminal after its one window — PPO's needs, no hook
            self.needs = dataclasses.replace(self.needs, data=("online",),
                                             hooks=(*self.needs.hooks, WindowedSampling(config.windows)))

    @staticmethod
    def unfinished(batch: TokenBatch) -> torch.Tensor:
        """[B] bool: the rows cut at the window that the next step continues."""
        u = batch.fields.get(UNFINISHED)
        return torch.zeros(len(batch), dtype=torch.bool, device=batch.completion_mask.device) if u is None else u > 0

    def dense_reward(self, batch: TokenBatch):
        """EGAE's bootstrap γ·V(s_l), V(s_l) := V_{l−1}, on each unfinished row's last token (``ops.gae`` takes V = 0
        past it, so its TD error there becomes r + γ V_{l−1} − V_{l−1})."""
        extra = super().dense_reward(batch)
        u = self.unfinished(batch)
        if not bool(u.any()):
            return extra
        mask = batch.completion_mask
        last = ops.last_token_mask(mask) * u.unsqueeze(-1).to(mask.dtype)
        return extra + last * self.discounts(batch) * batch.fields["old_values"]

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> TokenBatch:
        c, f, mask = self.config, batch.fields, batch.completion_mask
        u = self.unfinished(batch)
        kept = {k: f[k] for k in ("rewards", "token_rewards") if k in f}
        if bool(u.any()):  # an unfinished response has no reward yet (whatever its row says): only its KL terms
            f["rewards"] = f["rewards"].masked_fill(u, 0.0)
            if "token_rewards" in f:
                f["token_rewards"] = f["token_rewards"].masked_fill(u.unsqueeze(-1), 0.0)
        try:
            batch = super().prepare(batch)
        finally:
            f.update(kept)
        policy = mask * f[WINDOW] if WINDOW in f else mask
        value = mask if c.value_on_unfinished else mask * (~u).unsqueeze(-1).to(mask.dtype)
        if c.whiten_advantages and not torch.equal(policy, mask):
            # PPO whitened over every token; whitening is affine-invariant, so this is P's own (up to its ε)
            f["advantages"] = ops.masked_whiten(f["advantages"], policy) * policy
        f[POLICY_MASK], f[VALUE_MASK] = policy, value
        t = batch.totals
        for name, m in (("policy", policy), ("value", value)):  # PPO's whole-batch totals less what the loss leaves out
            if "tokens" in t:
                t[f"tppo_{name}_tokens"] = t["tokens"] - float((mask - m).sum())
            if "seqs" in t:
                t[f"tppo_{name}_seqs"] = t["seqs"] - float(((m.sum(-1) == 0) & (mask.sum(-1) > 0)).sum())
        return batch

    def _aggregate(self, values: torch.Tensor, mask: torch.Tensor, batch: TokenBatch, name: str) -> torch.Tensor:
        t = batch.totals
        seqs = t.get(f"tppo_{name}_seqs", t.get("seqs"))
        return ops.aggregate(values, mask, self.config.aggregation, total_tokens=t.get(f"tppo_{name}_tokens", t.get("tokens")),
                             total_seqs=None if seqs is None else max(seqs, 1.0), max_len=t.get("max_completion_len"))

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        c, f, t = self.config, batch.fields, batch.totals
        policy, value = f.get(POLICY_MASK, batch.completion_mask), f.get(VALUE_MASK, batch.completion_mask)
        if c.dual_clip:
            pg, clipped, _ = ops.dual_clip_surrogate(out.logps, f["old_logps"], f["advantages"], c.epsilon, c.epsilon, c.dual_clip)
        else:
            pg, clipped = ops.clipped_surrogate(out.logps, f["old_logps"], f["advantages"], c.epsilon, c.epsilon)
        vf = _value_loss(out.values, f["old_values"], f["returns"], c.epsilon_value)
        pg_loss, vf_loss = self._aggregate(pg, policy, batch, "policy"), self._aggregate(vf, value, batch, "value")
        share = len(batch) / t["seqs"] if t.get("seqs") else 1.0  # metrics as whole-batch values (see ppo.py)
        metrics = {"pg_loss": float(pg_loss.detach()) / share, "vf_loss": float(vf_loss.detach()) / share,
                   "clip_fraction": float(ops.masked_mean(clipped.float(), policy)),
                   "values/mean": float(ops.masked_mean(out.values.detach(), value)),
                   "returns/mean": float(ops.masked_mean(f["returns"], value))}
        return LossOutput(pg_loss + c.vf_coef * vf_loss, metrics)
