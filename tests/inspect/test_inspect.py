"""`tokalign inspect`: per-token channels by hand, the terminal view, the user errors, and the HTML
page rendered by headless Chromium (screenshots kept under tests/artifacts/)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, cli
from tokalign.inspect.tokens import TokenSample, advantages, inspect

SHOTS = ROOT / "tests" / "artifacts"


def sample(id_, group, reward, n, token_rewards=None) -> TokenSample:
    return TokenSample(id=id_, group_id=group, sample_idx=0, prompt="", completion="", finish_reason="stop",
                       reward=reward, rewards={}, verdicts={}, token_ids=list(range(n)),
                       values={"token_rewards": token_rewards})


def test_advantage_is_grpo_broadcast_without_token_rewards():
    """Group rewards [1, 0, 0]: mean 1/3, unbiased std √(((2/3)² + 2·(1/3)²)/2) = √(1/3) = 0.57735;
    A = (2/3)/0.57735 = 1.15470 and −(1/3)/0.57735 = −0.57735 on every token. A group of one: 0."""
    s = [sample("a", 0, 1.0, 3), sample("b", 0, 0.0, 2), sample("c", 0, 0.0, 1), sample("d", 1, 1.0, 2)]
    advantages(s)
    assert s[0].values["advantage"] == pytest.approx([1.1547005] * 3, abs=1e-5)
    assert s[1].values["advantage"] == pytest.approx([-0.5773503] * 2, abs=1e-5)
    assert s[2].values["advantage"] == pytest.approx([-0.5773503], abs=1e-5)
    assert s[3].values["advantage"] == [0.0, 0.0]


def test_advantage_per_token_from_reward_to_go():
    """R = 1 with token rewards [0.5, 0, −0.5]: r = [0.5, 0, 0.5] (R on the last token), G = [1.0, 0.5, 0.5];
    R = 0 with [0, 0]: G = [0, 0]. G_0 over the group: mean 0.5, std √(2·0.25/1) = 0.70711;
    A = [0.70711, 0, 0] and [−0.70711, −0.70711]."""
    s = [sample("a", 0, 1.0, 3, [0.5, 0.0, -0.5]), sample("b", 0, 0.0, 2, [0.0, 0.0])]
    advantages(s)
    assert s[0].values["advantage"] == pytest.approx([0.7071068, 0.0, 0.0], abs=1e-5)
    assert s[1].values["advantage"] == pytest.approx([-0.7071068, -0.7071068], abs=1e-5)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Prompts, rollouts and scored rollouts of the bundled model on 6 arith prompts (a mix of pass and fail)."""
    w = tmp_path_factory.mktemp("inspect")
    cli("prepare", "arith", "--split", "test", "--limit", "6", "--out", "P", cwd=w)
    cli("rollout", "P", "--n", "4", "--max-new-tokens", "8", "--out", "R", cwd=w)
    cli("score", "R", "--reward", "exact_match", "--out", "S", cwd=w)
    return w


def first_id(work: Path) -> str:
    from tokalign import artifacts

    return artifacts.read(work / "S", ["scored"]).rows()[0]["id"]  # e.g. arith-test-62+44#0


@pytest.mark.slow
def test_terminal_view_shows_headers_tokens_and_legend(work):
    prompt_id = first_id(work).split("#")[0]
    out = cli("inspect", "S", "--limit", "2", cwd=work).stdout
    assert "advantage (group-relative)" in out  # the default channel for scored samples, with its legend
    assert out.count("arith-test-") == 2 and "exact_match: " in out and "reward " in out
    assert "<|im_end|>" in out  # tokens decoded one by one, specials kept
    one = cli("inspect", "S", "--id", f"{prompt_id}#1", "--color", "logprob", cwd=work).stdout
    assert "sampler log-prob" in one and one.count("arith-test-") == 1 and f"{prompt_id}#1" in one
    group = cli("inspect", "S", "--id", prompt_id, cwd=work).stdout  # a prompt id: its whole group
    assert group.count(f"{prompt_id}#") == 4


