"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1 (no mock objects).

The server answers each POST from a script of actions (status codes, delays, raw bodies), then
falls back to AxBench/SAEBench-style answers chosen by the prompt's content.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saelib.judges import JudgeConfig, MarkedWindow, RatingItem, Ratings, make_judge
from saelib.judges.openai import JudgeRequestError, MissingAPIKeyError, OpenAIJudge
from saelib.judges.prompts import parse_detection, parse_explanation, parse_rating

KEY = "sk-test-not-a-real-key-123"


def default_answer(messages: list[dict]) -> str:
    text = messages[-1]["content"]
    if "[Concept Start]" in text:
        return "The concept is clearly woven in.\n\nRating: [[2]]"
    if "[Instruction Start]" in text:
        return "Loosely related.\nRating: [[1]]"
    if "[Fragment Start]" in text:
        return "Very repetitive.\n\nRating: [[0]]."
    if "The description:" in text:
        return "2, 5 and 7"
    return "This neuron activates on words about cats and dogs."


class FakeOpenAIServer:
    """A chat-completions endpoint with a scriptable queue of actions."""

    def __init__(self) -> None:
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.answer_delay_s = 0.0
        #: optional ``plan(body, attempt) -> action | None``: an action chosen per request content
        #: and attempt number (1, 2, …), for load tests where a queue's order would be a race.
        self.plan = None
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append(body)
                    owner.auth.append(self.headers.get("Authorization"))
                    action = owner.script.pop(0) if owner.script else None
                    if action is None and owner.plan is not None:
                        key = json.dumps(body["messages"], sort_keys=True)
                        owner.attempts[key] = owner.attempts.get(key, 0) + 1
                        action = owner.plan(body, owner.attempts[key])
                    action = action or ("ok",)
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                self._counted = True
                try:
                    self._act(action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    self._done()

            def _done(self):
                # leave the in-flight count *before* the client can read the answer: otherwise its
                # next request may arrive while this thread has not yet counted itself out
                with owner.lock:
                    if self._counted:
                        owner.in_flight -= 1
                        self._counted = False

            def _send(self, code, payload: bytes, headers=()):
                self._done()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def _act(self, action, body):
                kind = action[0]
                if kind == "status":
                    self._send(action[1], b'{"error": {"message": "scripted failure"}}',
                               action[2] if len(action) > 2 else ())
                    return
                if kind == "raw":
                    self._send(200, action[1])
                    return
                if kind == "sleep":
                    time.sleep(action[1])
                text = action[1] if kind == "text" else default_answer(body["messages"])
                time.sleep(owner.answer_delay_s)
                payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}],
                           "usage": {"prompt_tokens": 100, "completion_tokens": 10,
                                     "total_tokens": 110}}
                self._send(200, json.dumps(payload).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeOpenAIServer()
    yield s
    s.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("SAELIB_TEST_JUDGE_KEY", KEY)
    return "SAELIB_TEST_JUDGE_KEY"


def judge_for(server, key, **kw) -> OpenAIJudge:
    cfg = dict(backend="openai", model="gpt-4o-mini", base_url=server.base_url, api_key_env=key,
               max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=2.0,
               max_concurrency=4)
    cfg.update(kw)
    judge = make_judge(JudgeConfig(**cfg))
    assert isinstance(judge, OpenAIJudge)
    return judge


ITEMS = [RatingItem("cats", "Write about pets.", "Cats cats cats cats."),
         RatingItem("rain", "Describe a city.", "The city is grey and wet.")]


def windows(n: int) -> list[MarkedWindow]:
    return [MarkedWindow((f" w{i}", " cat"), (0.0, float(i)), (False, i > 0)) for i in range(n)]


def test_normal_answers_tokens_and_cost(server, key):
    judge = judge_for(server, key)
    assert judge.rate(ITEMS) == [Ratings(2, 1, 0), Ratings(2, 1, 0)]
    assert judge.explain(windows(3)) == "words about cats and dogs"
    assert judge.detect("cats", windows(14)) == [1, 4, 6]
    assert len(server.requests) == 8
    assert all(a == f"Bearer {KEY}" for a in server.auth)
    assert {r["model"] for r in server.requests} == {"gpt-4o-mini"}
    assert "temperature" not in server.requests[0]
    u = judge.usage
    assert (u.requests, u.cache_hits, u.prompt_tokens, u.completion_tokens) == (8, 0, 800, 80)
    assert u.cost_usd == pytest.approx((800 * 0.15 + 80 * 0.60) / 1e6, rel=1e-12)
    assert u.extra["retries"] == 0 and u.extra["unparsable_ratings"] == 0


def test_many_latents_at_once(server, key):
    judge = judge_for(server, key, max_concurrency=3)
    assert judge.explain_many([windows(2)] * 5) == ["words about cats and dogs"] * 5
    assert judge.detect_many([("cats", windows(14)), ("dogs", windows(3))]) == [[1, 4, 6], [1]]
    assert len(server.requests) == 7


def test_429_then_success_honours_retry_after(server, key):
    server.script = [("status", 429, [("Retry-After", "0.2")]), ("text", "Rating: [[2]]")]
    judge = judge_for(server, key, max_concurrency=1, backoff_max_s=1.0)
    t0 = time.perf_counter()
    assert judge.rate(ITEMS[:1])[0].concept == 2
    assert time.perf_counter() - t0 >= 0.2
    assert len(server.requests) == 4
    assert judge.usage.extra["retries"] == 1 and judge.usage.requests == 3


def test_500_retried_then_gives_up_with_clear_error(server, key):
    server.script = [("status", 500), ("ok",)]
    judge = judge_for(server, key, max_concurrency=1)
    assert judge.explain(windows(2)) == "words about cats and dogs"
    assert len(server.requests) == 2
    server.script = [("status", 503)] * 10
    with pytest.raises(JudgeRequestError, match="after 3 attempts.*HTTP 503"):
        judge_for(server, key, max_retries=2).explain(windows(3))
    assert len(server.requests) == 2 + 3


def test_client_errors_are_not_retried(server, key):
    server.script = [("status", 401)]
    with pytest.raises(JudgeRequestError, match="HTTP 401") as err:
        judge_for(server, key).explain(windows(2))
    assert len(server.requests) == 1
    assert KEY not in str(err.value)


def test_timeout_then_success(server, key):
    server.script = [("sleep", 1.0)]
    judge = judge_for(server, key, timeout_s=0.3, max_concurrency=1)
    assert judge.explain(windows(2)) == "words about cats and dogs"
    assert judge.usage.extra["retries"] == 1
    assert len(server.requests) == 2


def test_malformed_json_retried_then_raises(server, key):
    server.script = [("raw", b"{not json"), ("raw", b'{"choices": []}'), ("ok",)]
    judge = judge_for(server, key, max_concurrency=1)
    assert judge.explain(windows(2)) == "words about cats and dogs"
    assert judge.usage.extra["retries"] == 2
    server.script = [("raw", b"<html>oops</html>")] * 5
    with pytest.raises(JudgeRequestError, match="malformed response body"):
        judge_for(server, key, max_retries=1).explain(windows(3))


@pytest.mark.parametrize("answer", [
    "I would say it is quite good.",          # no "Rating:"
    "Rating: [[3]]",                          # out of range
    "Rating: [[-1]]",                         # out of range
    "Rating: [[1.5]]",                        # not on the 0/1/2 scale
    "Rating: [[two]]",                        # not a number
    "Rating: [[2]] because of 7",             # extra text on the line
])
def test_garbage_rating_text_counts_zero(server, key, answer):
    server.script = [("text", answer)] * 3
    judge = judge_for(server, key, max_concurrency=1)
    assert judge.rate(ITEMS[:1]) == [Ratings(0, 0, 0)]
    assert judge.usage.extra["unparsable_ratings"] == 3


def test_garbage_detection_predicts_none_and_is_counted(server, key):
    server.script = [("text", "Examples two and five")]
    judge = judge_for(server, key)
    assert judge.detect("cats", windows(14)) == []
    assert judge.usage.extra["unparsable_detections"] == 1


def test_cache_hit_on_rerun_sends_no_request(server, key, tmp_path):
    judge = judge_for(server, key, cache_dir=str(tmp_path / "cache"))
    first = judge.rate(ITEMS)
    assert len(server.requests) == 6
    again = judge_for(server, key, cache_dir=str(tmp_path / "cache"))
    assert again.rate(ITEMS) == first
    assert len(server.requests) == 6
    assert (again.usage.requests, again.usage.cache_hits, again.usage.cost_usd) == (0, 6, 0.0)
    assert again.usage.extra["cached_cost_usd"] == pytest.approx(judge.usage.cost_usd)
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 6
    assert all(KEY not in f.read_text() for f in files)
    other_model = judge_for(server, key, cache_dir=str(tmp_path / "cache"), model="other-model")
    other_model.rate(ITEMS[:1])
    assert len(server.requests) == 9


def test_corrupt_cache_file_is_a_miss(server, key, tmp_path):
    judge = judge_for(server, key, cache_dir=str(tmp_path))
    judge.rate(ITEMS[:1])
    for f in tmp_path.rglob("*.json"):
        f.write_text('{"text": "Rating: [[2]]"')
    assert judge_for(server, key, cache_dir=str(tmp_path)).rate(ITEMS[:1]) == [Ratings(2, 1, 0)]
    assert len(server.requests) == 6


def test_missing_key_is_a_clear_error(server, monkeypatch):
    monkeypatch.delenv("SAELIB_ABSENT_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="SAELIB_ABSENT_KEY.*not set"):
        judge_for(server, "SAELIB_ABSENT_KEY")
    assert server.requests == []


def test_no_key_needed_for_local_servers(server):
    judge = judge_for(server, "")
    assert judge.rate(ITEMS[:1]) == [Ratings(2, 1, 0)]
    assert server.auth == [None] * 3


def test_concurrency_is_bounded(server, key):
    server.answer_delay_s = 0.1
    judge = judge_for(server, key, max_concurrency=2)
    judge.rate(ITEMS * 2)
    assert len(server.requests) == 12
    assert server.max_in_flight == 2


def test_parsers_follow_saebench_and_axbench():
    assert parse_explanation("This neuron activates on the word 'knows'.") == "the word 'knows'"
    assert parse_detection("1, 3 and 14.", 14) == [0, 2, 13]
    assert parse_detection("None", 14) == []
    assert parse_detection("2, 99", 14) == [1]
    assert parse_detection("2, maybe 3", 14) is None
    assert parse_rating("blah\nRating: [[1]]") == 1
    assert parse_rating('Rating: "2".') == 2
    assert parse_rating("Rating: **2**") == 2
    assert parse_rating("Rating: [[1]]\nRating: [[2]]") == 2
    assert parse_rating("Rating: 2.0") == 2


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match="offline, openai, local"):
        make_judge(JudgeConfig(backend="gpt"))
