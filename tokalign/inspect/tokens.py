"""Per-token values of the samples in a ``rollouts``, ``scored`` or ``eval`` artifact, for heatmaps.

Channels, one value per completion token ``t`` of sample ``i`` (group ``g``):

* ``reward``    — the scored artifact's ``token_rewards[t]``; when a sample has none, its sequence
  reward broadcast over its tokens (the channel's note says so).
* ``advantage`` — group-relative: A_t = (G_t − mean_g G_0) / (std_g G_0 + 1e-6), with the return-to-go
  G_t = R·1[t = last] + Σ_{s≥t} token_rewards_s summed to the end (so G_t = R for every t without
  token rewards, which is GRPO's advantage (R − mean_g R)/(std_g R + 1e-6)); std is the unbiased one,
  as in ``ops.group_advantages``; a group of one has advantage 0.
* ``logprob``   — the sampler's log-prob of the token (``sampler_logps``: the distribution actually
  sampled from, temperature and top-p applied).
* ``gap``       — trainer − sampler log-prob: a forward pass of the model on prompt + completion as the
  train loop does it (raw logits, float32) minus ``sampler_logps``; log of the importance ratio.
* ``entropy``   — the trainer forward's entropy of the next-token distribution at that position (nats).

A multi-turn episode's environment tokens (loss mask 0: tool results, the template's turn wrappers) carry no value
in any channel — the model did not sample them and is not trained on them; the views draw them apart (hatched grey).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokalign import artifacts
from tokalign.errors import UserError

CHANNELS = ("reward", "advantage", "logprob", "gap", "entropy")
KINDS = ("rollouts", "scored", "eval")
EPS = 1e-6

# Colour stops (position in [0, 1] -> RGB) per channel; shared with the HTML page's script.
PALETTES: dict[str, list[tuple[float, tuple[int, int, int]]]] = {
    "reward": [(0.0, (215, 48, 39)), (0.5, (255, 255, 255)), (1.0, (26, 152, 80))],
    "advantage": [(0.0, (215, 48, 39)), (0.5, (255, 255, 255)), (1.0, (26, 152, 80))],
    "logprob": [(0.0, (189, 0, 38)), (0.5, (253, 141, 60)), (1.0, (255, 255, 255))],
    "gap": [(0.0, (230, 97, 1)), (0.5, (255, 255, 255)), (1.0, (33, 102, 172))],
    "entropy": [(0.0, (255, 255, 255)), (0.5, (158, 154, 200)), (1.0, (63, 0, 125))],
}
LABELS = {
    "reward": "token reward",
    "advantage": "advantage (group-relative)",
    "logprob": "sampler log-prob (nats)",
    "gap": "trainer − sampler log-prob (nats)",
    "entropy": "trainer entropy (nats)",
}
# The smallest half-range (diverging) or range (sequential) of a scale, so that float noise
# (a gap of 1e-7 between sampler and trainer) is not stretched into full colour.
_FLOORS = {"reward": 1e-6, "advantage": 1e-6, "logprob": 1e-3, "gap": 1e-2, "entropy": 1e-2}


@dataclass
class Channel:
    name: str
    available: bool
    note: str = ""  # why it is unavailable, or how it was computed
    lo: float = 0.0
    hi: float = 1.0

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def colour(self, value: float | None) -> tuple[int, int, int] | None:
        if value is None or not math.isfinite(value):
            return None
        span = self.hi - self.lo
        return interpolate(PALETTES[self.name], 0.5 if span <= 0 else (value - self.lo) / span)


@dataclass
class TokenSample:
    id: str
    group_id: int | None
    sample_idx: int | None
    prompt: str
    completion: str
    finish_reason: str
    reward: float | None
    rewards: dict[str, float]
    verdicts: dict[str, Any]
    token_ids: list[int]
    tokens: list[str] = field(default_factory=list)
    values: dict[str, list[float] | None] = field(default_factory=dict)
    prompt_ids: list[int] = field(default_factory=list)
    sampler_logps: list[float] | None = None
    loss_mask: list[int] | None = None  # multi-turn episodes: 1 on the model's tokens, 0 on the environment's

    def is_env(self, t: int) -> bool:
        """Token ``t`` came from the environment, not the model."""
        return self.loss_mask is not None and t < len(self.loss_mask) and not self.loss_mask[t]

    def verdict_text(self) -> str:
        parts = []
        for name, info in self.verdicts.items():
            if isinstance(info, dict) and "passed" in info:
                detail = f" ({info['detail']})" if info.get("detail") else ""
                parts.append(f"{name}: {'PASS' if info['passed'] else 'FAIL'}{detail}")
        return "; ".join(parts)


@dataclass
class Inspection:
    path: Path
    kind: str
    model: str  # what the tokenizer (and the forward, if any) loaded; "" = the bundled model
    samples: list[TokenSample]
    channels: dict[str, Channel]


def interpolate(stops: list[tuple[float, tuple[int, int, int]]], t: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, t))
    for (p0, c0), (p1, c1) in zip(stops, stops[1:]):
        if t <= p1:
            f = 0.0 if p1 == p0 else (t - p0) / (p1 - p0)
            return tuple(round(a + (b - a) * f) for a, b in zip(c0, c1))  # type: ignore[return-value]
    return stops[-1][1]


# ---------------------------------------------------------------- model and rows


def _inputs(art: artifacts.Artifact):
    """The rollouts/scored/eval artifacts this one was made from (a scored artifact's rollouts)."""
    for ref in art.manifest.get("inputs") or []:
        p = Path(ref.get("path", ""))
        if ref.get("kind") in KINDS and artifacts.is_artifact(p):
            yield artifacts.Artifact(p, json.loads((p / artifacts.MANIFEST).read_text()))


def recorded_model(art: artifacts.Artifact, depth: int = 0) -> tuple[str, bool] | None:
    """(model, was a local directory) that sampled an artifact's completions, from its manifest or
    its inputs'; "" = the bundled model. None when nothing records it."""
    config = art.manifest.get("config") or {}
    if isinstance(config.get("model"), str):
        if config["model"] == "(bundled)":
            return "", True
        identity = art.manifest.get("model") or {}
        return config["model"], "files_sha256" in identity or "checkpoint_manifest_sha256" in identity
    for parent in _inputs(art) if depth < 8 else ():
        found = recorded_model(parent, depth + 1)
        if found is not None:
            return found
    return None


def sampling_note(art: artifacts.Artifact, depth: int = 0) -> str:
    """How the sampler reshaped its distribution, when it did (the gap then includes that)."""
    config = art.manifest.get("config") or {}
    if "temperature" in config:
        t, p = config.get("temperature"), config.get("top_p", 1.0)
        if t not in (None, 1.0) or p not in (None, 1.0):
            return f"; the sampler used T={t}, top-p {p}, so the gap includes that reshaping"
        return ""
    for parent in _inputs(art) if depth < 8 else ():
        return sampling_note(parent, depth + 1)
    return ""


def resolve_inspect_model(art: artifacts.Artifact, override: str | None) -> str:
    if override is not None:
        return override
    found = recorded_model(art)
    if found is None:
        raise UserError(f"'{art.path}' does not record which model sampled it; pass --model PATH (the model or checkpoint that made it).")
    name, local = found
    if local and name and not Path(name).expanduser().is_dir():
        raise UserError(f"The model recorded in '{art.path}' ('{name}') is not found from this directory; "
                        "run from where the artifact was made, or pass --model PATH.")
    return name


def _loads(x):
    return json.loads(x) if isinstance(x, str) else x


def _prompt_text(prompt) -> str:
    p = _loads(prompt)
    if isinstance(p, list):  # messages: the last user turn is what the completion answers
        users = [m.get("content", "") for m in p if isinstance(m, dict) and m.get("role") == "user"]
        p = users[-1] if users else (p[-1].get("content", "") if p and isinstance(p[-1], dict) else "")
    return str(p)


def _row_sample(r: dict) -> TokenSample:
    verdicts = _loads(r.get("verdicts")) or {}
    return TokenSample(
        id=str(r["id"]), group_id=r.get("group_id"), sample_idx=r.get("sample_idx"),
        prompt=_prompt_text(r.get("prompt")), completion=r.get("completion") or "",
        finish_reason=r.get("finish_reason") or "", reward=r.get("reward"),
        rewards=dict(r.get("rewards") or {}), verdicts=verdicts if isinstance(verdicts, dict) else {},
        token_ids=[int(t) for t in r["completion_ids"]], prompt_ids=[int(t) for t in (r.get("prompt_ids") or [])],
        sampler_logps=None if r.get("sampler_logps") is None else [float(v) for v in r["sampler_logps"]],
        values={"token_rewards": None if r.get("token_rewards") is None else [float(v) for v in r["token_rewards"]]},
        loss_mask=None if r.get("loss_mask") is None else [int(v) for v in r["loss_mask"]],
    )


def select(samples: list[TokenSample], ids: list[str] | None, limit: int | None) -> list[TokenSample]:
    if ids:
        chosen = []
        for want in ids:
            hit = [s for s in samples if s.id == want] or [s for s in samples if s.id.rsplit("#", 1)[0] == want]
            if not hit:
                from tokalign.errors import did_you_mean

                raise UserError(f"No sample with id '{want}' (or prompt id).{did_you_mean(want, [s.id for s in samples])} "
                                f"Ids look like '{samples[0].id}'." if samples else f"No sample with id '{want}': the artifact is empty.")
            chosen.extend(h for h in hit if h not in chosen)
        samples = chosen
    return samples if limit is None else samples[:limit]


# ---------------------------------------------------------------- channels


def advantages(samples: list[TokenSample]) -> None:
    """Group-relative per-token advantages (module docstring) into ``values['advantage']``."""
    returns: dict[str, list[float]] = {}
    for s in samples:
        tr = s.values.get("token_rewards")
        n = len(s.token_ids)
        if tr is None or len(tr) != n:
            returns[s.id] = [float(s.reward)] * n
            continue
        g, out = 0.0, [0.0] * n
        for t in range(n - 1, -1, -1):
            g += tr[t] + (float(s.reward) if t == n - 1 else 0.0)
            out[t] = g
        returns[s.id] = out
    groups: dict[Any, list[TokenSample]] = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s)
    for members in groups.values():
        g0 = [(returns[s.id][0] if returns[s.id] else float(s.reward)) for s in members]
        mean = sum(g0) / len(g0)
        std = math.sqrt(sum((v - mean) ** 2 for v in g0) / max(len(g0) - 1, 1))
        for s in members:
            s.values["advantage"] = [0.0 if len(members) == 1 else (v - mean) / (std + EPS) for v in returns[s.id]]