@pytest.mark.slow
def test_gap_is_float_noise_for_hf_rollouts_at_temperature_one(work):
    """The HF sampler's log-probs at T = 1 are the trainer's (same float32 model): the gap channel is ~0."""
    res = inspect(str(work / "R"), limit=8)
    gaps = [abs(v) for s in res.samples for v in s.values["gap"]]
    assert len(gaps) > 8 and max(gaps) < 1e-4
    assert all(v >= 0 for s in res.samples for v in s.values["entropy"])
    assert not res.channels["reward"].available and "tokalign score" in res.channels["reward"].note


@pytest.mark.slow
def test_user_errors_exit_2_with_the_fix(work, tiny_model, tmp_path):
    bad = cli("inspect", "R", "--color", "reward", cwd=work, check=False)
    assert bad.returncode == 2 and "tokalign score" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("inspect", "S", "--color", "entrpy", cwd=work, check=False)
    assert bad.returncode == 2 and "Did you mean 'entropy'" in bad.stderr
    bad = cli("inspect", "S", "--id", "nope", cwd=work, check=False)
    assert bad.returncode == 2 and "No sample with id 'nope'" in bad.stderr
    bad = cli("inspect", "P", cwd=work, check=False)
    assert bad.returncode == 2 and "'prompts' artifact" in bad.stderr
    # The model recorded in the manifest is gone: say so, and --model takes over.
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    cli("rollout", str(work / "P"), "--model", str(model), "--n", "2", "--max-new-tokens", "4", "--out", "R2", cwd=tmp_path)
    shutil.rmtree(model)
    bad = cli("inspect", "R2", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "pass --model" in bad.stderr
    shutil.copytree(tiny_model, model)
    assert "sampler log-prob" in cli("inspect", "R2", "--model", str(model), "--limit", "1", cwd=tmp_path).stdout


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        if os.environ.get("TOKALIGN_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (TOKALIGN_REQUIRE_CHROMIUM is set) but not installed: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium); the HTML page cannot be rendered")
    return path


def screenshot(page: Path, png: Path, fragment: str = "") -> Path:
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", f"--screenshot={png}", "--window-size=1200,900",
             page.resolve().as_uri() + fragment],
            capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return png


