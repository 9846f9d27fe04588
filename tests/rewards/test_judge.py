"""``judge``: an OpenAI-compatible chat endpoint as a reward.

The must-show is the round trip against a real server — vLLM's OpenAI server serving the bundled tiny
model (marked ``vllm``: it runs in the vLLM venv) —; a small in-process ``http.server`` covers parsing,
retries and errors fast.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from conftest import ROOT
from tokalign.errors import UserError
from tokalign.protocols import Sample
from tokalign.rewards.judge import Judge, fill

# ------------------------------------------------------------------------------- in-process server


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions with the text after 'ANSWER:' in the user message; 'STATUS n' makes
    it fail with HTTP n (the first k times for 'STATUS n xk', once for 'ONCE'), asking the client to
    retry after 10 ms (Retry-After-Ms: the openai client's retries stay fast)."""

    requests: ClassVar[list[dict]] = []
    gets: ClassVar[list[dict]] = []
    tries: ClassVar[dict[str, int]] = {}

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict):
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code >= 400:
                self.send_header("Retry-After-Ms", "10")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (the timeout test)
            pass

    def do_GET(self):
        FakeOpenAI.gets.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        user = body["messages"][-1]["content"]
        tries = FakeOpenAI.tries[user] = FakeOpenAI.tries.get(user, 0) + 1
        if "STATUS " in user:
            code = int(user.split("STATUS ")[1].split()[0])
            times = re.search(r"STATUS \d+ x(\d+)", user)
            fails = 1 if "ONCE" in user else int(times[1]) if times else math.inf
            if tries <= fails:
                return self._send(code, {"error": {"message": f"failing with {code}"}})
        if "SLOW" in user:
            time.sleep(1.0)
        answer = user.split("ANSWER:", 1)[1].strip() if "ANSWER:" in user else "no idea"
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]})


def n_sent(text: str) -> int:
    """How many requests the fake server got whose user message starts with ``text``."""
    return sum(r["messages"][-1]["content"].startswith(text) for r in FakeOpenAI.requests)


@pytest.fixture(scope="module")
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def judge(url, **opts) -> Judge:
    return Judge(Judge.Config(base_url=url, template="{prompt} | ref={reference} | ANSWER: {completion}", **opts))


def test_scores_are_parsed_and_normalised(fake_server):
    samples = [
        Sample("a", "q1", "Looks right. Score: 7"),
        Sample("b", [{"role": "user", "content": "q2"}], "score: 2\nOn reflection, Score: 10"),  # the last score counts
        Sample("c", "q3", "Score: 15"),  # out of range: clipped
        Sample("d", "q4", "I would say 3/10"),  # no "Score: N"
        Sample("e", "q5", "Score: 4.5", reference="42"),
    ]
    FakeOpenAI.requests.clear()
    got = judge(fake_server, concurrency=3)(samples)
    assert [r.value for r in got] == [0.7, 1.0, 1.0, 0.0, 0.45]
    assert [r.info["parsed"] for r in got] == [True, True, True, False, True]
    assert got[2].info["clipped"] is True and got[2].info["score"] == 15.0
    assert got[3].info["response"] == "I would say 3/10" and "no score" in got[3].info["detail"]
    sent = {r["messages"][-1]["content"] for r in FakeOpenAI.requests}
    assert "q5 | ref=42 | ANSWER: Score: 4.5" in sent and "q2 | ref= | ANSWER: score: 2\nOn reflection, Score: 10" in sent
    assert {r["model"] for r in FakeOpenAI.requests} == {"fake-judge"}  # discovered from /v1/models
    assert all(r["path"] == "/v1/chat/completions" and r["temperature"] == 0.0 for r in FakeOpenAI.requests)


def test_options_range_pattern_and_system(fake_server):
    FakeOpenAI.requests.clear()
    got = judge(fake_server + "/v1/", model="m", system="be strict", min_score=1, max_score=5,
                score_pattern=r"rating=(\d)", unparsed_value=-1.0)([Sample("a", "q", "rating=4"), Sample("b", "q", "Score: 4")])
    assert [r.value for r in got] == [0.75, -1.0]
    assert FakeOpenAI.requests[0]["messages"][0] == {"role": "system", "content": "be strict"}
    assert FakeOpenAI.requests[0]["model"] == "m"


