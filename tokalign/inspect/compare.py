"""Eval results side by side: the metrics of several ``results.json`` files with deltas against the first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokalign.errors import UserError

# Settings recorded in results.json beside the metrics: shown, never differenced.
SETTINGS = ("model", "ref", "verifier", "n", "num_prompts", "temperature", "top_p", "max_new_tokens", "seed", "backend")
HIGHER_IS_BETTER = ("pass@", "maj@", "mean_reward")


def results_file(path: str | Path) -> Path:
    """An eval artifact directory or a results.json path -> the results.json file."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise UserError(f"'{path}' is neither an eval artifact (a directory with results.json) nor a results.json file.")
    return p


def load_results(path: str | Path) -> dict[str, Any]:
    p = results_file(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{p}' is not valid JSON ({e}); pass an eval artifact's results.json.") from e
    if not isinstance(data, dict):
        raise UserError(f"'{p}' does not hold an object of eval results; pass an eval artifact's results.json.")
    return data


def labels(paths: list[str | Path]) -> list[str]:
    """Short, distinct names for inputs: the last path part naming the run (a results.json or
    metrics.jsonl is named by its directory), with more parts where two would collide."""
    parts = []
    for p in paths:
        q = Path(p).resolve()
        if q.is_file() or q.suffix in (".json", ".jsonl"):
            q = q.parent
        parts.append(q.parts)
    for depth in range(1, max((len(x) for x in parts), default=1) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def is_metric(key: str, value: Any) -> bool:
    return key not in SETTINGS and isinstance(value, (int, float)) and not isinstance(value, bool)


def compare(paths: list[str], names: list[str] | None = None) -> dict[str, Any]:
    """{"runs": [{label, path, settings}], "metrics": {key: {"values": [...], "deltas": [...]}}}:
    deltas are each run's value minus the first run's (None where either lacks the metric)."""
    if len(paths) < 2:
        raise UserError("--compare needs two or more eval results (eval artifact directories or results.json files).")
    results = [load_results(p) for p in paths]
    names = names or labels(paths)
    keys: list[str] = []
    for r in results:
        keys += [k for k, v in r.items() if is_metric(k, v) and k not in keys]
    keys.sort(key=_metric_order)
    metrics = {}
    for k in keys:
        values = [r.get(k) if is_metric(k, r.get(k)) else None for r in results]
        base = values[0]
        metrics[k] = {"values": values, "deltas": [None if base is None or v is None else v - base for v in values]}
    runs = [{"label": n, "path": str(results_file(p)), "settings": {k: r[k] for k in SETTINGS if k in r}}
            for n, p, r in zip(names, paths, results)]
    return {"runs": runs, "metrics": metrics}


def _metric_order(key: str) -> tuple:
    if key.startswith(("pass@", "maj@")):
        head, _, k = key.partition("@")
        return (0 if head == "pass" else 1, int(k) if k.isdigit() else 0, key)
    return (2 if key == "mean_reward" else 3, 0, key)


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def render_results(results: dict[str, Any], title: str, console) -> None:
    """One run's results.json as a table: metrics (in --compare's order), then its settings, dimmed."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted((k for k, v in results.items() if is_metric(k, v)), key=_metric_order):
        table.add_row(key, _fmt(results[key]))
    for setting in SETTINGS:
        if results.get(setting) is not None:
            table.add_row(f"[dim]{setting}[/]", f"[dim]{results[setting]}[/]")
    console.print(table)


def render(cmp: dict[str, Any], console) -> None:
    from rich.table import Table

    runs = cmp["runs"]
    table = Table(title="eval results" + (f" (Δ against {runs[0]['label']})" if runs else ""), title_justify="left")
    table.add_column("metric")
    for i, r in enumerate(runs):
        table.add_column(r["label"], justify="right")
        if i and len(runs) == 2:
            table.add_column("Δ", justify="right")
    for key, m in cmp["metrics"].items():
        better = key.startswith(HIGHER_IS_BETTER)
        cells = [key]
        for i, (v, d) in enumerate(zip(m["values"], m["deltas"])):
            delta = ""
            if i and d is not None:
                style = ("green" if d > 0 else "red" if d < 0 else "") if better else ""
                delta = f"[{style}]{d:+.4g}[/]" if style else f"{d:+.4g}"
            if i == 0 or len(runs) == 2:
                cells.append(_fmt(v))
                if i:
                    cells.append(delta or "–")
            else:
                cells.append(_fmt(v) + (f" ({delta})" if delta else ""))
        table.add_row(*cells)
    for setting in SETTINGS:
        vals = [r["settings"].get(setting) for r in runs]
        if any(v is not None for v in vals):
            cells = [f"[dim]{setting}[/]"]
            for i, v in enumerate(vals):
                cells.append(f"[dim]{'–' if v is None else v}[/]")
                if i and len(runs) == 2:
                    cells.append("")
            table.add_row(*cells)
    console.print(table)
