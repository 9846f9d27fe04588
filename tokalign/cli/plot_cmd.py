from __future__ import annotations

from typing import List, Optional

import typer


def plot(
    inputs: List[str] = typer.Argument(..., help="Checkpoints (or their metrics.jsonl, or a running `<out>.partial`) for training curves; "
                                       "eval artifacts (or results.json) for a bar chart. Several are overlaid."),
    out: str = typer.Option("plot.png", "--out", "-o", help="PNG to write (replaced if it exists)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metric names or patterns (`reward/*`), or `all` "
                                          "(default: loss, reward/mean, kl, entropy, completion/len_mean, clip_fraction, advantage/abs_mean, grad_norm where logged)."),
    smooth: Optional[int] = typer.Option(None, "--smooth", min=1, help="Trailing-mean window drawn over the raw curve (1 = raw only; default: steps/12 from 24 steps)."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="A name per input, in order (default: from the paths)."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title."),
):
    """Plot training metrics (one panel each, runs overlaid) and eval results (pass@k bars) to a PNG."""
    from tokalign.cli.common import emit
    from tokalign.inspect.plot import figure, load

    runs, evals = load(inputs, label)
    emit(figure(runs, evals, out, metrics=metrics, smoothing=smooth, title=title))
