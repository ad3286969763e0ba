"""Agreement between two judges: exact-match rate and Kendall τ_b per rating kind."""

from __future__ import annotations

import math

import pytest
from scipy.stats import kendalltau

from saelib.judges import Ratings, judge_agreement
from saelib.judges.agreement import agreement_on


def test_identical_judges_agree_fully():
    rs = [Ratings(0, 1, 2), Ratings(1, 2, 0), Ratings(2, 0, 1), Ratings(2, 2, 2)]
    rep = judge_agreement(rs, rs, "offline", "openai")
    for kind in ("concept", "instruction", "fluency"):
        k = rep.per_kind[kind]
        assert k.n == 4 and k.exact_match == 1.0 and k.kendall_tau_b == pytest.approx(1.0)
    assert rep.to_dict()["per_kind"]["concept"]["exact_match"] == 1.0


def test_hand_computed_values():
    a = [0, 0, 1, 2, 2]
    b = [0, 1, 1, 2, 1]
    k = agreement_on(a, b, "concept")
    assert k.exact_match == pytest.approx(3 / 5)
    # Of the 10 pairs: concordant C = 5, discordant D = 0, tied only in a T_a = 2, tied only in
    # b T_b = 3. τ_b = (C − D) / sqrt((C + D + T_a)(C + D + T_b)) = 5 / sqrt(7 · 8).
    assert k.kendall_tau_b == pytest.approx(5 / math.sqrt(56), abs=1e-12)
    assert k.kendall_tau_b == pytest.approx(kendalltau(a, b, variant="b").statistic)


def test_reversed_order_is_negative_and_constant_is_nan():
    k = agreement_on([0, 1, 2], [2, 1, 0], "fluency")
    assert k.kendall_tau_b == pytest.approx(-1.0) and k.exact_match == pytest.approx(1 / 3)
    c = agreement_on([1, 1, 1], [0, 1, 2], "fluency")
    assert math.isnan(c.kendall_tau_b) and c.exact_match == pytest.approx(1 / 3)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="same items"):
        judge_agreement([Ratings(0, 0, 0)], [], "x", "y")
    with pytest.raises(ValueError, match="no items"):
        agreement_on([], [], "concept")


def test_weighted_kappa_and_confusion_by_hand():
    a = [0, 0, 1, 2, 2]
    b = [0, 1, 1, 2, 1]
    k = agreement_on(a, b, "concept")
    assert k.confusion == [[1, 1, 0], [0, 1, 0], [0, 1, 1]]
    # Linear weights w = |i − j| / 2. Observed Σ w·p = (0.5 + 0.5) / 5 = 0.2. Marginals a (2, 1, 2),
    # b (1, 3, 1): expected Σ w·e = Σ_ij w_ij a_i b_j / 25 = (0.5·2·3 + 1·2·1 + 0.5·1·1 + 0.5·1·1
    # + 1·2·1 + 0.5·2·3) / 25 = 11 / 25. κ_w = 1 − 0.2 / 0.44.
    assert k.weighted_kappa == pytest.approx(1 - 0.2 / 0.44, abs=1e-12)
    assert agreement_on([0, 1, 2, 2], [0, 1, 2, 2], "x").weighted_kappa == pytest.approx(1.0)
    assert math.isnan(agreement_on([1, 1], [1, 1], "x").weighted_kappa)
    with pytest.raises(ValueError, match="off the scale"):
        agreement_on([0, 3], [0, 1], "x")
