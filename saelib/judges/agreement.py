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