def trainer_forward(model: str, samples: list[TokenSample], batch_size: int = 8) -> None:
    """``values['trainer_logps']`` and ``values['entropy']`` per completion token from the train loop's own forward
    pass (``tokalign.forward``) over prompt + completion."""
    import torch

    from tokalign import models
    from tokalign.batching import Seq, collate
    from tokalign.forward import forward, to_device

    net = models.load_model(model).eval()
    device = next(net.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            batch = to_device(collate([Seq(list(s.prompt_ids), list(s.token_ids), i) for i, s in enumerate(chunk)], 0), device)
            out = forward(net, batch, with_entropy=True)
            logps, ent = out.logps.float().cpu(), out.entropy.float().cpu()
            for i, s in enumerate(chunk):
                a, n = len(s.prompt_ids) - 1, len(s.token_ids)
                s.values["trainer_logps"] = logps[i, a:a + n].tolist()
                s.values["entropy"] = ent[i, a:a + n].tolist()


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def scale(name: str, samples: list[TokenSample]) -> tuple[float, float]:
    vals = [v for s in samples for v in (s.values.get(name) or []) if v is not None and math.isfinite(v)]
    floor = _FLOORS[name]
    if name in ("reward", "advantage", "gap"):
        m = max(_percentile([abs(v) for v in vals], 0.98) if vals else 0.0, floor)
        return -m, m
    if name == "logprob":
        return min(_percentile(vals, 0.02) if vals else 0.0, -floor), 0.0
    return 0.0, max(_percentile(vals, 0.98) if vals else 0.0, floor)


def inspect(path: str, *, model: str | None = None, ids: list[str] | None = None, limit: int | None = None,
            forward: bool = True) -> Inspection:
    """Load an artifact's samples, decode their tokens and compute every available channel.
    ``forward=False`` skips the model forward pass (gap and entropy are then unavailable)."""
    art = artifacts.read(path, KINDS)
    rows = art.rows()
    if rows and "completion_ids" not in rows[0]:
        raise UserError(f"'{path}' ({art.kind}) holds no completion tokens to inspect; pass a rollouts, scored or eval artifact.")
    all_samples = [_row_sample(r) for r in rows]
    if not all_samples:
        raise UserError(f"'{path}' holds no samples.")
    scored = all(s.reward is not None for s in all_samples)
    if scored:
        advantages(all_samples)
    samples = select(all_samples, ids, limit)
    name = resolve_inspect_model(art, model)

    from tokalign import models

    tokenizer = models.load_tokenizer(name)
    for s in samples:
        s.tokens = [tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in s.token_ids]

    channels: dict[str, Channel] = {}
    has_token_rewards = any(s.values.get("token_rewards") is not None for s in samples)
    if scored:
        for s in samples:
            tr = s.values.get("token_rewards")
            s.values["reward"] = tr if tr is not None else [float(s.reward)] * len(s.token_ids)
        channels["reward"] = Channel("reward", True, "per-token rewards" if has_token_rewards else
                                     "no token_rewards: the sequence reward, broadcast over its tokens")
        channels["advantage"] = Channel("advantage", True, "(G_t − mean_g G_0)/(std_g G_0 + 1e-6), G_t = reward-to-go"
                                        if has_token_rewards else "(R − mean_g R)/(std_g R + 1e-6), broadcast over tokens")
    else:
        channels["reward"] = Channel("reward", False, f"a {art.kind} artifact holds no rewards: run `tokalign score` first")
        channels["advantage"] = Channel("advantage", False, f"a {art.kind} artifact holds no rewards: run `tokalign score` first")
    have_logps = all(s.sampler_logps is not None and len(s.sampler_logps) == len(s.token_ids) for s in samples)
    for s in samples:
        s.values["logprob"] = s.sampler_logps
    channels["logprob"] = Channel("logprob", have_logps, "" if have_logps else "sampler_logps missing")
    if forward:
        trainer_forward(name, samples)
        for s in samples:
            s.values["gap"] = ([a - b for a, b in zip(s.values["trainer_logps"], s.sampler_logps)]
                               if s.sampler_logps is not None else None)
        note = f"trainer forward of {name or 'the bundled model'}"
        channels["gap"] = Channel("gap", have_logps, note + sampling_note(art) if have_logps else "sampler_logps missing")
        channels["entropy"] = Channel("entropy", True, note)
    else:
        why = "needs a trainer forward pass of the model (skipped: --no-forward)"
        channels["gap"] = Channel("gap", False, why)
        channels["entropy"] = Channel("entropy", False, why)
    for s in samples:
        if s.loss_mask is not None:  # the environment's tokens are no one's values
            for ch in CHANNELS:
                if s.values.get(ch) is not None:
                    s.values[ch] = [None if s.is_env(t) else v for t, v in enumerate(s.values[ch])]
    for c in channels.values():
        if c.available:
            c.lo, c.hi = scale(c.name, samples)
    return Inspection(Path(path), art.kind, name, samples, channels)
