"""SAPO — "Sharing is Caring: Efficient LM Post-Training with Collective RL Experience Sharing" (Swarm sAmpling Policy
Optimization), Gensyn AI Team: Amico, Andrade, Donaghy, Fielding, Forbus, Grieve, Kara, Kolehmainen, Lou, Nies, Flores
Nuño, Ortega, Rastogi, Virts, Wright, 2025, arXiv:2509.08721. A swarm of nodes post-trains without synchronising
weights: each node trains its own policy, samples rollouts for its own questions, shares them decoded (as text) with
the swarm, and trains GRPO on a batch of I of its own rollouts and J drawn from what the others shared, re-encoding
those with its own tokenizer and re-scoring them with its own rewards, as if its policy had sampled them.

Here a node is one ``tokalign train sapo`` run; the swarm is a directory every node can read and write
(``swarm_dir``, e.g. on a shared filesystem), a node's name ``node``. Shapes: ``rewards``, ``group_ids``,
``sapo_external`` (1 on a row drawn from the swarm, 0 on the node's own): [B]; ``logps``, ``old_logps``,
``sampler_logps``, ``ref_logps``, mask: [B, T]. A "rollout" is, as in the paper, one question with its n completions:
a group.

    step s (1-based, as metrics.jsonl): sample the B = I local groups of the step (rollout.n completions each), score them
    write  <swarm_dir>/<node>/step-<s:08d>.json      (prompt, reference, completion texts, rewards, node, s; atomic)
    pool   P_s = the groups of every other node's newest file with step ≤ s (nodes in name order, groups in file order),
                 re-encoded (prompt through this tokenizer's chat template, completion text → ids + EOS unless it was
                 cut at the length limit, cut to rollout.max_new_tokens) and re-scored by this run's rewards
                 (``rescore``); groups whose rewards are all equal — zero GRPO advantage — dropped (``filter_zero_advantage``)
    draw   E_s = J groups of P_s uniformly without replacement (all of them if |P_s| ≤ J), by a generator seeded by
                 (seed, s) alone: a resumed run draws the same groups from the same files
    batch  T_s = local groups ∪ E_s (extra groups, ids after the local ones): |T_s| = I + J groups
    loss   GRPO's on T_s: A_i = (R_i − mean_g R) / (std_g R + eps) within each group, clipped surrogate
           ρ_t = exp(ℓ_t − ℓ^old_t), + β·KL, aggregated over all rows alike

Behaviour log-probs: an external row has none from this policy, so ℓ^old is this policy's own detached log-prob, as
for a local row (the loop computes ℓ^old for every row from the current policy; with one update per batch ρ = 1 on
every token — exactly the official trainer's ``old_per_token_logps = per_token_logps.detach()``). The peer's sampler
log-probs are not shared (another policy, another tokenizer); for the sampler/trainer mismatch correction an external
row's sampler log-probs are set to ℓ^old (weight 1, gap 0: the metric ``mismatch/logp_gap_abs`` averages those zeros in).

Official code: gensyn-ai/rl-swarm (``rgym_exp``, before the code-generation swarm replaced it) on GenRL 0.1.x. Each
round the node generates ``num_generations`` completions per question, ``all_gather_object``s its own round's payloads
(question, answer, metadata, completion texts: no rewards, no token ids) through a hivemind DHT, waiting for the swarm up
to a timeout; ``ReasoningGymDataManager.transplant_trees`` takes up to ``num_transplant_trees`` payloads of *other*
agents (ones not already in its own game trees) whose completions are a list of exactly ``num_generations`` strings —
the first found (an earlier version: ``random.sample``), no zero-advantage filter — and adds each as a new tree (a
question with its completions); ``RGRewards`` then scores every tree, transplanted ones included, with the node's own
ReasoningGym verifier against the shared answer, and ``GRPOLanguageTrainerModule.step`` re-templates the prompts and
re-tokenises the completion texts with the node's tokenizer, takes advantages per tree (``(r − mean) / (std + 1e-8)``),
and trains one PPO-clip step with old log-probs = current detached, token-mean. ``rg-swarm.yaml``: ``num_generations``
2, ``num_transplant_trees`` 2, ``num_train_samples`` 2, ε 0.2, ε_high 0.28.

Defaults and their source: J = ``external`` 4 (the paper's best, 4 local / 4 external: run with ``--batch-size 4``; its
other settings 6/2 and 2/6; 8/0 is the baseline); ``filter_zero_advantage`` on (the paper's controlled experiments:
"all nodes first discard rollouts with zero advantage, and then uniformly sample"; its open demo and the official code
did not filter); ``rescore`` on (the paper: "uses its local reward model ρ^n to compute rewards over T^n"; the official
code re-scores every transplanted tree); ε_low 0.2, ε_high 0.28, β = 0 (the paper §4.2 and the official config; so the
limit below is GRPO with ε_high 0.28). The paper's n = 8 completions per question and Adam with lr 1e-3 are the run's
``rollout.n`` and ``train`` settings, not this module's.

Limits: ``swarm_dir`` "" is GRPO bit for bit (no hook, scored data allowed: tested); ``external`` 0 with a ``swarm_dir``
is a node that shares and draws nothing — GRPO bit for bit too (tested, also through the CLI); an empty pool (the first
node of a swarm, or every shared group of equal rewards) leaves the step's batch GRPO's. J ≥ |P_s| trains on every
shared group. The filter re-scores the whole pool every step (the peers' rows through this run's rewards: cheap for
verifiers, not for a reward model); without it only the drawn groups are re-scored. Online only; single-turn completions only (a multi-turn episode is not shared: its environment tokens
would need the peer's environment). One process per node writes and reads the swarm directory (rank 0 under torchrun;
the others receive its pool), so every process trains on the same batch.

Files: ``step-<s>.json`` is ``{"format": "tokalign.sapo/1", "node", "step", "groups": [{"prompt_id", "prompt" (text
or messages), "prompt_text" (the peer's rendering, informative), "reference", "completions": [{"completion",
"finish_reason", "reward", "rewards"}]}]}``, written to a hidden ``.step-<s>.json.tmp-<random>`` and renamed into place,
so a reader never sees half a file. A reader takes for each peer its newest ``step-*.json`` with step ≤ s (never one
from a peer's future, so two runs one after the other exchange step for step); a file that is not valid JSON, of
another format, claims another node or step, or holds a malformed group is skipped whole for that step, with its
reason on stderr (once) and in ``swarm/skipped_files``. ``keep`` > 0 deletes this node's files older than its last
``keep`` steps (0 keeps all, which resumed peers need to redraw exactly). ``wait_s`` > 0 waits up to that long each step
for every peer already in the directory to have written step s (a lock-step swarm, as the official's gather with a
timeout); 0 never waits (asynchronous: a peer running alongside is read at its last finished step).

Metrics: ``swarm/shared_rows``, ``swarm/peers`` (files read), ``swarm/skipped_files``, ``swarm/peer_lag_mean`` (s − the
read files' step), ``swarm/pool_groups`` (after the filter), ``swarm/external_groups``, ``swarm/external_rows``,
``swarm/external_reward_mean`` (0 when none), ``swarm/external_fraction`` (rows of the loss). ``reward/*`` and
``completion/*`` stay the node's own samples'.

⚠ unchecked: that the paper's J counts questions with all their completions (its text and the official
``num_transplant_trees`` both say so) and that its zero-advantage filter drops whole groups whose rewards are all equal;
whether the paper's nodes filter on their own re-scored rewards (tokalign: yes with ``rescore``, on the shared ones
without); the paper's completion count per question when J > 0 (I questions of 8 completions each, then J external
"rollouts" — read here as J questions of the peer's completions, however many it sampled).

Departures: the swarm is a directory, not a DHT: no peer discovery, no trust — a peer is any well-formed subdirectory,
and ``rescore`` is what keeps a peer's rewards out of this node's training; the files carry rewards too, so a node
without the verifier can train on the peers' (``rescore`` off: the shared ``reward`` is used, token rewards dropped).
The draw is seeded by (seed, step) instead of Python's global RNG. A peer's completion that tokenises to more than
``rollout.max_new_tokens`` tokens under this tokenizer is cut there and counted as truncated (the official tokenises
with ``truncation=True`` at the model's length). Prompts are re-rendered from the shared prompt (text or messages) by
this tokenizer, not rebuilt from a task's question.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokalign.algorithms.grpo import GRPO, GRPOConfig
from tokalign.errors import UserError
from tokalign.protocols import LossOutput, PolicyOutput, TokenBatch
from tokalign.rows import dumps, loads
from tokalign.sampling import Hook, set_field

EXTERNAL_FIELD = "sapo_external"
FORMAT = "tokalign.sapo/1"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
STEP_FILE = re.compile(r"step-(\d{8})\.json\Z")


@dataclass
class SAPOConfig(GRPOConfig):
    epsilon_high: float = 0.28  # the paper §4.2 and the official config (GRPO's own default is 0.2)
    swarm_dir: str = ""  # the directory the swarm shares ("" = no swarm: GRPO)
    node: str = ""  # this node's name, unique in the swarm (its subdirectory); required with swarm_dir
    external: int = 4  # J, groups drawn from the swarm per step (I = --batch-size); 0 = share only
    filter_zero_advantage: bool = True  # drop shared groups whose rewards are all equal before drawing
    rescore: bool = True  # re-score shared completions with this run's rewards (off: the peer's reward)
    wait_s: float = 0.0  # wait up to this long each step for the peers' file of this step (0: never wait)
    keep: int = 0  # keep this node's last `keep` step files (0: all)

    def __post_init__(self):
        super().__post_init__()
        if self.external < 0 or self.keep < 0:
            raise ValueError(f"external and keep must be ≥ 0, got {self.external} and {self.keep}")
        if not (math.isfinite(self.wait_s) and self.wait_s >= 0):
            raise ValueError(f"wait_s must be a finite number ≥ 0, got {self.wait_s}")
        if not self.swarm_dir:
            return
        if not NODE_NAME.match(self.node or ""):
            raise ValueError(f"node must name this node in the swarm (letters, digits, '.', '_', '-'), got {self.node!r}: "
                             "set --set algorithm.node=NAME, unique per node")
        d = Path(self.swarm_dir).expanduser()
        if not d.is_dir():
            raise UserError(f"sapo's swarm directory '{d}' does not exist (or is not a directory): create it where every "
                            "node can reach it (mkdir -p), or leave algorithm.swarm_dir empty for plain GRPO.")
        if not os.access(d, os.W_OK | os.X_OK) or ((d / self.node).exists() and not os.access(d / self.node, os.W_OK | os.X_OK)):
            raise UserError(f"sapo's swarm directory '{d}' is not writable by this user (node '{self.node}' writes its "
                            "rollouts there): fix its permissions or choose another algorithm.swarm_dir.")


# ---------------------------------------------------------------------------------------------------
# the swarm directory


def step_path(swarm_dir, node: str, step: int) -> Path:
    return Path(swarm_dir) / node / f"step-{step:08d}.json"


def shared_groups(rows: list[dict]) -> list[dict]:
    """The batch's groups as text (in group order), for the swarm; multi-turn episodes are not shared."""
    groups: dict[Any, list[dict]] = {}
    for r in rows:
        if not r.get("episode"):
            groups.setdefault(r["group_id"], []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        out.append({"prompt_id": str(first.get("prompt_id", first.get("id", ""))), "prompt": loads(first["prompt"]),
                    "prompt_text": first.get("prompt_text"), "reference": loads(first.get("reference")),
                    "completions": [{"completion": r["completion"], "finish_reason": r.get("finish_reason", "stop"),
                                     "reward": float(r["reward"]), "rewards": {k: float(v) for k, v in (r.get("rewards") or {}).items()}}
                                    for r in members]})
    return out


def write_rollouts(swarm_dir, node: str, step: int, groups: list[dict]) -> Path:
    """Write this node's groups of ``step`` atomically: a hidden temporary file in the node's directory, renamed."""
    path = step_path(swarm_dir, node, step)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "node": node, "step": step, "groups": groups}, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"sapo could not write its rollouts to '{path}' ({e.strerror or e}): check that "
                        "algorithm.swarm_dir is writable and has space.") from e
    return path


