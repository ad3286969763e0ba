"""The OpenAI-compatible judge: the paper's setting (gpt-4o-mini), or any server speaking the API.

Why these pieces (protocol §3–4; the paper reports ≈ $5 of judge fees per SAE):

* Any ``base_url`` and model name, so vLLM, llama.cpp's server or another provider work too.
* The API key is read from the environment variable *named* in the config, at each request, and
  is never kept in an attribute, a parameter, a cache file, a log or an error message.
* Transient failures (HTTP 429 and 5xx, timeouts, dropped connections, a body that is not the
  expected JSON) are retried with exponential back-off and jitter (``Retry-After`` honoured on
  429); other HTTP errors (400, 401, 404) are raised at once, as retrying cannot fix them.
* Requests run concurrently, at most ``max_concurrency`` at a time.
* An on-disk cache keyed by sha256 of (model, messages, sampling parameters): a rerun of a stage
  sends no request it has sent before, so it costs nothing.
* Prompt/completion token counts and the estimated cost go to ``self.usage`` (``JudgeUsage``),
  which the stage writes into each SAE's result; answers served from the cache add to
  ``cache_hits`` and ``usage.extra['cached_cost_usd']`` but not to ``cost_usd``.

Only the standard library is used (``urllib.request``, ``concurrent.futures``).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from saelib.judges.cache import ResponseCache
from saelib.judges.config import JudgeConfig
from saelib.judges.prompts import Completion, Messages, PromptedJudge


class MissingAPIKeyError(RuntimeError):
    """The environment variable that should hold the API key is unset or empty."""


class JudgeRequestError(RuntimeError):
    """The server refused a request, or kept failing after every retry."""


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIJudge(PromptedJudge):
    """SAEBench/AxBench prompts sent to an OpenAI-compatible ``/chat/completions`` endpoint."""

    name = "openai"

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__(config.max_tokens_explanation, config.max_tokens_detection,
                         config.max_tokens_rating)
        self.config = config.validate()
        self._api_key()
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self._rng = random.Random(0)
        self.usage.extra.update(model=config.model, base_url=config.base_url, retries=0,
                                cached_cost_usd=0.0, price_in_per_1m=config.price_in_per_1m,
                                price_out_per_1m=config.price_out_per_1m)

    def _api_key(self) -> str | None:
        """Read the key from the environment now; never stored. None if no key is configured."""
        name = self.config.api_key_env
        if not name:
            return None
        key = os.environ.get(name, "")
        if not key:
            raise MissingAPIKeyError(
                f"the openai judge reads its API key from the environment variable {name}, which "
                f"is not set. Export it in the shell that runs the stage (never put the key in a "
                f"profile, notebook or result), or set judge.api_key_env='' for a server that "
                f"needs no key.")
        return key

    def complete(self, requests: Sequence[tuple[Messages, int]]) -> list[Completion]:
        if not requests:
            return []
        workers = min(self.config.max_concurrency, len(requests))
        if workers == 1:
            return [self._complete_one(m, n) for m, n in requests]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda r: self._complete_one(*r), requests))

    def _params(self, max_tokens: int) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": max_tokens}
        if self.config.temperature is not None:
            params["temperature"] = self.config.temperature
        return params

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.config.price_in_per_1m
                + completion_tokens * self.config.price_out_per_1m) / 1e6

    def _complete_one(self, messages: Messages, max_tokens: int) -> Completion:
        params = self._params(max_tokens)
        key = ResponseCache.key(self.config.model, messages, params)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            pt, ct = int(hit.get("prompt_tokens", 0)), int(hit.get("completion_tokens", 0))
            with self._usage_lock:
                self.usage.cache_hits += 1
                self.usage.extra["cached_cost_usd"] += self._cost(pt, ct)
            return Completion(hit["text"], pt, ct)
        text, pt, ct = self._request({"model": self.config.model, "messages": messages, **params})
        with self._usage_lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += pt
            self.usage.completion_tokens += ct
            self.usage.cost_usd += self._cost(pt, ct)
        if self.cache is not None:
            self.cache.put(key, {"model": self.config.model, "messages": messages, "params": params,
                                 "text": text, "prompt_tokens": pt, "completion_tokens": ct})
        return Completion(text, pt, ct)

    def _request(self, body: dict[str, Any]) -> tuple[str, int, int]:
        """POST with retries; returns (answer text, prompt tokens, completion tokens)."""
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.config.max_retries + 1):
            try:
                return self._post_once(data)
            except _Transient as e:
                last = str(e)
                if attempt == self.config.max_retries:
                    break
                delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** attempt)
                delay *= 0.5 + 0.5 * self._rng.random()
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, self.config.backoff_max_s))
                self._count("retries")
                time.sleep(delay)
        raise JudgeRequestError(f"{self.url}: no usable answer after "
                                f"{self.config.max_retries + 1} attempts; last error: {last}")

    def _post_once(self, data: bytes) -> tuple[str, int, int]:
        headers = {"Content-Type": "application/json"}
        key = self._api_key()
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code == 429 or e.code >= 500:
                raise _Transient(f"HTTP {e.code}: {detail}", _retry_after(e.headers)) from e
            raise JudgeRequestError(f"{self.url} answered HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                http.client.HTTPException) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from e
        try:
            payload = json.loads(raw)
            text = payload["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}, not a string")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
            raise _Transient(f"malformed response body ({type(e).__name__}: {e}): "
                             f"{raw[:200]!r}") from e
        usage = payload.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        if not usage:
            self._count("responses_without_usage")
        return text, pt, ct


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
