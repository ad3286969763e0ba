"""The one place that turns a :class:`~saelib.judges.config.JudgeConfig` into a :class:`Judge`.

Why: the profile picks the back-end (protocol §3–4: the paper used gpt-4o-mini; here there is no
API, so the offline rules are the default), and every stage builds its judge through
:func:`make_judge`, so swapping back-ends is a one-line profile change.
"""

from __future__ import annotations

from typing import Callable, Mapping

from saelib.judges.base import Judge
from saelib.judges.config import BACKENDS, PACKAGED_EMBEDDING, JudgeConfig

__all__ = ["BACKENDS", "PACKAGED_EMBEDDING", "JudgeConfig", "make_judge"]


def make_judge(config: JudgeConfig | None = None, *,
               loglik_fn: Callable[[list[str]], list[float]] | None = None,
               token_freq: Mapping[str, float] | None = None) -> Judge:
    """Build the configured judge.

    ``loglik_fn`` (texts → mean per-token log-prob under the unsteered model) and ``token_freq``
    (decoded token → corpus frequency) are used by the offline judge only; the LLM back-ends
    ignore them. Back-ends are imported here, lazily, so that choosing 'openai' never imports
    torch and choosing 'offline' never needs a network.
    """
    config = (config or JudgeConfig()).validate()
    if config.backend == "offline":
        from saelib.judges.offline import OfflineJudge  # lazily: see the docstring
        return OfflineJudge(config, loglik_fn=loglik_fn, token_freq=token_freq)
    if config.backend == "openai":
        from saelib.judges.openai import OpenAIJudge  # lazily: never imports torch
        return OpenAIJudge(config)
    if config.backend == "llama":
        from saelib.judges.llama import LlamaCppJudge  # lazily: see the docstring
        return LlamaCppJudge(config)
    from saelib.judges.local import LocalLMJudge  # lazily: see the docstring
    return LocalLMJudge(config)