def prune(swarm_dir, node: str, step: int, keep: int) -> None:
    """Delete this node's step files older than its last ``keep`` steps (``keep`` 0: none)."""
    if keep <= 0:
        return
    for p in (Path(swarm_dir) / node).glob("step-*.json"):
        m = STEP_FILE.match(p.name)
        if m and int(m.group(1)) <= step - keep:
            p.unlink(missing_ok=True)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _prompt_ok(p) -> bool:
    return isinstance(p, str) or (isinstance(p, list) and bool(p) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in p))


def check_payload(data, node: str, step: int) -> str | None:
    """Why a peer's file cannot be used (None: it can)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("format") != FORMAT:
        return f"format {data.get('format')!r}, expected {FORMAT!r}"
    if data.get("node") != node:
        return f"it claims node {data.get('node')!r}, but lies in the directory of node {node!r}"
    if data.get("step") != step:
        return f"it claims step {data.get('step')!r}, but its name says step {step}"
    groups = data.get("groups")
    if not isinstance(groups, list):
        return "no list of groups"
    for k, g in enumerate(groups):
        if not isinstance(g, dict) or not _prompt_ok(g.get("prompt")):
            return f"group {k} has no prompt (text, or a list of role/content messages)"
        comps = g.get("completions")
        if not isinstance(comps, list) or not comps:
            return f"group {k} has no completions"
        for c in comps:
            if not (isinstance(c, dict) and isinstance(c.get("completion"), str) and isinstance(c.get("finish_reason", "stop"), str)
                    and _finite(c.get("reward"))):
                return f"group {k} has a completion without text, finish_reason or a finite reward"
    return None


def _steps(d: Path) -> list[int]:
    return [int(m.group(1)) for m in (STEP_FILE.match(p.name) for p in d.iterdir()) if m]


def peer_files(swarm_dir, node: str, step: int) -> list[tuple[str, int | None, Path, str | None]]:
    """(peer, step, path, None) of every other node's newest step file with step ≤ ``step``, peers in name order —
    (peer, None, its directory, why) for a peer directory that cannot be listed. Hidden files (writes in progress) and
    names of another pattern are not step files."""
    try:
        dirs = sorted((d for d in Path(swarm_dir).iterdir() if d.name != node and NODE_NAME.match(d.name) and d.is_dir()),
                      key=lambda d: d.name)
    except OSError as e:
        raise UserError(f"sapo could not list its swarm directory '{swarm_dir}' ({e.strerror or e}): is it still mounted?") from e
    out: list[tuple[str, int | None, Path, str | None]] = []
    for d in dirs:
        try:
            steps = [s for s in _steps(d) if s <= step]
        except OSError as e:
            out.append((d.name, None, d, f"unreadable directory ({e.strerror or e})"))
            continue
        if steps:
            out.append((d.name, max(steps), step_path(swarm_dir, d.name, max(steps)), None))
    return out


def read_swarm(swarm_dir, node: str, step: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """The usable payloads of the other nodes at ``step`` (see ``peer_files``), and (path, reason) of the skipped ones."""
    payloads, skipped = [], []
    for peer, s, path, why in peer_files(swarm_dir, node, step):
        if why is not None:
            skipped.append((str(path), why))
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            skipped.append((str(path), f"not valid JSON ({e.msg} at character {e.pos}: a partial or corrupt write?)"))
            continue
        except (OSError, UnicodeDecodeError) as e:
            skipped.append((str(path), f"unreadable ({e})"))
            continue
        reason = check_payload(data, peer, s)
        if reason is None:
            payloads.append(data)
        else:
            skipped.append((str(path), reason))
    return payloads, skipped


def wait_for_peers(swarm_dir, node: str, step: int, wait_s: float) -> None:
    """Wait up to ``wait_s`` until every peer now in the directory has a step file ≥ ``step``."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            peers = [d for d in Path(swarm_dir).iterdir() if d.name != node and NODE_NAME.match(d.name) and d.is_dir()]
            if all(max(_steps(d), default=0) >= step for d in peers):
                return
        except OSError:
            return  # read_swarm reports it
        time.sleep(0.05)


