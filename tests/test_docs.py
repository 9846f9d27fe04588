"""The documentation: the README stays a short front page, the MkDocs site builds strictly (every link, anchor and
included file resolves) with its generated pages complete, and the worked examples of the plug-in pages work."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_ENV, ROOT, cli, token_batch

EXAMPLE = ROOT / "docs" / "examples" / "tokalign-mine"
SETUP_COMMANDS = ["bash examples/quickstart.sh", "bash tests/run.sh"]


def test_readme_is_short_and_starts_with_the_setup_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    assert lines[0] == "# tokalign" and lines[2] == "```bash", lines[:3]
    block = lines[3 : lines.index("```", 3)]
    assert [line.split("#")[0].strip() for line in block] == SETUP_COMMANDS, block
    after = " ".join(lines[lines.index("```", 3) + 1 : lines.index("```", 3) + 5])
    assert after.strip().startswith("Measured on") and "pass@1 on 200 held-out arith prompts" in after, after


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocs_gen_files") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]'; the dev extra has it)")
    out = tmp_path_factory.mktemp("site")
    env = {**CLI_ENV, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return out


def test_the_catalogue_lists_every_registered_algorithm(site):
    from tokalign import registry

    page = (site / "algorithms" / "catalogue" / "index.html").read_text()
    names = registry.available("algorithm")
    assert len(names) >= 38
    missing = [n for n in names if f'id="{n}"' not in page]
    assert not missing, f"not in the generated catalogue: {missing}"
    for probe in ("arXiv:2402.03300", "epsilon_high", "GreedyBaseline", "TrainedModel"):  # paper, option, hook, component
        assert probe in page, probe


def test_the_cli_reference_and_config_keys_are_generated_from_the_code(site):
    import dataclasses

    import typer

    from tokalign import config
    from tokalign.cli.app import app

    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="tokalign")
    page = (site / "reference" / "cli" / "index.html").read_text()
    for name in root.list_commands(ctx):
        assert f'id="tokalign-{name}"' in page, name
    assert "--dry-run" in page and "--reward-opt" in page
    keys = (site / "reference" / "config" / "index.html").read_text()
    for section in (config.TrainSection, config.RolloutSection):
        prefix = "train." if section is config.TrainSection else "rollout."
        for f in dataclasses.fields(section):
            assert prefix + f.name in keys, prefix + f.name


def test_source_excerpts_and_layers_are_filled_in(site):
    components = (site / "plugins" / "components" / "index.html").read_text()
    assert "<!-- source:" not in components and "TrainedModel" in components and "GreedyBaseline" in components
    assert "<!-- importlinter -->" not in (site / "architecture" / "index.html").read_text()


# ------------------------------------------------------------------ the worked examples of docs/plugins/*.md


@pytest.fixture
def mine(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in docs/
    yield
    for name in [m for m in sys.modules if m == "tokalign_mine" or m.startswith("tokalign_mine.")]:
        del sys.modules[name]


def test_the_examples_satisfy_their_protocols(mine):
    import tomllib

    from tokalign import registry

    entry_points = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    kinds = {"tokalign.algorithms": "algorithm", "tokalign.rewards": "reward", "tokalign.verifiers": "verifier", "tokalign.tasks": "task",
             "tokalign.logits_processors": "logits_processor"}
    assert set(entry_points) == set(kinds)
    for group, names in entry_points.items():
        for value in names.values():
            module, _, attr = value.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            assert registry.check_obj(kinds[group], obj) is None, value


def test_the_example_reward_verifier_and_task(mine):
    from tokalign_mine.reward import TargetLength
    from tokalign_mine.task import Multiply
    from tokalign_mine.verifier import LastNumber

    from tokalign.protocols import Sample

    sample = Sample(id="s", prompt="3*4=", completion="so 12", completion_ids=[1, 2, 3, 4, 5, 6], reference="12")
    (r,) = TargetLength(TargetLength.Config(target=4, penalty=0.5))([sample])
    assert r.token_values == [0, 0, 0, 0, -0.5, -0.5] and r.value == -1.0  # one value per completion token
    v = LastNumber(LastNumber.Config())
    assert v.verify(sample).passed and v.answer(sample) == "12"
    task = Multiply("20")
    train, test = task.records("train"), task.records("test")
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in test) and len(train) + len(test) == 8 * 19
    assert set(train[0]) == {"id", "prompt", "completion", "reference"} and train[0]["prompt"][0]["role"] == "user"


def test_the_example_component_and_algorithm(mine):
    import torch
    from tokalign_mine.algorithm import ReinforceRunning
    from tokalign_mine.components import RunningBaseline, SkipAllTruncated

    algo = ReinforceRunning(ReinforceRunning.Config(decay=0.5))
    (component,) = algo.needs.components
    assert isinstance(component, RunningBaseline) and isinstance(algo.needs.hooks[0], SkipAllTruncated)
    means = []
    for rewards in ([1.0, 0.0], [1.0, 1.0], [0.0, 0.0]):
        batch = token_batch([[1, 1], [1, 0]], {"rewards": torch.tensor(rewards)}, {"tokens": 3, "seqs": 2})
        component.fill(batch, ctx=None)
        means.append(float(batch.fields["baseline"][0]))
    assert means == [0.5, 0.5, 0.75]  # the first batch's own mean, then the moving average of the steps before
    restored = RunningBaseline(0.5)
    restored.load_state_dict(component.state_dict())
    assert restored.mean == component.mean
    batch = algo.prepare(batch)
    logps = torch.zeros(2, 2, requires_grad=True)
    from tokalign.protocols import PolicyOutput

    out = algo.loss(batch, PolicyOutput(logps=logps))
    out.loss.backward()
    assert out.loss.dim() == 0 and logps.grad is not None
    assert not SkipAllTruncated().accept([{"finish_reason": "length"}] * 2)
    assert SkipAllTruncated().accept([{"finish_reason": "length"}, {"finish_reason": "stop"}])


def test_the_example_plugins_pass_the_dry_run():
    """As the pages run them (module:attr paths instead of installing): the algorithm with its component and hook,
    the task as data, the verifier and the reward (with an option) as rewards."""
    env = {"PYTHONPATH": os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")]), "PYTHONDONTWRITEBYTECODE": "1"}
    out = cli("train", "tokalign_mine.algorithm:ReinforceRunning", "--data", "tokalign_mine.task:Multiply:20",
              "--reward", "tokalign_mine.verifier:LastNumber", "--reward", "tokalign_mine.reward:TargetLength*0.1",
              "--reward-opt", "tokalign_mine.reward:TargetLength.target=8", "--dry-run", env=env).stdout
    assert "running_baseline -> baseline" in out and "skip_all_truncated" in out, out


def test_the_seed_coverage_page_counts_its_rows_and_names_real_modules():
    """The page's summary line is its rows' count, a row names a module exactly when it is not 'missing', and every
    module it names exists (a module added without its row, or a row left 'missing', fails here)."""
    import re

    text = (ROOT / "docs" / "algorithms" / "seed-coverage.md").read_text()
    rows = [re.split(r"(?<!\\)\|", line) for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 78
    counts = {"implemented": 0, "partial": 0, "covered": 0, "out of scope": 0, "missing": 0}
    for cells in rows:
        status = cells[5].strip()
        kind = next((k for k in ("missing", "partial", "covered", "out of scope") if status.startswith(k)), "implemented")
        counts[kind] += 1
        modules = re.findall(r"`((?:algorithms|rewards|verifiers|rollout|data|environments|decoding)/[a-z0-9_/]+\.py)`", status)
        assert bool(modules) == (kind in ("implemented", "partial")) or kind in ("covered", "out of scope"), cells[1:3]
        for m in modules:
            assert (ROOT / "tokalign" / m).is_file(), f"row {cells[1].strip()} names tokalign/{m}, which does not exist"
    summary = (f"{counts['implemented']} implemented, {counts['partial']} partial, "
               f"{counts['covered']} covered by an existing algorithm, {counts['out of scope']} out of scope, {counts['missing']} missing")
    assert summary in text, f"the summary line should read: {summary}"
