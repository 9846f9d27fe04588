"""The bad-input corpus: every case exits 2 with one line on stderr ("error: ..." naming what is wrong and the fix), no
traceback, nothing on stdout, and leaves the working directory exactly as it was (no partial output, nothing
overwritten: every pre-existing file keeps its size, mtime and bytes).

The cases share one module-scoped work directory holding small real artifacts (``prepare``/``rollout``/``score`` of
the bundled tiny model on 4 arith prompts) and damaged copies of them. ``CASES`` maps a case id to its argv, the
files it needs (created in the work directory before it runs, and so part of what must stay unchanged) and a
substring of the expected error line. Output directories that are read-only or full are tmpfs mounts inside the work
directory (root only; those cases skip elsewhere).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import cli

PLUGINS = Path(__file__).parent / "bad_inputs"  # bad_rewards.py: rewards that break the contract


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    expected: str  # a substring of the one error line
    files: dict[str, str | bytes | Callable[[], str | bytes]] = field(default_factory=dict)
    needs: str = ""  # "mounts": the read-only / full tmpfs outputs; "no-vllm": vLLM must not be installed
    xfail: str = ""  # a known bug in code this corpus does not own: strict xfail with this reason
    slow: bool = False  # loads a tokenizer or a model before it fails (seconds each)


def case(argv: str, expected: str, **kw) -> Case:
    return Case(tuple(shlex.split(argv)), expected, **kw)


def _huge_prompt() -> str:  # a 10 MB prompt field (≈5M tokens of the tiny model, whose context is 256 positions)
    return json.dumps({"prompt": "1+1= " * 2_000_000, "answer": "2"}) + "\n"


PAIR = '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
LONG_PROMPT = json.dumps({"prompt": "1+1= " * 400, "answer": "2"}) + "\n"  # 2000 tokens > the tiny model's 256 positions
LOCAL = "(module bad_rewards, no distribution)"  # how a module:attr reward is named in its errors

SLOW = {"slow": True}  # loads a tokenizer, torch or the reward pipeline before it fails: seconds each on 2 busy cores
MOUNTS = {"needs": "mounts"}

CASES: dict[str, Case] = {
    # ------------------------------------------------------------------ prepare: files, records, columns, values
    "prepare: missing file": case("prepare nope.jsonl --out X", "Data file 'nope.jsonl' does not exist", **SLOW),
    "prepare: non-UTF-8 JSONL": case("prepare latin1.jsonl --out X", "UTF-8", files={"latin1.jsonl": b'{"prompt": "caf\xe9"}\n'},
                                     **SLOW),
    "prepare: non-UTF-8 CSV": case("prepare latin1.csv --out X", "UTF-8", files={"latin1.csv": b"prompt,answer\ncaf\xe9,2\n"},
                                   **SLOW),
    "prepare: empty file": case("prepare empty.jsonl --out X", "empty.jsonl: no records", files={"empty.jsonl": ""}, **SLOW),
    "prepare: record is a list": case("prepare list.jsonl --out X", "list.jsonl line 1: expected a JSON object, got list",
                                      files={"list.jsonl": "[1, 2]\n"}, **SLOW),
    "prepare: prompt is a number": case("prepare num.jsonl --out X", "num.jsonl record 1: 'prompt' must be text",
                                        files={"num.jsonl": '{"prompt": 5}\n'}, **SLOW),
    "prepare: chosen missing in one record": case(
        "prepare pairs.jsonl --out X", "pairs.jsonl record 2: preference data needs both 'chosen' and 'rejected'",
        files={"pairs.jsonl": PAIR + '{"prompt": "2+2=", "rejected": "5"}\n'}, **SLOW),
    "prepare: empty prompt": case(
        "prepare blank.jsonl --out X", "empty", files={"blank.jsonl": '{"prompt": "", "answer": "2"}\n'}, **SLOW),
    "prepare: CSV without a header": case("prepare nohdr.csv --out X", "nohdr.csv record 1: cannot tell the format from columns",
                                          files={"nohdr.csv": "what is 1+1,2\nwhat is 2+2,4\n"}, **SLOW),
    "prepare: CSV with only a header": case("prepare hdr.csv --out X", "hdr.csv: no records", files={"hdr.csv": "prompt,answer\n"}, **SLOW),
    "prepare: truncated Parquet": case("prepare trunc.parquet --out X", "trunc.parquet: not a readable Parquet file", **SLOW),
    "prepare: Parquet without a known column": case("prepare question.parquet --out X", "cannot tell the format from columns ['question']",
                                                    **SLOW),
    "prepare: JSON that is not a list": case("prepare five.json --out X", "five.json: expected a JSON list of objects",
                                             files={"five.json": "5\n"}, **SLOW),
    "prepare: unsupported file type": case("prepare notes.txt --out X", "unsupported file type '.txt'", files={"notes.txt": "hi\n"}, **SLOW),
    "prepare: plain directory": case("prepare plain --out X", "'plain' is a directory but not a tokalign artifact", **SLOW),
    "prepare: unknown task": case("prepare arithh --out X", "Unknown data 'arithh'. Did you mean 'arith'?", **SLOW),
    "prepare: unknown split": case("prepare arith --split dev --out X", "Task 'arith' has no split 'dev'", **SLOW),
    "prepare: --limit 0": case("prepare arith --limit 0 --out X", "Invalid value for '--limit'"),
    "prepare: unknown option": case("prepare arith --limt 3 --out X", "No such option: --limt"),
    "prepare: missing argument": case("prepare --out X", "Missing argument 'source'"),
    "prepare: prompt longer than the model's context": case("prepare long.jsonl --out X", "context", files={"long.jsonl": LONG_PROMPT},
                                                           **SLOW),
    "prepare: 10 MB prompt field": case("prepare huge.jsonl --out X", "context", files={"huge.jsonl": _huge_prompt},
                                        **SLOW),  # refused before tokenising (by its length in characters)
    "prepare: output exists": case("prepare arith --out P", "Output 'P' already exists. Pass --overwrite"),
    "prepare: output is a file": case("prepare arith --out afile --overwrite", "Output 'afile' exists and is not a directory"),
    "prepare: output's parent is a file": case("prepare arith --out afile/X", "'afile' is a file, not a directory"),
    "prepare: --overwrite of a plain directory": case(
        "prepare arith --limit 4 --out keep --overwrite", "not a tokalign artifact", files={"keep/notes.txt": "precious\n"}, **SLOW),
    "prepare: read-only output directory": case("prepare arith --out ro/X", "read-only file system", **MOUNTS),
    "prepare: full output disk": case("prepare arith --out full/X", "No space left on the device", **MOUNTS, **SLOW),
    # ------------------------------------------------------------------ rollout: artifacts, names, values, flags
    "rollout: missing artifact": case("rollout nope --out X", "Input 'nope' does not exist"),
    "rollout: scored artifact": case("rollout S --out X", "'S' is a 'scored' artifact, but this command needs 'prompts'"),
    "rollout: manifest is not JSON": case("rollout P_badjson --out X", "manifest.json' is not valid JSON"),
    "rollout: data file missing": case("rollout P_nodata --out X", "'P_nodata' is missing data.parquet"),
    "rollout: data changed after writing": case("rollout P_edited --out X", "changed after it was written"),
    "rollout: truncated Parquet with --no-verify": case("--no-verify rollout P_trunc --out X", "is not a readable Parquet file"),
    "rollout: plain directory": case("rollout plain --out X", "'plain' is not a tokalign artifact (no manifest.json)"),
    "rollout: unknown backend": case("rollout P --backend vlm --out X", "Unknown rollout backend 'vlm'. Did you mean 'vllm'?"),
    "rollout: vllm not installed": case("rollout P --backend vllm --out X", "needs vLLM", needs="no-vllm", **SLOW),
    "rollout: unknown environment": case("rollout P --env calcc --out X", "Unknown environment 'calcc'"),
    "rollout: --branching without --env": case("rollout P --branching tree --out X", "it needs an environment (--env NAME"),
    "rollout: unknown branching": case("rollout P --env calculator --branching treee --out X", "Did you mean 'tree'?"),
    "rollout: --branch-opt without --branching": case("rollout P --branch-opt forks=3 --out X", "pass --branching NAME too"),
    "rollout: --max-episode-tokens without --env": case("rollout P --max-episode-tokens 64 --out X", "pass --env NAME too"),
    "rollout: malformed --branch-opt": case("rollout P --env calculator --branching tree --branch-opt forks --out X",
                                            "--branch-opt expects key=value"),
    "rollout: --n 0": case("rollout P --n 0 --out X", "Invalid value for '--n'"),
    "rollout: negative temperature": case("rollout P --temperature -1 --out X", "Invalid value for '--temperature'"),
    "rollout: temperature not a number": case("rollout P --temperature hot --out X", "Invalid value for '--temperature'"),
    "rollout: --max-new-tokens 0": case("rollout P --max-new-tokens 0 --out X", "Invalid value for '--max-new-tokens'"),
    "rollout: --top-p above 1": case("rollout P --top-p 2 --out X", "Invalid value for '--top-p'"),
    "rollout: missing model": case("rollout P --model ./no-such-model --out X", "Model './no-such-model' does not exist"),
    "rollout: model dir without config.json": case("rollout P --model plain --out X", "Model directory 'plain' has no config.json"),
    "rollout: output exists": case("rollout P --out R", "Output 'R' already exists"),
    "rollout: read-only output directory": case("rollout P --out ro/R", "read-only file system", **MOUNTS),
    "rollout: unknown logits processor": case("rollout P --logits-processor ban_token --out X",
                                              "Unknown logits processor 'ban_token'. Did you mean 'ban_tokens'?"),
    "rollout: ban_tokens without tokens": case("rollout P --logits-processor ban_tokens --out X", "name the tokens to ban"),
    "rollout: malformed --processor-opt": case("rollout P --logits-processor ban_tokens --processor-opt ids --out X",
                                               "--processor-opt expects NAME.key=value"),
    "rollout: unknown processor option": case("rollout P --logits-processor cyclic_reflex --processor-opt cyclic_reflex.perod=9 --out X",
                                              "has no option 'perod'. Did you mean 'period'?"),
    "rollout: option of a processor not used": case("rollout P --processor-opt cyclic_reflex.period=9 --out X",
                                                    "Options given for logits processor 'cyclic_reflex', which this run does not use"),
    "rollout: banned text of several tokens": case("rollout P --logits-processor ban_tokens --processor-opt 'ban_tokens.tokens=[\"12\"]' --out X",
                                                   "'12' is 2 tokens of this tokenizer", **SLOW),
    # ------------------------------------------------------------------ score: rewards, options, broken plug-ins
    "score: prompts artifact": case("score P --out X", "'P' is a 'prompts' artifact, but this command needs 'rollouts' or 'scored'"),
    "score: unknown reward": case("score R -r exact_mach --out X", "Unknown reward 'exact_mach'. Did you mean 'exact_match'?"),
    "score: bad reward weight": case("score R -r exact_match*lots --out X", "Bad reward weight in 'exact_match*lots'"),
    "score: malformed --reward-opt": case("score R --reward-opt tolerance --out X", "--reward-opt expects NAME.key=value"),
    "score: unknown reward option": case("score R -r math --reward-opt math.tolerence=1 --out X", "reward 'math' has no option 'tolerence'"),
    "score: reward option not a number": case("score R -r math --reward-opt math.timeout_s=soon --out X",
                                              "Config key 'math.timeout_s' must be a number"),
    "score: option for a reward not used": case("score R -r exact_match --reward-opt math.timeout_s=1 --out X",
                                                "Options given for reward 'math', which this run does not use"),
    "score: reward module missing": case("score R -r no_such_module:fn --out X", "Cannot import 'no_such_module:fn'", **SLOW),
    "score: reward attribute missing": case("score R -r bad_rewards:missing --out X", "has no attribute 'missing'", **SLOW),
    "score: reward returns NaN": case("score R -r bad_rewards:nan --out X", f"reward 'bad_rewards:nan' {LOCAL} broke the contract in "
                                      "__call__(): it returned nan for sample 'arith-train-13+54#0'; a reward must be a finite number"),
    "score: reward returns -inf": case("score R -r bad_rewards:inf --out X", f"reward 'bad_rewards:inf' {LOCAL} broke the contract", **SLOW),
    "score: reward returns None": case("score R -r bad_rewards:none --out X", f"reward 'bad_rewards:none' {LOCAL} broke the contract", **SLOW),
    "score: reward returns text": case("score R -r bad_rewards:text --out X", "must return a Reward or a float per sample, got str", **SLOW),
    "score: token values of the wrong length": case("score R -r bad_rewards:long_tokens --out X",
                                                    "token_values needs one value per completion token"),
    "score: NaN token values": case("score R -r bad_rewards:nan_tokens --out X", "token_values must be finite numbers", **SLOW),
    "score: NaN reward in worker processes": case("score R -r bad_rewards:nan --workers 2 --out X", "reward 'bad_rewards:nan'", **SLOW),
    "score: negative --timeout": case("score R --timeout -1 --out X", "Invalid value for '--timeout'"),
    "score: negative --workers": case("score R --workers -1 --out X", "Invalid value for '--workers'"),
    "score: rollouts with ragged sampler_logps": case(
        "score R_ragged --out X", "sampler_logps", **SLOW),
    "score: output exists": case("score R --out S", "Output 'S' already exists"),
    "score: read-only output directory": case("score R --out ro/S", "read-only file system", **MOUNTS),
    "score: full output disk": case("score R --out full/S", "No space left on the device", **MOUNTS),
    # ------------------------------------------------------------------ train: names, config, values, data, outputs
    "train: missing data file": case("train dpo --data nope.jsonl --out X", "Data file 'nope.jsonl' does not exist", **SLOW),
    "train: malformed JSONL": case("train dpo --data bad.jsonl --out X", "bad.jsonl line 2: invalid JSON",
                                   files={"bad.jsonl": PAIR + '{"prompt": "a", chosen: 1}\n'}, **SLOW),
    "train: non-UTF-8 data": case("train dpo --data latin1.jsonl --dry-run", "UTF-8", files={"latin1.jsonl": b'{"prompt": "caf\xe9"}\n'},
                                  **SLOW),
    "train: unknown algorithm": case("train grpoo --data arith --out X", "Unknown algorithm 'grpoo'. Did you mean 'grpo'?", **SLOW),
    "train: missing algorithm": case("train --data arith", "Missing argument 'ALGO'"),
    "train: unknown reward": case("train grpo --data arith --reward exact_mach --out X", "Did you mean 'exact_match'?", **SLOW),
    "train: unknown --set key": case("train grpo --data arith --set train.lrr=1 --out X",
                                     "Unknown config key 'train.lrr'. Did you mean 'train.lr'?", **SLOW),
    "train: malformed --set": case("train grpo --data arith --set lr --out X", "--set expects key=value", **SLOW),
    "train: bad algorithm value": case("train grpo --data arith --set algorithm.kl_estimator=k9 --out X", "kl_estimator must be one of",
                                       **SLOW),
    "train: unknown precision": case("train grpo --data arith --set train.precision=fp8 --out X", "train.precision must be one of", **SLOW),
    "train: negative lr": case("train grpo --data arith --lr -1e-5 --out X", "train.lr must be a finite number ≥ 0", **SLOW),
    "train: NaN lr": case("train grpo --data arith --set train.lr=.nan --out X", "train.lr must be a finite number ≥ 0", **SLOW),
    "train: lr not a number": case("train grpo --data arith --set train.lr=fast --out X", "Config key 'train.lr' must be a number", **SLOW),
    "train: --lr not a number": case("train grpo --data arith --lr fast --out X", "Invalid value for '--lr'"),
    "train: --n 0": case("train grpo --data arith --n 0 --out X", "rollout.n must be ≥ 1", **SLOW),
    "train: negative temperature": case("train grpo --data arith --set rollout.temperature=-0.5 --out X",
                                        "rollout.temperature must be a finite number ≥ 0", **SLOW),
    "train: max_new_tokens 0": case("train grpo --data arith --set rollout.max_new_tokens=0 --out X", "rollout.max_new_tokens must be ≥ 1",
                                    **SLOW),
    "train: top_p above 1": case("train grpo --data arith --set rollout.top_p=1.5 --out X", "rollout.top_p must be a finite number in (0, 1]",
                                 **SLOW),
    "train: --batch-size 0": case("train grpo --data arith --batch-size 0 --out X", "train.batch_size must be ≥ 1", **SLOW),
    "train: config is not YAML": case("train grpo --config bad.yaml --out X", "config file 'bad.yaml' is not valid YAML at line 2",
                                      files={"bad.yaml": "train: [1, 2\n"}, **SLOW),
    "train: config is a list": case("train grpo --config list.yaml --out X", "must hold a mapping of keys, not list",
                                    files={"list.yaml": "- a\n- b\n"}, **SLOW),
    "train: config missing": case("train grpo --config nope.yaml --out X", "config file 'nope.yaml' does not exist", **SLOW),
    "train: malformed --with": case("train grpo --data arith --with teacher --out X", "--with expects ROLE=PATH", **SLOW),
    "train: model role the algorithm does not use": case("train grpo --data arith --teacher P --out X",
                                                         "'grpo' uses no model for role(s) teacher", **SLOW),
    "train: --branching without --env": case("train grpo --data arith --branching tree --out X", "it needs an environment (--env NAME",
                                             **SLOW),
    "train: unknown environment": case("train grpo --data arith --env calcc --out X", "Unknown environment 'calcc'", **SLOW),
    "train: vllm not installed": case("train grpo --data arith --backend vllm --out X", "--backend vllm needs vLLM", needs="no-vllm",
                                      **SLOW),
    "train: unknown logits processor": case("train grpo --data arith --logits-processor ban_token --out X",
                                            "Unknown logits processor 'ban_token'. Did you mean 'ban_tokens'?", **SLOW),
    "train: unknown tracker": case("train grpo --data arith --log tensorbord --out X", "Unknown --log 'tensorbord'", **SLOW),
    "train: wrong data for the algorithm": case("train dpo --data arith --out X", "'dpo' trains on pairs data", **SLOW),
    "train: unscored rollouts": case("train grpo --data R --out X", "'R' holds unscored rollouts; score them first", **SLOW),
    "train: NaN reward in a scored artifact": case("train grpo --data S_nan --out X",
                                                   "'S_nan' row 2 (id 'arith-train-13+54#1') has reward = nan"),
    "train: inf reward in a scored artifact": case("train grpo --data S_inf --out X",
                                                   "has rewards.exact_match = inf: rewards must be finite numbers", **SLOW),
    "train: token rewards of the wrong length": case("train grpo --data S_tokens --out X", "has 99 token_rewards for", **SLOW),
    "train: ragged sampler_logps": case("train grpo --data S_ragged --out X", "sampler_logps for"),
    "train: nothing to resume": case("train grpo --data S --resume --out X", "Nothing to resume: 'X.partial' does not exist", **SLOW),
    "train: output exists": case("train grpo --data S --max-steps 1 --out P", "Output 'P' already exists", **SLOW),
    "train: output's parent is a file": case("train grpo --data S --max-steps 1 --out afile/C", "'afile' is a file, not a directory",
                                             **SLOW),
    "train: read-only output directory": case("train grpo --data S --max-steps 1 --out ro/C", "read-only file system", **MOUNTS, **SLOW),
    # ------------------------------------------------------------------ eval
    "eval: unknown verifier": case("eval --data P --verifier exact_mach --out X",
                                   "Unknown verifier 'exact_mach'. Did you mean 'exact_match'?", **SLOW),
    "eval: scored artifact": case("eval --data S --out X", "'S' is a 'scored' artifact, but this command needs 'prompts'", **SLOW),
    "eval: unknown data": case("eval --data arithh --out X", "Unknown data 'arithh'", **SLOW),
    "eval: unknown split": case("eval --data arith --split dev --out X", "Task 'arith' has no split 'dev'", **SLOW),
    "eval: unknown environment": case("eval --data P --env calcc --out X", "Unknown environment 'calcc'"),
    "eval: unknown logits processor": case("eval --data P --logits-processor cyclic_reflx --out X",
                                           "Unknown logits processor 'cyclic_reflx'. Did you mean 'cyclic_reflex'?"),
    "eval: unknown backend": case("eval --data P --backend vlm --out X", "Did you mean 'vllm'?"),
    "eval: --n 0": case("eval --data P --n 0 --out X", "Invalid value for '--n'"),
    "eval: option of an optionless reward": case("eval --data P --reward-opt exact_match.strict=1 --out X",
                                                 "reward 'exact_match' takes no options", **SLOW),
    "eval: missing reference model": case("eval --data P --ref ./no-ref --out X", "Model './no-ref' does not exist", **SLOW),
    "eval: results paths without --compare": case("eval E1 E2", "Paths after `tokalign eval` and --json are for --compare"),
    "eval: --compare with --data": case("eval --compare --data P E1 E2", "--compare only reads existing results, so --data would do nothing"),
    "eval: --compare of nothing": case("eval --compare", "--compare needs two or more eval results"),
    "eval: --compare of a missing result": case("eval --compare nope1 nope2", "'nope1' is neither an eval artifact"),
    "eval: results.json not JSON": case("eval --compare E1 E2", "results.json' is not valid JSON",
                                        files={"E1/results.json": "{bad\n", "E2/results.json": "{bad\n"}),
    "eval: output exists": case("eval --data P --out S", "Output 'S' already exists"),
    "eval: read-only output directory": case("eval --data P --out ro/E", "read-only file system", **MOUNTS),
}


# ---------------------------------------------------------------------------------------------- the work directory


def _rewrite(src: Path, dst: Path, column: str, edit) -> None:
    """A copy of artifact ``src`` whose ``column`` is ``edit``ed in place, its manifest re-recording the data file's
    size and sha256 (so the damage passes verification and only the content check can catch it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    table = pq.read_table(dst / "data.parquet")
    values = table.column(column).to_pylist()
    edit(values)
    i = table.schema.get_field_index(column)
    kind = pa.list_(pa.float64()) if column == "token_rewards" else table.schema.field(i).type  # token_rewards: all null before
    table = table.set_column(i, pa.field(column, kind), pa.array(values, type=kind))
    pq.write_table(table, dst / "data.parquet")
    manifest = json.loads((dst / "manifest.json").read_text())
    data = (dst / "data.parquet").read_bytes()
    for entry in manifest["files"]:
        if entry["name"] == "data.parquet":
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _mount(args: list[str]) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def work(tmp_path_factory, request):
    import pyarrow as pa
    import pyarrow.parquet as pq

    w = tmp_path_factory.mktemp("bad")
    cli("prepare", "arith", "--limit", "4", "--out", "P", cwd=w)
    cli("rollout", "P", "--n", "2", "--max-new-tokens", "4", "--out", "R", cwd=w)
    cli("score", "R", "--no-cache", "--out", "S", cwd=w)
    # damaged copies
    shutil.copytree(w / "P", w / "P_badjson")
    (w / "P_badjson" / "manifest.json").write_text("{not json\n")
    shutil.copytree(w / "P", w / "P_nodata")
    (w / "P_nodata" / "data.parquet").unlink()
    shutil.copytree(w / "P", w / "P_edited")
    pq.write_table(pq.read_table(w / "P_edited" / "data.parquet").slice(0, 2), w / "P_edited" / "data.parquet")
    shutil.copytree(w / "P", w / "P_trunc")
    with open(w / "P_trunc" / "data.parquet", "r+b") as f:
        f.truncate(100)
    _rewrite(w / "S", w / "S_nan", "reward", lambda v: v.__setitem__(1, float("nan")))
    _rewrite(w / "S", w / "S_inf", "rewards", lambda v: v[0].__setitem__("exact_match", float("inf")))
    _rewrite(w / "S", w / "S_tokens", "token_rewards", lambda v: v.__setitem__(0, [0.5] * 99))
    _rewrite(w / "S", w / "S_ragged", "sampler_logps", lambda v: v.__setitem__(0, v[0][:-1]))
    _rewrite(w / "R", w / "R_ragged", "sampler_logps", lambda v: v.__setitem__(0, v[0][:-1]))
    # data files that need more than text
    table = pa.table({"prompt": ["1+1="] * 200, "answer": ["2"] * 200})
    pq.write_table(table, w / "full.parquet")
    whole = (w / "full.parquet").read_bytes()
    (w / "trunc.parquet").write_bytes(whole[: len(whole) // 2])
    (w / "full.parquet").unlink()
    pq.write_table(pa.table({"question": ["1+1="]}), w / "question.parquet")
    (w / "plain").mkdir()
    (w / "plain" / "notes.txt").write_text("not an artifact\n")
    (w / "afile").write_text("a file, not a directory\n")
    # outputs that cannot be written: a read-only tmpfs, and a full one (root only)
    (w / "ro").mkdir()
    (w / "full").mkdir()
    request.addfinalizer(lambda: [subprocess.run(["umount", "-l", str(w / m)], capture_output=True, check=False) for m in ("ro", "full")])
    mounted = _mount(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(w / "ro")])
    mounted = mounted and _mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(w / "full")])
    if mounted:
        fd = os.open(w / "full" / "fill", os.O_WRONLY | os.O_CREAT)
        try:  # to the last byte
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
    return SimpleNamespace(path=w, mounted=mounted)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: directories by name, files with their size, mtime and sha256."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            st = p.stat()
            out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _params():
    for name, c in CASES.items():
        marks = [pytest.mark.slow] if c.slow else []
        if c.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=c.xfail))
        yield pytest.param(name, marks=marks, id=name)


