"""Judges for AutoInterp (protocol §3) and AxBench steering (protocol §4), behind one interface.

Back-ends: ``offline`` (rules, default), ``openai`` (any OpenAI-compatible server), ``local``
(a Hugging Face chat model), ``llama`` (a GGUF chat model through llama.cpp, by default the
packaged Qwen2.5-Coder-1.5B); build one with :func:`make_judge` from a :class:`JudgeConfig`.
The back-end modules are imported lazily by :func:`make_judge` (the local one needs torch).
"""

from saelib.judges.agreement import AgreementReport, KindAgreement, judge_agreement
from saelib.judges.base import Judge, JudgeUsage, MarkedWindow, RatingItem, Ratings
from saelib.judges.config import BACKENDS, JudgeConfig
from saelib.judges.factory import make_judge

__all__ = [
    "AgreementReport", "BACKENDS", "Judge", "JudgeConfig", "JudgeUsage", "KindAgreement",
    "MarkedWindow", "RatingItem", "Ratings", "judge_agreement", "make_judge",
]