def hues(png: Path, top: int = 140) -> tuple[int, dict[int, int]]:
    """(coloured fill pixels, {30°-wide hue bucket: pixels}) below the page's header (whose legend bar
    is coloured whatever the tokens are). Coloured = saturation and value ≥ 25% (white, greys and black
    text do not count); fill = still coloured after a 3×3 erosion, so the red/green strokes of the
    PASS/FAIL text drop out and token backgrounds remain."""
    from PIL import Image, ImageChops, ImageFilter

    img = Image.open(png).convert("RGB")
    h, s, v = img.crop((0, top, img.width, img.height)).convert("HSV").split()
    mask = ImageChops.multiply(s.point(lambda x: 255 if x >= 64 else 0), v.point(lambda x: 255 if x >= 64 else 0))
    fill = mask.filter(ImageFilter.MinFilter(3))
    buckets: dict[int, int] = {}
    for hue, on in zip(h.tobytes(), fill.tobytes()):  # one byte per pixel in mode L
        if on:
            b = (hue * 360 // 256) // 30
            buckets[b] = buckets.get(b, 0) + 1
    return sum(buckets.values()), buckets


@pytest.mark.slow
def test_html_page_renders_coloured_tokens_in_chromium(work):
    page = work / "inspect.html"
    proc = cli("inspect", "S", "--html", str(page), cwd=work)
    assert proc.stdout.strip() == str(page)
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", text)  # no network assets
    assert text.count('class="tok"') >= 24 and first_id(work) in text
    SHOTS.mkdir(parents=True, exist_ok=True)
    # The default view (advantage: failed samples red, passed green) and two channels the script switches
    # to from the address: entropy (purple, hue buckets 8-9), sampler log-prob (unlikely tokens red/orange).
    views = {"advantage": ("", {0, 4}), "entropy": ("#entropy", {8, 9}), "logprob": ("#logprob", {0, 1, 11})}
    for view, (fragment, palette) in views.items():
        png = screenshot(page, SHOTS / f"inspect-{view}.png", fragment)
        coloured, buckets = hues(png)
        print(f"screenshot {png}: {coloured} coloured fill pixels by 30° hue bucket {dict(sorted(buckets.items()))}")
        outside = sum(n for b, n in buckets.items() if b not in palette)
        assert coloured >= 500 and outside < 0.02 * coloured, f"{view}: {buckets} in {png}"
        if view == "advantage":  # both ends of the scale are on screen: red and green tokens
            assert buckets.get(0, 0) >= 500 and buckets.get(4, 0) >= 500, f"{buckets} in {png}"


@pytest.mark.slow
def test_reward_channel_uses_token_rewards_when_scored_with_them(work, tiny_model):
    """Re-scored with a token-level reward (implicit: β·(log π − log π_ref) per token), the reward channel is
    the per-token values and the advantage varies along a completion (reward-to-go)."""
    from tokalign import artifacts
    from tokalign.models import BUNDLED_MODEL

    cli("score", "R", "--reward", "exact_match", "--reward", "implicit", "--reward-opt", f"implicit.model={tiny_model}",
        "--reward-opt", f"implicit.ref={BUNDLED_MODEL}", "--out", "ST", cwd=work)
    rows = artifacts.read(work / "ST", ["scored"]).rows()
    res = inspect(str(work / "ST"), limit=4, forward=False)
    assert res.channels["reward"].note == "per-token rewards" and not res.channels["gap"].available
    for s, row in zip(res.samples, rows):
        assert s.values["reward"] == pytest.approx(row["token_rewards"])
    assert any(len(set(s.values["advantage"])) > 1 for s in res.samples)
    out = cli("inspect", "ST", "--limit", "1", "--color", "reward", cwd=work).stdout
    assert "token reward" in out and "(per-token" in out


_ALWAYS_ENV = '''
from tokalign.environments.base import Environment, Reply
from tokalign.environments.builtin import Calculator, calculator


class AlwaysCalculates(Environment):
    """Answers every model turn with a calculator result (the bundled model writes no tool calls of its own on arith prompts)."""

    def tools(self):
        return Calculator().tools()

    def step(self, state, text):
        return Reply([{"role": "tool", "name": "calculator", "content": calculator("1234*5678")}])
'''


@pytest.mark.slow
def test_environment_tokens_are_drawn_apart(tmp_path):
    """A multi-turn rollout (environment from a module:attr path): environment tokens have no channel values, the
    terminal view styles them apart and the HTML page draws them hatched grey (checked on Chromium's screenshot)."""
    (tmp_path / "always_env.py").write_text(_ALWAYS_ENV)
    env = {"PYTHONPATH": str(tmp_path)}
    cli("prepare", "tool_arith", "--split", "test", "--limit", "2", "--out", "P", cwd=tmp_path, env=env)
    cli("rollout", "P", "--n", "2", "--max-new-tokens", "12", "--env", "always_env:AlwaysCalculates", "--max-turns", "3",
        "--out", "R", cwd=tmp_path, env=env)
    cli("score", "R", "--reward", "exact_match", "--out", "S", cwd=tmp_path, env=env)
    result = inspect(str(tmp_path / "S"))
    env_tokens = [(s, t) for s in result.samples for t in range(len(s.token_ids)) if s.is_env(t)]
    assert env_tokens and any(s.tokens[t] == "<|im_start|>" for s, t in env_tokens)
    for s, t in env_tokens:
        assert all((s.values.get(ch) or [None] * (t + 1))[t] is None for ch in ("reward", "advantage", "logprob", "gap", "entropy"))
    model_tokens = [(s, t) for s in result.samples for t in range(len(s.token_ids)) if not s.is_env(t)]
    assert all(s.values["logprob"][t] is not None for s, t in model_tokens)
    page = tmp_path / "inspect.html"
    cli("inspect", "S", "--html", str(page), cwd=tmp_path, env=env)
    text = page.read_text()
    assert text.count('class="tok env"') == len(env_tokens) + 1 and "environment tokens" in text  # + the legend's sample
    SHOTS.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    img = Image.open(screenshot(page, SHOTS / "inspect-episode.png", "#logprob")).convert("RGB")
    hatch = sum(1 for px in img.getdata() if px in ((220, 220, 220), (242, 242, 242)))
    print(f"episode screenshot: {hatch} hatched-grey pixels")
    assert hatch >= 500, "environment tokens are not drawn hatched grey"