def test_corpus_size():
    assert len(CASES) >= 45, len(CASES)
    print(f"{len(CASES)} bad-input cases ({sum(bool(c.xfail) for c in CASES.values())} known failures)")


@pytest.mark.parametrize("name", list(_params()))
def test_bad_input_one_line_exit_2(work, tmp_path_factory, name):
    c, mounted, work = CASES[name], work.mounted, work.path
    if c.needs == "mounts" and not mounted:
        pytest.skip("needs root to mount a read-only and a full tmpfs as output directories")
    if c.needs == "no-vllm" and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    for rel, content in c.files.items():
        p = work / rel
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            content = content() if callable(content) else content
            p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    before = snapshot(work)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])),
           "TOKALIGN_CACHE": str(tmp_path_factory.getbasetemp() / "bad-input-cache")}
    try:
        proc = cli(*c.argv, cwd=work, check=False, env=env)
        where = f"tokalign {shlex.join(c.argv)} (in {work})\nexit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr}"
        assert proc.returncode == 2, where
        assert "Traceback" not in proc.stderr and proc.stdout == "", where
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), where
        assert c.expected in lines[0], f"expected {c.expected!r} in the line\n{where}"
        after = snapshot(work)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"the run left, changed or removed {changed}\n{where}"
    finally:  # what a failing (or known-failing) case wrote must not trip the next ones
        for rel in sorted(set(snapshot(work)) - set(before)):
            p = work / rel
            if p.parent == work or p.parent.relative_to(work).as_posix() in before:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def test_stdin_without_pipe_is_a_clear_error(work):
    proc = cli("rollout", cwd=work.path, check=False, stdin="")
    assert proc.returncode == 2 and "No prompts artifact on stdin" in proc.stderr