def test_http_errors_retries_and_timeouts(fake_server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret-for-test")
    samples = [Sample("bad", "STATUS 400", "x"), Sample("flaky", "STATUS 503 ONCE", "Score: 5"),
               Sample("down", "STATUS 500", "Score: 5"), Sample("slow", "SLOW", "Score: 9")]
    FakeOpenAI.requests.clear()
    FakeOpenAI.gets.clear()
    got = judge(fake_server, retries=1, timeout=0.3, api_key_env="JUDGE_KEY")(samples)
    assert got[0].value == 0.0 and got[0].info["error"].startswith("HTTP 400") and got[0].info["parsed"] is False
    assert "failing with 400" in got[0].info["error"]  # the server's answer, as it came
    assert got[1].value == 0.5 and got[1].info["parsed"] is True  # retried after the 503
    assert got[2].info["error"].startswith("HTTP 500") and got[2].info["error"].endswith("(after 2 tries)")
    assert got[3].value == 0.0 and got[3].info == {"parsed": False, "error": "timed out after 0.3 s (after 2 tries)"}
    assert {r["auth"] for r in FakeOpenAI.requests + FakeOpenAI.gets} == {"Bearer secret-for-test"}  # /v1/models too
    assert n_sent("STATUS 400") == 1  # 4xx: no retry
    assert (n_sent("STATUS 503 ONCE"), n_sent("STATUS 500"), n_sent("SLOW")) == (2, 2, 2)


def test_retries_until_the_server_answers(fake_server):
    """429 and 5xx are retried (`retries` times, at the stub's Retry-After-Ms); backoff is accepted and
    left to the openai client."""
    samples = [Sample("limited", "STATUS 429 x2", "Score: 6"), Sample("crashed", "STATUS 500 x1", "Score: 8"),
               Sample("gone", "STATUS 502 x3", "Score: 1")]
    FakeOpenAI.requests.clear()
    t0 = time.monotonic()
    got = judge(fake_server, model="m", retries=2, backoff=30.0)(samples)
    assert time.monotonic() - t0 < 10  # not 30 s: the client's own backoff, here the server's 10 ms
    assert [r.value for r in got[:2]] == [0.6, 0.8] and got[0].info["parsed"] and got[1].info["parsed"]
    assert got[2].info["parsed"] is False and got[2].info["error"].startswith("HTTP 502")
    assert got[2].info["error"].endswith("(after 3 tries)")
    assert (n_sent("STATUS 429 x2"), n_sent("STATUS 500 x1"), n_sent("STATUS 502 x3")) == (3, 2, 3)
    FakeOpenAI.requests.clear()
    assert judge(fake_server, model="m", retries=0)([Sample("once", "STATUS 503 x1 again", "Score: 6")])[0].info["error"] \
        .startswith("HTTP 503")
    assert n_sent("STATUS 503") == 1  # retries=0: one try


def test_api_key(fake_server, monkeypatch):
    """The key in api_key_env goes as a Bearer token; with none set the client still needs one: "EMPTY"."""
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "not-this-one")
    for env, key in (("JUDGE_KEY", "EMPTY"), ("", "EMPTY"), ("OPENAI_API_KEY", "not-this-one")):
        FakeOpenAI.requests.clear()
        assert judge(fake_server, model="m", api_key_env=env)([Sample("a", "q", "Score: 1")])[0].value == 0.1
        assert [r["auth"] for r in FakeOpenAI.requests] == [f"Bearer {key}"]


