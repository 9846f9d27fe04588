"""PNG figures: training curves from ``metrics.jsonl`` (one panel per metric, several runs overlaid)
and eval results as grouped bars (pass@k, mean reward; completion length on its own panel).

matplotlib (Agg backend) is imported inside ``figure`` only.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokalign.errors import UserError
from tokalign.inspect.compare import SETTINGS, is_metric, labels, load_results

# Default panels, in this order, where a run logged them ("*" matches within a key).
DEFAULT_METRICS = ("loss", "reward/mean", "kl", "kl/*", "*kl", "entropy", "completion/len_mean", "clip_fraction",
                   "advantage/abs_mean", "grad_norm")
EVAL_RATE_PREFIXES = ("pass@", "maj@")


@dataclass
class Run:
    label: str
    path: Path
    rows: list[dict[str, Any]]


@dataclass
class EvalResult:
    label: str
    path: Path
    results: dict[str, Any]


def metrics_file(path: Path) -> Path | None:
    """A checkpoint (or a run's ``.partial`` work directory) or a metrics.jsonl -> the jsonl file."""
    if path.is_file() and path.suffix == ".jsonl":
        return path
    if path.is_dir() and (path / "metrics.jsonl").is_file():
        return path / "metrics.jsonl"
    partial = path.with_name(path.name + ".partial") / "metrics.jsonl"
    return partial if not path.exists() and partial.is_file() else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"'{path}' line {i} is not JSON ({e}); pass a metrics.jsonl written by `tokalign train`.") from e
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        raise UserError(f"'{path}' holds no metrics yet.")
    return rows


def load(paths: list[str], names: list[str] | None = None) -> tuple[list[Run], list[EvalResult]]:
    if not paths:
        raise UserError("Nothing to plot: pass checkpoints, metrics.jsonl files, eval artifacts or results.json files.")
    if names and len(names) != len(paths):
        raise UserError(f"--label was given {len(names)} times for {len(paths)} inputs; give one per input, in order.")
    names = names or labels(paths)
    runs, evals = [], []
    for name, p in zip(names, paths):
        path = Path(p)
        mf = metrics_file(path)
        if mf is not None:
            runs.append(Run(name, mf, read_metrics(mf)))
        elif (path.is_dir() and (path / "results.json").is_file()) or (path.is_file() and path.suffix == ".json"):
            evals.append(EvalResult(name, path, load_results(path)))
        elif not path.exists():
            raise UserError(f"'{p}' does not exist.")
        else:
            raise UserError(f"'{p}' holds neither metrics.jsonl (a checkpoint or run) nor results.json (an eval artifact); "
                            "pass one of those or the file itself.")
    return runs, evals


def numeric_keys(runs: list[Run]) -> list[str]:
    keys: list[str] = []
    for run in runs:
        for row in run.rows:
            keys += [k for k, v in row.items() if k != "step" and is_metric(k, v) and k not in keys]
    return keys


def choose_metrics(runs: list[Run], wanted: str | None) -> list[str]:
    keys = numeric_keys(runs)
    if wanted == "all":
        return keys
    patterns = [w.strip() for w in wanted.split(",") if w.strip()] if wanted else list(DEFAULT_METRICS)
    chosen = [k for pat in patterns for k in keys if fnmatch.fnmatchcase(k, pat)]
    chosen = list(dict.fromkeys(chosen))
    if wanted and not chosen:
        raise UserError(f"--metrics '{wanted}' matches none of the logged metrics: {', '.join(keys)}.")
    if not wanted:  # a default panel that never moved (clip_fraction 0 with one update per batch) says nothing
        chosen = [k for k in chosen if len({r[k] for run in runs for r in run.rows if is_metric(k, r.get(k))}) > 1] or chosen
    return chosen or keys


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (NaNs skipped), so a curve's start stays where it was."""
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def auto_window(n: int) -> int:
    return max(1, n // 12) if n >= 24 else 1


def figure(runs: list[Run], evals: list[EvalResult], out: str | Path, metrics: str | None = None,
           smoothing: int | None = None, title: str | None = None) -> Path:
    try:
        import matplotlib
    except ImportError as e:
        raise UserError("`tokalign plot` needs matplotlib: pip install matplotlib") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = choose_metrics(runs, metrics) if runs else []
    rate_keys, other_keys = _eval_keys(evals)
    panels = [("curve", k) for k in keys]
    if rate_keys:
        panels.append(("eval", rate_keys))
    for k in other_keys:
        panels.append(("eval", [k]))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (ax, (kind, what)) in enumerate(zip(axes.flat, panels)):
        if kind == "curve":
            _curves(ax, runs, what, colours, smoothing, legend=i == 0)
        else:  # eval bars take the colours after the runs', so a bar never looks like a curve
            _bars(ax, evals, what, colours[len(runs):] + colours[:len(runs)])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _curves(ax, runs: list[Run], key: str, colours, smoothing: int | None, legend: bool) -> None:
    for i, run in enumerate(runs):
        pts = [(r.get("step", j + 1), float(r[key])) for j, r in enumerate(run.rows) if is_metric(key, r.get(key))]
        if not pts:
            continue
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        window = auto_window(len(values)) if smoothing is None else max(1, smoothing)
        colour = colours[i % len(colours)]
        if window > 1:
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
            ax.plot(steps, smooth(values, window), color=colour, linewidth=1.8, label=f"{run.label} (mean of {window})")
        else:
            ax.plot(steps, values, color=colour, linewidth=1.6, label=run.label)
    ax.set_title(key, fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _eval_keys(evals: list[EvalResult]) -> tuple[list[str], list[str]]:
    keys: list[str] = []
    for e in evals:
        keys += [k for k, v in e.results.items() if is_metric(k, v) and k not in keys]
    rates = sorted((k for k in keys if k.startswith(EVAL_RATE_PREFIXES)),
                   key=lambda k: (k.split("@")[0] != "pass", int(k.split("@")[1]) if k.split("@")[1].isdigit() else 0))
    if "mean_reward" in keys:
        rates.append("mean_reward")
    others = [k for k in keys if k not in rates and k not in SETTINGS]
    # Counters that stayed 0 everywhere (no truncation, no reward failures) get no panel of empty bars.
    others = [k for k in others if any(is_metric(k, e.results.get(k)) and e.results[k] != 0 for e in evals)]
    return rates, others


def _bars(ax, evals: list[EvalResult], keys: list[str], colours) -> None:
    width = 0.8 / max(len(evals), 1)
    for i, e in enumerate(evals):
        xs = [j + (i - (len(evals) - 1) / 2) * width for j in range(len(keys))]
        vals = [float(e.results[k]) if is_metric(k, e.results.get(k)) else float("nan") for k in keys]
        bars = ax.bar(xs, vals, width=width * 0.95, color=colours[i % len(colours)], label=e.label)
        ax.bar_label(bars, labels=[f"{v:.3f}" if math.isfinite(v) else "" for v in vals], fontsize=7, padding=1)
    ax.set_xticks(range(len(keys)), keys)
    first = evals[0].results if evals else {}
    detail = f"{first['num_prompts']} prompts × {first['n']}" if "num_prompts" in first and "n" in first else ""
    ax.set_title(f"eval{f' ({detail})' if detail else ''}" if len(keys) > 1 else f"eval: {keys[0]}", fontsize=11)
    if all(k.startswith(EVAL_RATE_PREFIXES) or k == "mean_reward" for k in keys):
        ax.set_ylim(0, 1.12)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower right" if len(keys) > 1 else "best")
