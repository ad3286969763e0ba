"""Tests for saelib.stats: τ_b against scipy (with ties), hand-made cases, Ψ arithmetic on the
paper's numbers, resampling machinery, degenerate groups and the book's frame."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from saelib import paper
from saelib import stats as S

FAST = S.AgreementConfig(n_permutations=199, n_bootstrap=199, seed=1)


def _grid(rng, models=("m1", "m2"), archs=("relu", "gated", "topk"), sparsities=(0, 1, 2, 3),
          slope=0.5, ties=False):
    rows = []
    for m in models:
        for a in archs:
            for s in sparsities:
                mu = rng.normal()
                g = slope * mu + rng.normal()
                if ties:
                    mu, g = round(mu), round(g)
                rows.append({"model": m, "architecture": a, "sparsity": s, "mu": mu, "g": g})
    return rows


def test_vectorised_tau_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(3, 40))
        x = rng.integers(0, 5, n).astype(float)  # many ties
        y = rng.integers(0, 4, n).astype(float)
        if np.unique(x).size < 2 or np.unique(y).size < 2:
            continue
        ref = sps.kendalltau(x, y, variant="b").statistic
        assert S._tau_b_vectorised(x, y) == pytest.approx(ref, abs=1e-12)
        assert S.kendall_tau_b(x, y) == pytest.approx(ref, abs=1e-12)


def test_weighted_tau_equals_tau_on_expanded_resample():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, 12).astype(float)
    y = rng.normal(size=12).round(1)
    w = rng.multinomial(12, np.full(12, 1 / 12), size=30).astype(float)
    got = S._tau_b_weighted(S._signs(x), S._signs(y), w)
    for b in range(30):
        idx = np.repeat(np.arange(12), w[b].astype(int))
        xs, ys = x[idx], y[idx]
        if np.unique(xs).size < 2 or np.unique(ys).size < 2:
            assert math.isnan(got[b])
        else:
            assert got[b] == pytest.approx(sps.kendalltau(xs, ys).statistic, abs=1e-12)


def test_hand_made_tau_values():
    # P=5, Q=1 of 6 pairs: τ = 4/6.
    assert S.kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6, abs=1e-12)
    # One tie in x, one in y, P=4, Q=0: τ_b = 4 / sqrt(5·5) = 0.8.
    assert S.kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8, abs=1e-12)
    assert math.isnan(S.kendall_tau_b([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal length"):
        S.kendall_tau_b([1, 2], [1, 2, 3])


def test_exact_permutation_p_value_hand_made():
    # n = 4, perfect agreement: exactly 2 of 24 orderings reach |τ| = 1, so two-sided p = 1/12.
    rows = [{"model": "m", "architecture": "a", "sparsity": i, "mu": float(i), "g": float(i)}
            for i in range(4)]
    table = S.rank_agreement(rows, "mu", "g", config=FAST)
    assert table.pooled.tau == pytest.approx(1.0)
    assert table.pooled.p == pytest.approx(1 / 12, abs=1e-12)
    assert table.pooled.pairs == 6 and table.pooled.n == 4


def test_permutation_p_close_to_scipy_exact_kendall():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=7), rng.normal(size=7)
    # 7! = 5040 < 9999 permutations: the test is exact, as is scipy's exact Kendall p.
    cfg = S.AgreementConfig(n_permutations=9999, n_bootstrap=199)
    p = S._permutation_p(x, y, cfg, "t")
    assert p == pytest.approx(sps.kendalltau(x, y, method="exact").pvalue, abs=1e-9)


def test_paper_psi_recomputed_from_group_taus():
    t1, t3 = paper.TABLE1, paper.TABLE3
    psi_c = S.mean_of_group_taus(list(t1.per_model.values()))
    assert psi_c == pytest.approx(0.32720, abs=5e-6)
    assert round(psi_c, 4) == t1.psi_c
    assert round(S.combine_psi(t1.psi_a, t1.psi_b, t1.psi_c), 4) == pytest.approx(t1.psi, abs=1e-9)
    assert round(S.combine_psi(t3.psi_a, t3.psi_b, t3.psi_c), 4) == pytest.approx(t3.psi, abs=1e-9)
    assert S.mean_of_group_taus([0.2, math.nan, 0.4]) == pytest.approx(0.3)
    assert math.isnan(S.mean_of_group_taus([math.nan]))


def test_rank_agreement_groups_match_scipy_and_psi_is_mean():
    rng = np.random.default_rng(3)
    rows = _grid(rng, ties=True)
    frame = pd.DataFrame(rows)
    table = S.rank_agreement(frame, "mu", "g", config=FAST)
    assert table.pooled.tau == pytest.approx(sps.kendalltau(frame.mu, frame.g).statistic)
    for axis_letter, col in S.AXES.items():
        groups = table.groups_on(col)
        assert [g.group for g in groups] == [str(v) for v in pd.unique(frame[col])]
        for g in groups:
            sub = frame[frame[col].astype(str) == g.group]
            assert g.n == len(sub) and g.pairs == len(sub) * (len(sub) - 1) // 2
            if not math.isnan(g.tau):
                assert g.tau == pytest.approx(sps.kendalltau(sub.mu, sub.g).statistic)
                assert 0 < g.p <= 1 and g.ci_low <= g.ci_high and g.se > 0
        psi = {"A": table.psi_a, "B": table.psi_b, "C": table.psi_c}[axis_letter]
        assert psi.value == pytest.approx(np.nanmean([g.tau for g in groups]))
    assert table.psi.value == pytest.approx(
        (table.psi_a.value + table.psi_b.value + table.psi_c.value) / 3)
    assert table.pooled.ci_method == "BCa"


def test_pooled_bca_matches_scipy_bootstrap_on_same_stream():
    rng = np.random.default_rng(4)
    rows = _grid(rng, slope=1.0)
    frame = pd.DataFrame(rows)
    cfg = S.AgreementConfig(n_permutations=99, n_bootstrap=499, seed=5)
    table = S.rank_agreement(frame, "mu", "g", config=cfg)
    ref = sps.bootstrap((frame.mu.to_numpy(), frame.g.to_numpy()),
                        lambda a, b, axis=-1: S._tau_b_vectorised(a, b, axis=axis),
                        paired=True, vectorized=True, n_resamples=499, batch=S._BATCH,
                        method="BCa", rng=S._rng(5, "boot", "pooled"))
    assert table.pooled.ci_low == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert table.pooled.ci_high == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    assert table.pooled.ci_low < table.pooled.tau < table.pooled.ci_high
    assert table.pooled.se > 0


def test_pooled_ci_falls_back_to_percentile_when_bca_is_undefined():
    """Heavily tied scores (the default's Table 3: 13 of 15 lifts at −100 %): some resamples are
    all tied, BCa is NaN, and the pooled CI is the percentile interval of the defined resamples,
    saying so, instead of no interval at all."""
    rng = np.random.default_rng(8)
    lift = np.r_[np.full(13, -100.0), 33.3, 71.4]
    frame = pd.DataFrame({"mu": rng.uniform(size=15), "lift": lift, "architecture": "a",
                          "sparsity": np.arange(15) % 5, "model": "m"})
    cfg = S.AgreementConfig(n_permutations=99, n_bootstrap=999, seed=2)
    pooled = S.rank_agreement(frame, "mu", "lift", config=cfg).pooled
    x, y = frame.mu.to_numpy(), frame.lift.to_numpy()
    with np.errstate(invalid="ignore"):
        bca = sps.bootstrap((x, y), lambda a, b, axis=-1: S._tau_b_vectorised(a, b, axis=axis),
                            paired=True, vectorized=True, n_resamples=999, batch=S._BATCH,
                            method="BCa", rng=S._rng(2, "boot", "pooled"))
    assert math.isnan(bca.confidence_interval.low)  # the case this fallback exists for
    assert pooled.ci_method == "percentile" and "BCa interval undefined" in pooled.reason
    assert "percentile interval instead" in pooled.reason
    assert -1 <= pooled.ci_low <= pooled.tau <= pooled.ci_high <= 1 and pooled.se > 0
    from saelib import observations as obs
    from saelib.paper import TABLE3

    seen = obs._tau_observation(3, "claim", TABLE3, S.rank_agreement(frame, "mu", "lift", config=cfg),
                                "none", expect="null")
    assert "percentile interval: BCa undefined" in seen.ours and seen.verdict != obs.NO_DATA


def test_strong_association_is_significant_and_null_is_not():
    rng = np.random.default_rng(6)
    strong = S.rank_agreement(_grid(rng, slope=5.0), "mu", "g", config=FAST)
    # The smallest two-sided p a 199-permutation test can give is 2 / 200.
    assert strong.pooled.p == pytest.approx(2 / 200) and strong.psi.ci_low > 0
    null = S.rank_agreement(_grid(rng, slope=0.0), "mu", "g", config=FAST)
    # no association: both intervals hold 0 and the permutation test does not reject
    assert null.psi.ci_low < 0 < null.psi.ci_high and null.psi.se > 0
    assert null.pooled.ci_low < 0 < null.pooled.ci_high and null.pooled.p > 0.05


def test_seeded_results_are_reproducible_and_group_streams_independent():
    rng = np.random.default_rng(7)
    rows = _grid(rng)
    a = S.rank_agreement(rows, "mu", "g", config=FAST)
    b = S.rank_agreement(rows, "mu", "g", config=FAST)
    assert a == b
    # Dropping a model leaves the other model's group (same rows, same seed) unchanged.
    c = S.rank_agreement([r for r in rows if r["model"] == "m1"], "mu", "g", config=FAST)
    assert c.groups_on("model")[0] == a.groups_on("model")[0]


def test_degenerate_groups_give_nan_with_reason():
    rows = [
        {"model": "m", "architecture": "a", "sparsity": 0, "mu": 1.0, "g": 1.0},
        {"model": "m", "architecture": "a", "sparsity": 1, "mu": 2.0, "g": 3.0},
        {"model": "m", "architecture": "a", "sparsity": 2, "mu": 3.0, "g": 2.0},
        {"model": "m", "architecture": "b", "sparsity": 0, "mu": 4.0, "g": 5.0},
        {"model": "m", "architecture": "b", "sparsity": 1, "mu": 4.0, "g": 6.0},
        {"model": "m", "architecture": "c", "sparsity": 3, "mu": 5.0, "g": 7.0},
    ]
    table = S.rank_agreement(rows, "mu", "g", config=FAST)
    by = {(g.axis, g.group): g for g in table.groups}
    assert math.isnan(by["architecture", "b"].tau) and "x has fewer" in by["architecture", "b"].reason
    assert math.isnan(by["architecture", "c"].tau) and "n = 1" in by["architecture", "c"].reason
    assert by["architecture", "a"].tau == pytest.approx(1 / 3)
    assert table.psi_a.n_groups == 1
    assert table.psi_a.value == pytest.approx(1 / 3)
    assert "2 of 3 groups" in table.psi_a.reason
    assert math.isfinite(table.psi.value)


def test_all_tied_table_gives_nan_everywhere_without_crash():
    rows = [{"model": "m", "architecture": a, "sparsity": s, "mu": 1.0, "g": float(s)}
            for a in "ab" for s in range(3)]
    table = S.rank_agreement(rows, "mu", "g", config=FAST)
    assert math.isnan(table.pooled.tau) and table.pooled.reason
    assert math.isnan(table.psi.value) and table.psi.reason


def test_to_frame_layout():
    rng = np.random.default_rng(8)
    table = S.rank_agreement(_grid(rng), "mu", "g", config=FAST)
    frame = table.to_frame()
    assert list(frame.columns) == ["axis", "group", "n", "pairs", "tau_b", "p", "ci_low",
                                   "ci_high", "se", "ci_method", "n_groups", "reason"]
    assert frame.iloc[0]["axis"] == "pooled"
    assert list(frame[frame.axis == "psi"].group) == ["Ψ_A", "Ψ_B", "Ψ_C", "Ψ"]
    assert len(frame) == 1 + 3 + 4 + 2 + 4
    assert frame.iloc[-1]["tau_b"] == pytest.approx(table.psi.value)
    assert isinstance(table.to_dict()["pooled"]["tau"], float)


def test_bad_input_errors():
    rows = [{"model": "m", "architecture": "a", "sparsity": 0, "mu": 1.0, "g": math.nan}]
    with pytest.raises(ValueError, match="non-finite"):
        S.rank_agreement(rows, "mu", "g", config=FAST)
    with pytest.raises(ValueError, match="lacks columns"):
        S.rank_agreement(rows, "mu", "missing", config=FAST)
    with pytest.raises(ValueError, match="n_bootstrap"):
        S.AgreementConfig(n_bootstrap=10).validate()
    with pytest.raises(ValueError, match="confidence_level"):
        S.AgreementConfig(confidence_level=1.5).validate()