def test_unreachable_server_and_bad_options(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = judge(f"http://127.0.0.1:{port}", model="m", retries=1)
    with pytest.raises(UserError, match=rf"judge: cannot reach http://127.0.0.1:{port}/v1: ConnectionRefusedError") as e:
        down([Sample("a", "q", "c")])
    assert "\n" not in str(e.value) and str(e.value).endswith("; start the server or fix --reward-opt judge.base_url.")
    with pytest.raises(UserError, match=rf"^judge: cannot reach http://127.0.0.1:{port}/v1: ConnectionRefusedError"):
        judge(f"http://127.0.0.1:{port}", retries=0)([Sample("a", "q", "c")])  # no model given: at /v1/models
    t0 = time.monotonic()
    with pytest.raises(UserError, match="cannot reach"):  # remembered: no second round of retries
        down([Sample("b", "q", "c")])
    assert time.monotonic() - t0 < 0.1
    with pytest.raises(UserError, match=r"^judge needs a server: --reward-opt judge.base_url=http://HOST:PORT/v1$"):
        Judge()
    with pytest.raises(UserError, match="is not an http"):
        Judge(Judge.Config(base_url="localhost:8000"))
    with pytest.raises(ValueError, match="needs a group"):
        Judge.Config(score_pattern=r"Score: \d+")
    with pytest.raises(ValueError, match="max_score must be greater than min_score"):
        Judge.Config(min_score=10, max_score=10)
    with pytest.raises(ValueError, match=r"template must contain \{completion\}"):
        Judge.Config(template="rate {prompt}")
    with pytest.raises(UserError, match="cannot read template_file"):
        Judge(Judge.Config(base_url="http://127.0.0.1:1", template_file=str(tmp_path / "missing.txt"))).template()
    assert Judge(Judge.Config(base_url="http://127.0.0.1:1"))([]) == []


def test_without_the_openai_package(monkeypatch):
    made = Judge(Judge.Config(base_url="http://127.0.0.1:1", model="m"))
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` fails as if it were not installed
    with pytest.raises(UserError, match=r"^the judge reward needs the openai package: pip install openai$"):
        Judge(Judge.Config(base_url="http://127.0.0.1:1"))
    with pytest.raises(UserError, match=r"^the judge reward needs the openai package: pip install openai$"):
        made([Sample("a", "q", "c")])


def test_fill_is_one_pass():
    s = Sample("a", "say {completion}", "I said {prompt} and {other}", reference=["1", "2"])
    assert fill("P={prompt} C={completion} R={reference} {x}", s) == 'P=say {completion} C=I said {prompt} and {other} R=["1", "2"] {x}'


# ------------------------------------------------------------------------------- real vLLM server

BUNDLED = ROOT / "tokalign" / "assets" / "tiny-arith"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(BUNDLED), "--served-model-name", "tiny-judge",
           "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
           "--seed", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the vLLM server did not start in 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def greedy_hf(messages: list[dict], max_new_tokens: int) -> str:
    """The bundled model's greedy answer with transformers (what the vLLM judge must answer too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.vllm
def test_judge_against_a_real_vllm_server(vllm_server):
    """The tiny arithmetic model is no judge: asked "12+30=" it answers digits. With a pattern that reads
    those digits the round trip parses a score (the same answer as transformers' greedy decode); with the
    default "Score: N" pattern its answer is recorded as unparseable; a prompt longer than the model's
    context is a recorded HTTP 400. Nothing crashes."""
    samples = [Sample("a", "12+30", "="), Sample("b", "7+8", "=")]
    digits = Judge(Judge.Config(base_url=vllm_server, template="{prompt}{completion}", score_pattern=r"(\d+)",
                                max_score=1000, max_tokens=6, concurrency=2))(samples)
    for s, r in zip(samples, digits):
        expected = greedy_hf([{"role": "user", "content": s.prompt + s.completion}], 6)
        assert r.info["response"] == expected
        numbers = re.findall(r"\d+", expected)
        if numbers:
            assert r.info["parsed"] is True and r.value == pytest.approx(min(1.0, int(numbers[-1]) / 1000))
        else:
            assert r.info["parsed"] is False and r.value == 0.0

    assert all(r.info["parsed"] for r in digits)  # the bundled model answers both with digits

    default = Judge(Judge.Config(base_url=vllm_server, max_tokens=8))
    assert default.model() == "tiny-judge"  # from /v1/models
    long_prompt = Sample("long", "please " * 400, "the answer")
    short = Sample("short", "1+1", "=", reference="2")
    got = Judge(Judge.Config(base_url=vllm_server, template="{prompt}{completion}", max_tokens=8))([short, long_prompt])
    assert got[0].info["parsed"] is False and got[0].value == 0.0 and isinstance(got[0].info["response"], str)
    assert got[1].info["parsed"] is False and got[1].info["error"].startswith("HTTP 400")
