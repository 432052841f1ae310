import json
import logging
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fifa_hf.scoring import EndpointQualityScorer, HeuristicQualityScorer, ScoreCache, TransformersQualityScorer
from fifa_hf.scoring.quality import parse_score

PROMPTS = ["a red cube on a table", "asdf asdf", "a watercolor of a lighthouse at dusk", "!!!", "a cat"]


def test_llm_scores_are_in_unit_interval_and_independent_of_batch_size(tiny_llm_path):
    scorer = TransformersQualityScorer(str(tiny_llm_path), device="cpu", batch_size=1)
    one_by_one = scorer(PROMPTS).scores
    scorer.batch_size = 5
    batched = scorer(PROMPTS).scores
    for prompt in PROMPTS:
        assert 0.0 <= one_by_one[prompt] <= 1.0
        assert batched[prompt] == pytest.approx(one_by_one[prompt], abs=1e-5)
    assert len(set(round(v, 6) for v in batched.values())) > 1  # continuous, prompt-dependent


def test_each_unique_prompt_is_scored_once_and_cached(tiny_llm_path, tmp_path):
    cache = ScoreCache(tmp_path / "quality.sqlite")
    scorer = TransformersQualityScorer(str(tiny_llm_path), device="cpu")
    first = scorer(PROMPTS * 3, cache=cache)
    assert first.num_scored == len(PROMPTS) and first.num_cached == 0 and len(cache) == len(PROMPTS)
    second = scorer(PROMPTS + ["a new prompt"], cache=cache)
    assert second.num_cached == len(PROMPTS) and second.num_scored == 1
    assert second.scores["a cat"] == pytest.approx(first.scores["a cat"])
    other_rubric = TransformersQualityScorer(str(tiny_llm_path), rubric="Rate: {prompt}", device="cpu")
    assert other_rubric(PROMPTS, cache=cache).num_cached == 0  # the cache is keyed by scorer identity


def test_heuristic_fallback_ranks_junk_and_blocked_prompts_low():
    scores = HeuristicQualityScorer()(PROMPTS + ["a nude woman, nsfw"]).scores
    assert scores["a watercolor of a lighthouse at dusk"] > 0.9
    assert scores["asdf asdf"] < 0.5 and scores["!!!"] == 0.0 and scores["a nude woman, nsfw"] == 0.0


def test_parse_score():
    assert parse_score("7") == pytest.approx(7 / 9)
    assert parse_score("Score: 9/9") == 1.0
    assert parse_score("I'd say 4.5.") == pytest.approx(0.5)
    assert parse_score("10 out of 10") is None and parse_score("no idea") is None


class FaultyChatServer:
    """A real OpenAI-compatible chat endpoint on loopback that injects faults by prompt content."""

    def __init__(self):
        self.requests: Counter[str] = Counter()
        self.authorization: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"].rsplit("Prompt: ", 1)[-1]
                server.requests[prompt] += 1
                server.authorization.add(self.headers.get("Authorization", ""))
                if "flaky" in prompt and server.requests[prompt] <= 2:
                    return self._reply(500, {"error": "boom"})
                if "slow" in prompt:
                    time.sleep(0.6)
                answer = "hmm, hard to say" if "garbage" in prompt else "7"
                self._reply(200, {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body.get("model") or "m",
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })  # fmt: skip

            def _reply(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def chat_server():
    server = FaultyChatServer()
    yield server
    server.close()


def test_endpoint_retries_faults_and_never_makes_up_a_score(chat_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MY_LLM_KEY", "secret-key-123")
    scorer = EndpointQualityScorer(
        chat_server.url,
        model="judge",
        api_key_env="MY_LLM_KEY",
        timeout=0.3,
        max_retries=2,
        backoff=0.01,
        concurrency=4,
    )
    cache = ScoreCache(tmp_path / "cache.sqlite")
    prompts = ["a good prompt", "a flaky prompt", "a slow prompt", "a garbage prompt", "a good prompt"]
    with caplog.at_level(logging.DEBUG):
        result = scorer(prompts, cache=cache)

    assert result.scores["a good prompt"] == pytest.approx(7 / 9), result.errors
    assert result.scores["a flaky prompt"] == pytest.approx(7 / 9)  # two HTTP 500s, then success
    assert chat_server.requests["a flaky prompt"] == 3 and chat_server.requests["a good prompt"] == 1
    assert math.isnan(result.scores["a slow prompt"]) and "failed after 3 attempts" in result.errors["a slow prompt"]
    assert math.isnan(result.scores["a garbage prompt"]) and "unparseable" in result.errors["a garbage prompt"]
    assert chat_server.requests["a garbage prompt"] == 3
    assert chat_server.authorization == {"Bearer secret-key-123"}
    assert "secret-key-123" not in caplog.text and "secret-key-123" not in repr(scorer)
    assert "secret-key-123" not in (tmp_path / "cache.sqlite").read_bytes().decode("latin-1")

    before = chat_server.requests.copy()
    again = scorer(prompts, cache=cache)
    assert again.num_cached == 2
    assert chat_server.requests["a good prompt"] == before["a good prompt"]
    assert chat_server.requests["a flaky prompt"] == before["a flaky prompt"]
    assert chat_server.requests["a garbage prompt"] > before["a garbage prompt"]  # failures are asked again
