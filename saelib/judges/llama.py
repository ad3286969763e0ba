"""The llama.cpp judge: the OpenAI judge's prompts and parsing, answered on this machine's CPU by a
quantised chat model (by default the packaged Qwen2.5-Coder-1.5B-Instruct, Q4_K_M).

Why llama.cpp (through ``llama-cpp-python``) and not :class:`saelib.judges.local.LocalLMJudge`:
the paper's judge is gpt-4o-mini (protocol §3–4); the largest chat model this machine has is a
1.5B GGUF, which ``transformers`` would dequantise to float32 (6 GB, several times slower per token
on two cores) while llama.cpp runs the 4-bit weights directly. We do not rewrite its inference.

Greedy decoding (temperature 0) makes a rerun give the same answer; the on-disk cache
(:class:`~saelib.judges.cache.ResponseCache`) makes it free. llama.cpp keeps the keys and values of
the previous prompt and re-evaluates only from the first token that differs; so ``complete``
answers the requests in sorted order, where consecutive prompts of one template share everything
up to the concept, instruction or fragment (``llama_prefix_cache``; the answers come back in the
caller's order). With it off, the context is cleared before every prompt: ``bench/judge.py``
measures the two side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from saelib.judges.cache import ResponseCache
from saelib.judges.config import JudgeConfig
from saelib.judges.prompts import Completion, Messages, PromptedJudge


def model_path(config: JudgeConfig) -> Path:
    """The GGUF file the config names: the packaged judge, or an existing path."""
    if config.llama_model == "packaged":
        from saelib.models import judge_gguf  # lazily: assembles the model on first use

        return judge_gguf()
    path = Path(config.llama_model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"judge.llama_model={config.llama_model!r} is neither 'packaged' "
                                f"nor an existing GGUF file")
    return path


def build_info() -> str:
    """The instruction sets this llama.cpp build uses (``AVX512 = 1 | ...``): the Makefile builds
    it for the machine's CPU, and the judge's speed depends on it, so records carry it."""
    try:
        import llama_cpp
    except ImportError:
        return ""
    info = llama_cpp.llama_print_system_info()
    return (info.decode() if isinstance(info, bytes) else str(info)).strip(" |")


def load_llama(path: Path, threads: int, ctx: int) -> Any:
    """A ``llama_cpp.Llama`` on the CPU; a missing ``llama-cpp-python`` is a clear error."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ImportError("the llama judge needs llama-cpp-python; `make venv` installs it "
                          "(from a cached wheel after the first build)") from e
    return Llama(model_path=str(path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                 n_gpu_layers=0, seed=0, verbose=False)


class LlamaCppJudge(PromptedJudge):
    """SAEBench/AxBench prompts answered by llama.cpp; pass ``llm`` to reuse a loaded model."""

    name = "llama"

    def __init__(self, config: JudgeConfig, llm: Any = None) -> None:
        super().__init__(config.max_tokens_explanation, config.max_tokens_detection,
                         config.max_tokens_rating)
        self.config = config.validate()
        path = None if llm is not None else model_path(config)
        self.model_name = path.name if path is not None else str(config.llama_model)
        self.llm = llm if llm is not None else load_llama(path, config.llama_threads,
                                                          config.llama_ctx)
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self.usage.extra.update(model=self.model_name, threads=config.llama_threads,
                                prefix_cache=config.llama_prefix_cache, seconds=0.0,
                                cached_seconds=0.0, build=build_info())

    def close(self) -> None:
        """Free the model now (llama-cpp-python's own finaliser fails at interpreter exit)."""
        if self.llm is not None and hasattr(self.llm, "close"):
            self.llm.close()
        self.llm = None

    def complete(self, requests: Sequence[tuple[Messages, int]]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(requests)
        order = range(len(requests))
        if self.config.llama_prefix_cache:
            order = sorted(order, key=lambda i: json.dumps(requests[i][0], ensure_ascii=False))
        for i in order:
            out[i] = self._complete_one(*requests[i])
        return out  # type: ignore[return-value]

    def _complete_one(self, messages: Messages, max_tokens: int) -> Completion:
        params = {"max_tokens": max_tokens, "temperature": 0.0}
        key = ResponseCache.key(self.model_name, messages, params)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            with self._usage_lock:
                self.usage.cache_hits += 1
                self.usage.extra["cached_seconds"] += float(hit.get("seconds", 0.0))
            return Completion(hit["text"], int(hit.get("prompt_tokens", 0)),
                              int(hit.get("completion_tokens", 0)))
        if not self.config.llama_prefix_cache:
            self.llm.reset()
        t0 = time.perf_counter()
        answer = self.llm.create_chat_completion(messages=messages, **params)
        seconds = time.perf_counter() - t0
        text = answer["choices"][0]["message"]["content"] or ""
        usage = answer.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        with self._usage_lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += pt
            self.usage.completion_tokens += ct
            self.usage.extra["seconds"] += seconds
        if self.cache is not None:
            self.cache.put(key, {"model": self.model_name, "messages": messages, "params": params,
                                 "text": text, "prompt_tokens": pt, "completion_tokens": ct,
                                 "seconds": seconds})
        return Completion(text, pt, ct)
