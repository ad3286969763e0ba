"""How far two judges agree on the same items (e.g. the offline rules against gpt-4o-mini).

Why: the offline judge replaces the paper's LLM judge (protocol §4); whenever both can run on the
same generations, the book should say how often they give the same rating and whether they order
the generations alike. Per rating kind we report the exact-match rate and Kendall's τ_b
(``scipy.stats.kendalltau``, variant b, which corrects for the many ties of a 0–2 scale; the same
statistic the paper uses across SAEs, protocol §5). τ_b is NaN when either judge gives one
constant rating, as it is undefined then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from saelib.judges.base import Ratings
from saelib.judges.prompts import RATING_KINDS
from saelib.stats import kendall_tau_b_p


@dataclass(frozen=True)
class KindAgreement:
    """Agreement on one rating kind: n items, exact-match rate, linearly weighted Cohen's κ,
    Kendall τ_b and its p-value, and the confusion matrix (rows: judge a's rating 0, 1, 2;
    columns: judge b's)."""

    kind: str
    n: int
    exact_match: float
    weighted_kappa: float
    kendall_tau_b: float
    p_value: float
    confusion: list[list[int]]


@dataclass(frozen=True)
class AgreementReport:
    """Agreement per rating kind ('concept', 'instruction', 'fluency')."""

    judge_a: str
    judge_b: str
    per_kind: dict[str, KindAgreement]

    def to_dict(self) -> dict:
        return {"judge_a": self.judge_a, "judge_b": self.judge_b,
                "per_kind": {k: vars(v) for k, v in self.per_kind.items()}}


#: The rating scale of AxBench's three templates (protocol §4).
SCALE = (0, 1, 2)


def confusion_matrix(values_a: Sequence[int], values_b: Sequence[int],
                     scale: Sequence[int] = SCALE) -> np.ndarray:
    """Counts of (a's rating, b's rating) over the scale; a value off the scale is an error."""
    index = {v: i for i, v in enumerate(scale)}
    out = np.zeros((len(scale), len(scale)), dtype=int)
    for a, b in zip(values_a, values_b):
        if a not in index or b not in index:
            raise ValueError(f"rating pair ({a}, {b}) is off the scale {tuple(scale)}")
        out[index[a], index[b]] += 1
    return out


def weighted_kappa(confusion: np.ndarray) -> float:
    """Cohen's κ with linear weights (Cohen 1968): 1 − Σ w·observed / Σ w·expected, with
    w_ij = |i − j| / (k − 1), the usual agreement statistic for an ordinal scale such as AxBench's
    0–2: a 0 against a 2 costs twice a 0 against a 1. NaN when the expected disagreement is 0
    (both judges constant on the same rating)."""
    conf = np.asarray(confusion, dtype=float)
    k = conf.shape[0]
    n = conf.sum()
    if n == 0:
        return math.nan
    i, j = np.indices((k, k))
    w = np.abs(i - j) / max(k - 1, 1)
    expected = np.outer(conf.sum(1), conf.sum(0)) / n
    denom = (w * expected).sum()
    return math.nan if denom == 0 else float(1 - (w * conf).sum() / denom)


def agreement_on(values_a: Sequence[float], values_b: Sequence[float], kind: str) -> KindAgreement:
    """Exact-match rate, weighted κ, τ_b and the confusion matrix between two equally long
    rating lists on the 0–2 scale."""
    if len(values_a) != len(values_b):
        raise ValueError(f"{kind}: the judges rated {len(values_a)} and {len(values_b)} items; "
                         "agreement needs the same items from both")
    n = len(values_a)
    if n == 0:
        raise ValueError(f"{kind}: no items to compare")
    exact = sum(a == b for a, b in zip(values_a, values_b)) / n
    tau, p = kendall_tau_b_p(values_a, values_b)
    conf = confusion_matrix(values_a, values_b)
    return KindAgreement(kind, n, exact, weighted_kappa(conf), tau, p, conf.tolist())


def judge_agreement(ratings_a: Sequence[Ratings], ratings_b: Sequence[Ratings],
                    judge_a: str = "a", judge_b: str = "b") -> AgreementReport:
    """Compare two judges' ratings of the same items, in the same order, kind by kind."""
    if len(ratings_a) != len(ratings_b):
        raise ValueError(f"judge {judge_a} rated {len(ratings_a)} items and judge {judge_b} "
                         f"{len(ratings_b)}; agreement needs the same items from both")
    per_kind = {k: agreement_on([getattr(r, k) for r in ratings_a],
                                [getattr(r, k) for r in ratings_b], k) for k in RATING_KINDS}
    return AgreementReport(judge_a, judge_b, per_kind)


@dataclass(frozen=True)
class JudgeAgreementConfig:
    """Profile section ``judge_agreement``: the profile's judge against an LLM judge on a seeded,
    stratified sample of what it rated (protocol §3–4; the grid's ``judge`` job and book page).

    ``n_saes`` SAEs (spread over the architectures) are chosen; for each, the held-out
    generations at α* of whole concepts (the generations its g rests on), up to an equal share of
    half of ``n_generations``, and ``n_latents`` / ``n_saes`` of its CONCEPT100 latents are
    re-judged, so that μ and g of those SAEs exist under both judges. Generations from all SAEs
    and factors fill the sample up to ``n_generations``.
    ``backend``: 'llama' (the packaged 1.5B chat model through llama.cpp), 'local' (a Hugging
    Face chat model, ``local_model``) or 'openai' (the judge section's server). ``max_tokens``
    caps each rating answer, ``threads`` the llama.cpp threads. ``n_generations: 0`` and
    ``n_latents: 0`` skip the job, and the book says so.
    """

    n_generations: int = 0
    n_latents: int = 0
    n_saes: int = 6
    backend: str = "llama"
    local_model: str = "smollm2-135m-instruct"
    max_tokens: int = 64
    threads: int = 1
    seed: int = 0

    def validate(self) -> "JudgeAgreementConfig":
        for name in ("n_generations", "n_latents"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("n_saes", "max_tokens", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.backend not in ("llama", "local", "openai"):
            raise ValueError(f"backend must be 'llama', 'local' or 'openai', got {self.backend!r}")
        return self