def draw(n: int, k: int, seed: int, step: int) -> list[int]:
    """Indices (in pool order) of the k of n pool groups drawn at ``step``: uniform without replacement, a function
    of (seed, step) alone; all n when n ≤ k."""
    if n <= k:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 100_003 + step * 7919 + 65_537)
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def encode_group(payload: dict, group: dict, tokenizer, max_new_tokens: int | None) -> list[dict]:
    """A peer's group as rollout rows of this run: the prompt rendered by this tokenizer (its chat template for
    messages), each completion text tokenised (+ EOS unless the peer cut it at its length limit), cut to
    ``max_new_tokens``. The peer's reward rides along as ``reward`` (replaced when re-scored)."""
    from tokalign.data.render import completion_ids, render_prompts

    (text, ids), = render_prompts(tokenizer, [group["prompt"]])
    node, step = payload["node"], payload["step"]
    pid = f"{node}/{step}/{group.get('prompt_id', '')}"
    rows = []
    for j, c in enumerate(group["completions"]):
        cut = c.get("finish_reason") == "length"
        out = list(tokenizer(c["completion"], add_special_tokens=False)["input_ids"]) if cut else completion_ids(tokenizer, c["completion"])
        if not out:  # nothing left of a cut completion: the EOS at least, so the row has a token to train
            out = completion_ids(tokenizer, "")
        finish = c.get("finish_reason", "stop")
        if max_new_tokens and len(out) > max_new_tokens:
            out, finish = out[:max_new_tokens], "length"
        rows.append({"id": f"{pid}#{j}", "prompt_id": pid, "sample_idx": j, "prompt": dumps(group["prompt"]),
                     "prompt_text": text, "prompt_ids": list(ids), "reference": None if group.get("reference") is None else dumps(group["reference"]),
                     "completion": c["completion"], "completion_ids": out, "sampler_logps": None, "finish_reason": finish,
                     "max_new_tokens": max_new_tokens, "reward": float(c["reward"]), "rewards": dict(c.get("rewards") or {}),
                     "token_rewards": None, "swarm_node": node, "swarm_step": step})
    return rows


