"""`tokalign plot` (training curves, eval bars) and `tokalign eval --compare` on hand-made inputs,
then on a real train + eval chain (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli
from tokalign.inspect.plot import Run, choose_metrics, smooth


def write_results(path: Path, **values) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"model": path.name, "n": 2, "num_prompts": 10, **values}))
    return path


def write_metrics(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def curve(n: int, slope: float) -> list[dict]:
    return [{"step": i + 1, "loss": 1.0 - slope * i, "reward/mean": slope * i, "reward/exact_match": slope * i,
             "clip_fraction": 0.0, "entropy": 0.5 + 0.01 * (i % 3), "lr": 1e-4} for i in range(n)]


def coloured_fraction(png: Path) -> tuple[tuple[int, int], float]:
    from PIL import Image

    img = Image.open(png).convert("RGB")
    small = img.resize((img.width // 4, img.height // 4))
    px = list(zip(*[iter(small.tobytes())] * 3))
    return img.size, sum(max(p) - min(p) > 60 for p in px) / len(px)


def test_compare_json_has_values_and_deltas_against_the_first(tmp_path):
    a = write_results(tmp_path / "before", **{"pass@1": 0.25, "pass@2": 0.5, "mean_reward": 0.25, "mean_completion_tokens": 4.0})
    b = write_results(tmp_path / "after", **{"pass@1": 0.75, "pass@2": 1.0, "mean_reward": 0.75, "mean_completion_tokens": 3.0})
    c = write_results(tmp_path / "other", **{"pass@1": 0.5})
    out = json.loads(cli("eval", "--compare", str(a), str(b / "results.json"), str(c), "--json").stdout)
    assert [r["label"] for r in out["runs"]] == ["before", "after", "other"]
    assert out["runs"][1]["settings"] == {"model": "after", "n": 2, "num_prompts": 10}
    m = out["metrics"]
    assert list(m)[:3] == ["pass@1", "pass@2", "mean_reward"]  # pass@k first, by k
    assert m["pass@1"] == {"values": [0.25, 0.75, 0.5], "deltas": [0.0, 0.5, 0.25]}
    assert m["mean_completion_tokens"] == {"values": [4.0, 3.0, None], "deltas": [0.0, -1.0, None]}


def test_compare_table(tmp_path):
    a = write_results(tmp_path / "before", **{"pass@1": 0.25, "mean_reward": 0.25})
    b = write_results(tmp_path / "after", **{"pass@1": 0.75, "mean_reward": 0.75})
    out = cli("eval", "--compare", str(a), str(b))
    lines = [line for line in out.stdout.splitlines() if "pass@1" in line]
    assert lines and "0.25" in lines[0] and "0.75" in lines[0] and "+0.5" in lines[0]
    assert "before" in out.stdout and "after" in out.stdout and "Δ" in out.stdout


def test_compare_and_plot_user_errors(tmp_path):
    a = write_results(tmp_path / "a", **{"pass@1": 0.5})
    (tmp_path / "bad.json").write_text("{not json")
    run = write_metrics(tmp_path / "run", curve(5, 0.1))
    for args, says in [
        (["eval", "--compare", str(a)], "two or more"),
        (["eval", str(a), str(a)], "--compare"),
        (["eval", "--compare", str(a), str(tmp_path / "missing")], "neither an eval artifact"),
        (["eval", "--compare", str(a), str(tmp_path / "bad.json")], "not valid JSON"),
        (["plot", str(tmp_path / "missing")], "does not exist"),
        (["plot", str(tmp_path)], "neither metrics.jsonl"),
        (["plot", str(run), "--metrics", "kl*"], "matches none of the logged metrics: loss, reward/mean"),
        (["plot", str(run), str(a), "--label", "x"], "--label was given 1 times for 2 inputs"),
    ]:
        proc = cli(*args, "--out", str(tmp_path / "x.png"), check=False) if args[0] == "plot" else cli(*args, check=False)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_default_metrics_skip_constant_panels_and_smooth_is_a_trailing_mean():
    runs = [Run("a", Path("a"), curve(5, 0.1))]
    assert choose_metrics(runs, None) == ["loss", "reward/mean", "entropy"]  # clip_fraction never moved; lr not a default
    assert choose_metrics(runs, "reward/*,lr") == ["reward/mean", "reward/exact_match", "lr"]
    assert "clip_fraction" in choose_metrics(runs, "all")
    assert smooth([1.0, 3.0, 5.0, float("nan")], 2) == [1.0, 2.0, 4.0, 5.0]


def test_plot_overlays_runs_and_draws_eval_bars(tmp_path):
    a = write_metrics(tmp_path / "grpo", curve(40, 0.02))
    b = write_metrics(tmp_path / "dapo.partial", curve(30, 0.03))  # a run still training: its work dir
    e1 = write_results(tmp_path / "eval-before", **{"pass@1": 0.4, "pass@2": 0.6, "mean_reward": 0.4})
    e2 = write_results(tmp_path / "eval-after", **{"pass@1": 0.7, "pass@2": 0.9, "mean_reward": 0.7})
    png = tmp_path / "plots" / "curves.png"
    proc = cli("plot", str(a), str(tmp_path / "dapo"), str(e1), str(e2 / "results.json"), "--out", str(png), "--title", "t")
    assert proc.stdout == f"{png}\n"
    size, frac = coloured_fraction(png)
    assert size[0] > 800 and size[1] > 500 and frac > 0.01, (size, frac)
    only_eval = cli("plot", str(e1), str(e2), "--out", str(tmp_path / "eval.png")).stdout.strip()
    assert coloured_fraction(Path(only_eval))[1] > 0.05  # filled bars


@pytest.mark.slow
def test_plot_compare_inspect_on_a_real_train_and_eval(tmp_path):
    """A short quickstart: eval before, GRPO, eval after; then the three diagnostics on its outputs."""
    w = tmp_path
    cli("prepare", "arith", "--split", "test", "--limit", "8", "--out", "T", cwd=w)
    cli("eval", "--data", "T", "--n", "2", "--out", "E0", "-q", cwd=w)
    cli("train", "grpo", "--data", "arith", "--max-steps", "3", "--batch-size", "4", "--out", "C", cwd=w)
    cli("eval", "--model", "C", "--data", "T", "--n", "2", "--out", "E1", "-q", cwd=w)
    png = cli("plot", "C", "E0", "E1", "--out", "q.png", cwd=w).stdout.strip()
    assert coloured_fraction(w / png)[1] > 0.01
    cmp = json.loads(cli("eval", "--compare", "E0", "E1", "--json", cwd=w).stdout)
    before, after = (json.loads((w / e / "results.json").read_text()) for e in ("E0", "E1"))
    assert cmp["metrics"]["pass@1"]["values"] == [before["pass@1"], after["pass@1"]]
    assert cmp["metrics"]["pass@1"]["deltas"][1] == pytest.approx(after["pass@1"] - before["pass@1"])
    out = cli("inspect", "E1", "--limit", "2", "--color", "entropy", cwd=w).stdout  # model C from E1's manifest
    assert "trainer entropy" in out and out.count("arith-test-") == 2
