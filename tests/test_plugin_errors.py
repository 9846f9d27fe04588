"""A plug-in's failure is reported as the plug-in's: one line naming it, its distribution and the method (exit 2);
`--debug`, before or after the subcommand, shows the original traceback."""

from __future__ import annotations

import json

import pytest

from conftest import cli
from tokalign import __version__, plugin_errors, registry
from tokalign.errors import UserError
from tokalign.plugin_errors import ContractViolation, PluginError


def boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_guard_names_the_plugin_its_distribution_and_the_method():
    with pytest.raises(PluginError) as e:
        with plugin_errors.guard("algorithm", "grpo", "loss"):
            boom()
    assert str(e.value) == f"algorithm 'grpo' (tokalign {__version__}) raised in loss(): RuntimeError: boom"
    assert isinstance(e.value, UserError) and e.value.exit_code == 2
    assert isinstance(e.value.__cause__, RuntimeError)  # chained: --debug prints the plug-in's own traceback


def test_call_passes_arguments_and_returns_the_result():
    assert plugin_errors.call("algorithm", "grpo", "prepare", lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(PluginError, match=r"^algorithm 'grpo' \(tokalign [^)]+\) raised in prepare\(\): RuntimeError: boom$"):
        plugin_errors.call("algorithm", "grpo", "prepare", boom, 1)


def test_a_module_attr_plugin_without_a_distribution(tmp_path, monkeypatch):
    (tmp_path / "my_local_mod.py").write_text("class Algo:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as e:
        plugin_errors.call("algorithm", "my_local_mod:Algo", "loss", boom)
    assert str(e.value) == "algorithm 'my_local_mod:Algo' (module my_local_mod, no distribution) raised in loss(): RuntimeError: boom"


def test_a_name_no_registry_knows_is_still_named():
    with pytest.raises(PluginError) as e:
        plugin_errors.call("algorithm", "no_such_algo", "loss", boom)
    assert str(e.value) == "algorithm 'no_such_algo' raised in loss(): RuntimeError: boom"


def test_a_name_registered_under_another_kind_keeps_its_distribution():
    # exact_match is a verifier; scoring may name it as a reward
    assert plugin_errors.label("reward", "exact_match") == f"reward 'exact_match' (tokalign {__version__})"


def test_the_message_is_one_line_and_bounded():
    with pytest.raises(PluginError) as e:
        with plugin_errors.guard("task", "arith", "records"):
            raise ValueError("line one\nline two " + "x" * 1000)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"task 'arith' (tokalign {__version__}) raised in records(): ValueError: line one line two x")
    assert len(msg) < 400 and msg.endswith("…")


def test_an_exception_without_a_message_names_its_type():
    with pytest.raises(PluginError, match=r"raised in loss\(\): KeyError$"):
        with plugin_errors.guard("algorithm", "grpo", "loss"):
            raise KeyError()


def test_user_errors_and_interrupts_pass_through_unchanged():
    with pytest.raises(UserError) as e:
        with plugin_errors.guard("algorithm", "grpo", "loss"):
            raise UserError("the plug-in's own message")
    assert type(e.value) is UserError and str(e.value) == "the plug-in's own message"
    with pytest.raises(KeyboardInterrupt):
        with plugin_errors.guard("algorithm", "grpo", "loss"):
            raise KeyboardInterrupt


def test_contract_raises_the_contract_line():
    with pytest.raises(ContractViolation) as e:
        plugin_errors.contract("algorithm", "grpo", "loss", "the loss must be a scalar tensor, got shape [2, 3]")
    assert str(e.value) == f"algorithm 'grpo' (tokalign {__version__}) broke the contract in loss(): the loss must be a scalar tensor, got shape [2, 3]"
    assert isinstance(e.value, PluginError)
    with pytest.raises(ContractViolation):  # inside a guard it is not re-wrapped
        with plugin_errors.guard("algorithm", "grpo", "loss"):
            plugin_errors.contract("algorithm", "grpo", "loss", "x")


def test_registry_label():
    assert registry.info("verifier", "exact_match").label == f"tokalign {__version__}"
    local = registry.PluginInfo("m:X", "task", "m.sub:X", registry.LOCAL, "?")
    assert local.label == "module m.sub, no distribution"


def test_verifier_returning_a_bool_is_a_contract_violation():
    from tokalign.protocols import Sample
    from tokalign.rewards import _verifier_as_reward

    class Yes:
        def verify(self, sample):
            return True

    with pytest.raises(ContractViolation) as e:
        _verifier_as_reward(Yes(), "no_such_v")([Sample("s0", "p", "c")])
    assert str(e.value) == "verifier 'no_such_v' broke the contract in verify(): it must return tokalign.protocols.Verdict, got bool"


def test_reward_returning_a_string_is_a_contract_violation():
    from tokalign.protocols import Sample
    from tokalign.scoring.calls import Alarm, call_one

    with pytest.raises(ContractViolation, match=r"reward 'r' broke the contract in __call__\(\): it must return a Reward or a float per sample, got str"):
        call_one(lambda samples: ["1"], "r", Sample("s0", "p", "c"), Alarm(None))
    with pytest.raises(ContractViolation, match=r"it must return one value per sample, got 2 for 1"):
        call_one(lambda samples: [1.0, 2.0], "r", Sample("s0", "p", "c"), Alarm(None))


def test_a_numpy_scalar_is_a_number():
    np = pytest.importorskip("numpy")
    from tokalign.protocols import Sample
    from tokalign.scoring.calls import OK, Alarm, call_one

    assert call_one(lambda samples: [np.float32(0.5)], "r", Sample("s0", "p", "c"), Alarm(None)) == (OK, (0.5, None, {}))


# ------------------------------------------------------------------------------------------------ through the CLI

PLUGINS = '''
from tokalign.protocols import Verdict

class Boom:
    def __call__(self, samples):
        raise RuntimeError("boom")

class Flaky:
    def __call__(self, samples):
        if samples[0].id.endswith("0"):
            raise ValueError("one bad sample")
        return [1.0 for _ in samples]

class YesMan:
    def verify(self, sample):
        return True

class BadTask:
    splits = ("train",)
    def records(self, split):
        raise KeyError("question")
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from score_plugins import make_rollouts

    w = tmp_path_factory.mktemp("plugerr")
    (w / "errplug.py").write_text(PLUGINS)
    make_rollouts(w / "R", 6)
    return w


def run(work, *args):
    return cli(*args, cwd=work, check=False, env={"PYTHONPATH": str(work), "TOKALIGN_CACHE": str(work / "cache")})


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reward_raising_on_every_sample_is_the_plugins_error(work, workers):
    proc = run(work, "score", "R", "-r", "errplug:Boom", "--workers", workers, "--no-cache", "--out", f"S{workers}")
    assert one_error_line(proc) == ("reward 'errplug:Boom' (module errplug, no distribution) failed in __call__() "
                                    "on all 6 samples: RuntimeError: boom")
    assert not (work / f"S{workers}").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_verifier_returning_a_bool_breaks_the_contract(work, workers):
    proc = run(work, "score", "R", "-r", "errplug:YesMan", "--workers", workers, "--no-cache", "--out", "S")
    assert one_error_line(proc) == ("verifier 'errplug:YesMan' (module errplug, no distribution) broke the contract in verify(): "
                                    "it must return tokalign.protocols.Verdict, got bool")


def test_a_reward_failing_on_some_samples_still_scores_the_rest(work):
    proc = run(work, "score", "R", "-r", "errplug:Flaky", "--no-cache", "--out", "SF")
    assert proc.returncode == 0, proc.stderr
    from tokalign import artifacts

    errors = [json.loads(r["reward_errors"]) for r in artifacts.read(work / "SF", ["scored"]).rows()]
    assert errors[0] == {"errplug:Flaky": "ValueError: one bad sample"} and not any(errors[1:])


def test_a_plugin_module_that_fails_to_import(work):
    (work / "brokenplug.py").write_text("raise ImportError('needs libfoo')\n")
    proc = run(work, "score", "R", "-r", "brokenplug:X", "--out", "S")
    assert one_error_line(proc) == "reward 'brokenplug:X' (module brokenplug, no distribution) failed to import: ImportError: needs libfoo"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_subcommand_shows_the_plugins_traceback(work, where):
    args = ["score", "R", "-r", "errplug:YesMan", "--no-cache", "--out", "S"]
    proc = run(work, *(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "No such option" not in proc.stderr
    assert "ContractViolation: verifier 'errplug:YesMan' (module errplug, no distribution) broke the contract" in proc.stderr
    assert "in call_one" in proc.stderr  # the full stack, down to the scoring call


def test_debug_after_the_subcommand_chains_the_original_exception(work):
    proc = run(work, "prepare", "errplug:BadTask", "--out", "P", "--debug")
    assert "Traceback" in proc.stderr and "No such option" not in proc.stderr
    assert "The above exception was the direct cause" in proc.stderr  # the plug-in's own error comes first
    assert proc.stderr.index("KeyError: 'question'") < proc.stderr.index("PluginError: task 'errplug:BadTask'")


def test_eval_names_an_unknown_verifier_a_verifier(work):
    cli("prepare", "arith", "--limit", "2", "--out", "P2", cwd=work)
    proc = run(work, "eval", "--data", "P2", "--verifier", "exact_mach", "--n", "1", "--out", "E")
    assert one_error_line(proc).startswith("Unknown verifier 'exact_mach'. Did you mean 'exact_match'?")


def test_take_debug():
    from tokalign.cli.app import _take_switch

    _take_debug = lambda argv: _take_switch(argv, "--debug")  # noqa: E731

    assert _take_debug(["train", "grpo", "--debug", "--data", "arith"]) == (["train", "grpo", "--data", "arith"], True)
    assert _take_debug(["score", "R"]) == (["score", "R"], False)
    assert _take_debug(["x", "--", "--debug"]) == (["x", "--", "--debug"], False)  # after --, an argument
