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
from scipy.stats import kendalltau

from saelib.judges.base import Ratings
from saelib.judges.prompts import RATING_KINDS


@dataclass(frozen=True)
class KindAgreement:
    """Agreement on one rating kind: n items, exact-match rate, Kendall τ_b and its p-value."""

    kind: str
    n: int
    exact_match: float
    kendall_tau_b: float
    p_value: float


@dataclass(frozen=True)
class AgreementReport:
    """Agreement per rating kind ('concept', 'instruction', 'fluency')."""

    judge_a: str
    judge_b: str
    per_kind: dict[str, KindAgreement]

    def to_dict(self) -> dict:
        return {"judge_a": self.judge_a, "judge_b": self.judge_b,
                "per_kind": {k: vars(v) for k, v in self.per_kind.items()}}


def agreement_on(values_a: Sequence[float], values_b: Sequence[float], kind: str) -> KindAgreement:
    """Exact-match rate and τ_b between two equally long rating lists."""
    if len(values_a) != len(values_b):
        raise ValueError(f"{kind}: the judges rated {len(values_a)} and {len(values_b)} items; "
                         "agreement needs the same items from both")
    n = len(values_a)
    if n == 0:
        raise ValueError(f"{kind}: no items to compare")
    exact = sum(a == b for a, b in zip(values_a, values_b)) / n
    if n < 2 or len(set(values_a)) < 2 or len(set(values_b)) < 2:
        tau, p = math.nan, math.nan
    else:
        res = kendalltau(values_a, values_b, variant="b")
        tau, p = float(res.statistic), float(res.pvalue)
    return KindAgreement(kind, n, exact, tau, p)


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
    """Profile section ``judge_agreement``: the profile's judge against a second back-end on the same
    steered generations (protocol §4; the book's "Judge agreement" section).

    ``n_items`` generations are drawn (seeded by ``seed``) from all SAEs' ``steering.jsonl``; the
    profile's own ratings are already there, and ``backend`` (``local``: a chat model on this
    machine, ``local_model`` a packaged name, folder or hub id; or ``openai``, with the judge
    section's server settings) rates them again. ``max_tokens`` caps each answer of the second
    judge (AxBench lets the judge reason first; 512 tokens on two CPU cores would take minutes per
    item). ``n_items: 0`` skips the comparison, and the book says so.
    """

    n_items: int = 0
    backend: str = "local"
    local_model: str = "smollm2-135m-instruct"
    max_tokens: int = 96
    seed: int = 0

    def validate(self) -> "JudgeAgreementConfig":
        if isinstance(self.n_items, bool) or not isinstance(self.n_items, int) or self.n_items < 0:
            raise ValueError(f"n_items must be a non-negative integer, got {self.n_items!r}")
        if self.backend not in ("local", "openai"):
            raise ValueError(f"backend must be 'local' or 'openai', got {self.backend!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        return self


def sample_items(rows: Sequence[dict], n: int, seed: int) -> list[dict]:
    """``n`` rows drawn without replacement with a seeded generator, in their original order."""
    if n >= len(rows):
        return list(rows)
    idx = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return [rows[int(i)] for i in idx]
