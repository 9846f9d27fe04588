"""Reward options: a plug-in's nested Config dataclass, filled from --reward-opt NAME.key=value (score,
train, eval) or reward_options in the run config; bad keys and values are one-line user errors."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT, cli
from score_plugins import make_rollouts
from tokalign import rewards
from tokalign.errors import UserError

COUNTING = "score_plugins:Counting"
ENV = {"PYTHONPATH": str(ROOT / "tests")}


def test_parse_options_types_values_like_set():
    got = rewards.parse_options(["math.tolerance=1e-6", "math.mode=strict", "length.target=64", "pkg.mod:Cls.flag=true"])
    assert got == {"math": {"tolerance": 1e-6, "mode": "strict"}, "length": {"target": 64}, "pkg.mod:Cls": {"flag": True}}
    for bad in ("math", "math=1", ".x=1", "math.=1", "math.a-b=1"):
        with pytest.raises(UserError, match="--reward-opt expects NAME.key=value"):
            rewards.parse_options([bad])


def test_a_config_class_is_built_from_its_options():
    (r,) = rewards.resolve([f"{COUNTING}*0.5"], {COUNTING: {"scale": 2}})
    assert r.fn.config.scale == 2.0 and r.weight == 0.5
    assert r.options == {"scale": 2} and r.config == {"log": "", "scale": 2.0}
    (default,) = rewards.resolve([COUNTING])
    assert default.fn.config.scale == 1.0 and default.fingerprint != r.fingerprint  # options are part of the cache key
    (plain,) = rewards.resolve(["exact_match"])  # no Config: Cls()
    assert plain.config is None and plain.is_verifier


@pytest.mark.parametrize("options, message", [
    ({COUNTING: {"scal": 2}}, f"reward '{COUNTING}' has no option 'scal'. Did you mean 'scale'? Valid options: log, scale."),
    ({COUNTING: {"scale": "abc"}}, f"reward '{COUNTING}': bad option value: Config key '{COUNTING}.scale' must be a number, got 'abc'. Valid options: log, scale."),
    ({COUNTING: {"scale": -1}}, "scale must be ≥ 0, got -1.0"),
    ({COUNTING: 3}, f"reward_options.{COUNTING} must be a mapping"),
    ({"exact_match": {"x": 1}}, "reward 'exact_match' takes no options (it defines no Config dataclass); got x."),
    ({"exact_mach": {"x": 1}}, "Options given for reward 'exact_mach', which this run does not use. Did you mean 'exact_match'?"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(UserError) as e:
        rewards.resolve([COUNTING, "exact_match"], options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_score_records_the_options(tmp_path):
    make_rollouts(tmp_path / "R", 4)
    cli("score", "R", "-r", COUNTING, "--reward-opt", f"{COUNTING}.scale=3", "--no-cache", "--out", "S", cwd=tmp_path, env=ENV)
    m = json.loads((tmp_path / "S" / "manifest.json").read_text())
    assert m["config"]["reward_options"] == {COUNTING: {"scale": 3}}
    assert m["plugins"][0]["options"] == {"log": "", "scale": 3.0}


@pytest.mark.parametrize("command", ["score", "eval"])
def test_a_bad_option_exits_2_with_one_line_and_no_output(tmp_path, command):
    from tokalign import artifacts

    make_rollouts(tmp_path / "R", 4)
    with artifacts.writing(tmp_path / "P", "prompts", artifacts.Provenance()) as w:
        w.write_rows([{"id": "p0", "prompt": '"q"', "prompt_text": "q", "prompt_ids": [1], "reference": '"a"'}])
    args = ["score", "R", "-r", COUNTING] if command == "score" else ["eval", "--data", "P", "--verifier", COUNTING]
    proc = cli(*args, "--reward-opt", f"{COUNTING}.nope=1", "--out", "X", cwd=tmp_path, env=ENV, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no option 'nope'" in lines[0] and "Valid options: log, scale" in lines[0]
    assert not (tmp_path / "X").exists()


def resolved_config(proc) -> dict:
    return yaml.safe_load(proc.stdout.split("resolved config:\n", 1)[1])


def test_train_layers_yaml_flag_and_set(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"reward": [COUNTING], "reward_options": {COUNTING: {"scale": 2, "log": "a"}}}))
    base = ["train", "grpo", "--data", "arith", "--config", "run.yaml", "--dry-run"]
    assert resolved_config(cli(*base, cwd=tmp_path, env=ENV))["reward_options"] == {COUNTING: {"scale": 2, "log": "a"}}
    proc = cli(*base, "--reward-opt", f"{COUNTING}.scale=4", cwd=tmp_path, env=ENV)
    assert resolved_config(proc)["reward_options"] == {COUNTING: {"scale": 4, "log": "a"}}
    proc = cli(*base, "--reward-opt", f"{COUNTING}.scale=4", "--set", "reward_options.exact_match.x=1", "--reward", "exact_match",
               cwd=tmp_path, env=ENV, check=False)
    assert proc.returncode == 2 and "reward 'exact_match' takes no options" in proc.stderr
    proc = cli(*base, "--set", "reward_options.other.x=1", cwd=tmp_path, env=ENV, check=False)
    assert proc.returncode == 2 and "Options given for reward 'other', which this run does not use" in proc.stderr
