import pytest

from tokalign import config
from tokalign.errors import UserError


def test_set_parses_yaml_scalars_into_nested_keys():
    assert config.parse_set(["train.lr=1e-5", "algorithm.beta=0.04", "reward=[a, b]", "data=arith"]) == {
        "train": {"lr": 1e-5}, "algorithm": {"beta": 0.04}, "reward": ["a", "b"], "data": "arith"}


def test_layers_override_in_order():
    cfg = config.resolve([{"train": {"lr": 1.0, "max_steps": 3}}, {"train": {"lr": 2.0}}, config.parse_set(["train.max_steps=7"])])
    assert (cfg.train.lr, cfg.train.max_steps) == (2.0, 7)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(UserError, match=r"Unknown config key 'train.lrr'. Did you mean 'train.lr'\?"):
        config.resolve([{"train": {"lrr": 1}}])


@pytest.mark.parametrize("item,msg", [("train.max_steps=1.5", "must be an integer"), ("train.lr=abc", "must be a number"),
                                      ("rollout.n=true", "must be an integer"), ("noequals", "key=value")])
def test_bad_values_are_user_errors(item, msg):
    with pytest.raises(UserError, match=msg):
        config.resolve([config.parse_set([item])])


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  lr: 1\n bad: [\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        config.load_yaml(p)


def test_an_option_value_that_is_not_yaml_is_its_text():
    """A judge template like 'RM {prompt} ANSWER: {completion}' is not YAML (a mapping value inside a scalar): it
    reaches the plug-in as the text typed, where it used to end in an internal YAML ParserError. An unclosed list or
    mapping is still a one-line error (a typo there must not become a string)."""
    from tokalign.config import parse_plugin_options, parse_set

    got = parse_plugin_options(["judge.template=RM {prompt} ANSWER: {completion}"], "--reward-opt", "judge.x=1")
    assert got == {"judge": {"template": "RM {prompt} ANSWER: {completion}"}}
    assert parse_set(["algorithm.budgets=[2, 8]"]) == {"algorithm": {"budgets": [2, 8]}}
    with pytest.raises(UserError, match="not a valid YAML list or mapping"):
        parse_set(["algorithm.budgets=[2, 8"])