def _on_main(fn):
    """``fn()`` on rank 0 alone under torch.distributed, its result (or its UserError) sent to every rank."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized() and td.get_world_size() > 1):
        return fn()
    box: list = [None]
    if td.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except UserError as e:
            box = [("error", str(e))]
    td.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


class SwarmExchange(Hook):
    """After the step's batch is sampled and scored: write its groups to the swarm directory, read the peers' newest
    files, draw ``external`` of their groups, re-encode and re-score them, and append them to the batch as extra groups
    (``fields["sapo_external"]`` 1; 0 on the node's own rows)."""

    name = "sapo_swarm"

    def __init__(self, config: SAPOConfig):
        self.config = config
        self.warned: set[tuple[str, str]] = set()
        self.skipped: list[tuple[str, str]] = []  # the last step's skipped files and why

    def _exchange(self, groups: list[dict], step: int):
        c = self.config
        write_rollouts(c.swarm_dir, c.node, step, groups)
        prune(c.swarm_dir, c.node, step, c.keep)
        if c.external == 0:
            return [], []
        if c.wait_s > 0:
            wait_for_peers(c.swarm_dir, c.node, step, c.wait_s)
        return read_swarm(c.swarm_dir, c.node, step)

    def after_batch(self, rows: list[dict], ctx) -> dict[str, float]:
        c, step = self.config, ctx.step + 1
        groups = shared_groups(rows)
        payloads, self.skipped = _on_main(lambda: self._exchange(groups, step))
        for path, reason in self.skipped:
            if (path, reason) not in self.warned:
                self.warned.add((path, reason))
                sys.stderr.write(f"warning: sapo skipped the swarm file '{path}': {reason}\n")
        metrics = {"swarm/shared_rows": float(sum(len(g["completions"]) for g in groups))}
        if c.external == 0:
            return metrics
        for r in rows:
            set_field(r, EXTERNAL_FIELD, 0.0)
        candidates = [(p, g) for p in payloads for g in p["groups"]]
        if c.filter_zero_advantage:
            pool = [g for g in self._encoded(candidates, ctx) if max(r["reward"] for r in g) > min(r["reward"] for r in g)]
            chosen = [pool[i] for i in draw(len(pool), c.external, ctx.seed, ctx.step)]
        else:
            pool = candidates
            chosen = self._encoded([pool[i] for i in draw(len(pool), c.external, ctx.seed, ctx.step)], ctx)
        base = 1 + max((int(r["group_id"]) for r in rows), default=-1)
        added = []
        for k, group in enumerate(chosen):
            for r in group:
                row = {**r, "group_id": base + k, "prompt_index": -1}
                set_field(row, EXTERNAL_FIELD, 1.0)
                added.append(row)
        rows.extend(added)
        return {**metrics, "swarm/peers": float(len(payloads)), "swarm/skipped_files": float(len(self.skipped)),
                "swarm/peer_lag_mean": sum(step - p["step"] for p in payloads) / len(payloads) if payloads else 0.0,
                "swarm/pool_groups": float(len(pool)), "swarm/external_groups": float(len(chosen)),
                "swarm/external_rows": float(len(added)),
                "swarm/external_reward_mean": sum(float(r["reward"]) for r in added) / len(added) if added else 0.0}

    def _encoded(self, picked: list[tuple[dict, dict]], ctx) -> list[list[dict]]:
        """Rows of each picked (payload, group), re-scored by the run's rewards with ``rescore`` (one call)."""
        groups = [encode_group(p, g, ctx.tokenizer, ctx.spec.max_new_tokens) for p, g in picked]
        if not self.config.rescore or not groups:
            return groups
        scored = iter(ctx.score([r for g in groups for r in g]))
        return [[next(scored) for _ in g] for g in groups]


class SAPO(GRPO):
    Config = SAPOConfig

    def __init__(self, config: SAPOConfig):
        super().__init__(config)
        if config.swarm_dir:  # no swarm: GRPO's needs, no hook
            self.needs = dataclasses.replace(self.needs, data=("online",), hooks=(*self.needs.hooks, SwarmExchange(config)))

    def loss(self, batch: TokenBatch, out: PolicyOutput) -> LossOutput:
        f = batch.fields
        external = f.get(EXTERNAL_FIELD)
        if external is not None and "sampler_logps" in f and "old_logps" in f and bool((external > 0).any()):
            # no sampler log-probs of this policy for a peer's rows: on-policy, weight 1 in the mismatch correction
            on = (external > 0).unsqueeze(-1)
            batch = dataclasses.replace(batch, fields={**f, "sampler_logps": torch.where(on, f["old_logps"], f["sampler_logps"])})
        result = super().loss(batch, out)
        if external is not None:
            result.metrics["swarm/external_fraction"] = float((external > 0).float().mean())
        return result
