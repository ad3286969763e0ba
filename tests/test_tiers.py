"""Tests for saelib.selection.tiers on hand-made ΔC_k / S_out arrays (protocol §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saelib.selection.tiers import (
    Tier, build_tiers, output_score_baselines, output_score_tier, pick_best_tier,
    pick_tier_honest, tier_score,
)

# Ten candidates with latent ids 100..109; ΔC_k 0.0, 0.1, …, 0.9 in shuffled order.
DELTA = np.array([0.3, 0.9, 0.0, 0.5, 0.7, 0.1, 0.8, 0.2, 0.6, 0.4])
IDS = list(range(100, 110))


def _by_name(tiers):
    return {t.name: t for t in tiers}


def test_topk_tiers_both_directions():
    tiers = _by_name(build_tiers(DELTA, IDS))
    assert tiers["dC_pos_top1"].feature_ids == (101,)
    assert tiers["dC_pos_top3"].feature_ids == (101, 106, 104)
    assert tiers["dC_neg_top2"].feature_ids == (102, 105)
    t = tiers["dC_neg_top5"]
    assert (t.direction, t.kind, t.param, t.size) == ("neg", "topk", 5, 5)


def test_quantile_tiers_strictly_beyond_threshold():
    tiers = _by_name(build_tiers(DELTA, IDS))
    # np.quantile(0.0..0.9, 0.80) = 0.72: strictly above are 0.8, 0.9.
    assert tiers["dC_pos_q0.8"].feature_ids == (101, 106)
    # 0.90-quantile = 0.81 -> only 0.9; 0.99 -> 0.891 -> only 0.9.
    assert tiers["dC_pos_q0.9"].feature_ids == (101,)
    assert tiers["dC_pos_q0.99"].feature_ids == (101,)
    # neg q=0.8 uses the 0.2-quantile = 0.18: 0.0 and 0.1.
    assert tiers["dC_neg_q0.8"].feature_ids == (102, 105)
    assert tiers["dC_neg_q0.95"].kind == "quantile" and tiers["dC_neg_q0.95"].param == 0.95


def test_tier_order_and_default_ids_and_torch_input():
    tiers = build_tiers(torch.tensor(DELTA))
    names = [t.name for t in tiers]
    assert names[:5] == [f"dC_pos_top{k}" for k in range(1, 6)]
    assert names[5:9] == ["dC_pos_q0.99", "dC_pos_q0.95", "dC_pos_q0.9", "dC_pos_q0.8"]
    assert names[9] == "dC_neg_top1"
    assert tiers[0].feature_ids == (1,)  # default ids are pool positions


def test_ties_keep_pool_order_and_empty_tiers_are_omitted():
    delta = np.array([0.5, 0.5, 0.5, 0.1])
    tiers = _by_name(build_tiers(delta, [7, 8, 9, 10], top_ks=(1, 2, 5), quantiles=(0.8,)))
    assert tiers["dC_pos_top1"].feature_ids == (7,)
    assert tiers["dC_pos_top2"].feature_ids == (7, 8)
    assert "dC_pos_top5" not in tiers  # K > pool size: not built
    # 0.8-quantile is 0.5 and nothing is strictly above: empty, so omitted.
    assert "dC_pos_q0.8" not in tiers
    assert tiers["dC_neg_q0.8"].feature_ids == (10,)
    assert build_tiers(np.zeros(4), top_ks=(), quantiles=(0.9,)) == ()


def test_build_tiers_input_errors():
    with pytest.raises(ValueError, match="finite"):
        build_tiers([0.1, math.nan])
    with pytest.raises(ValueError, match="unique"):
        build_tiers([0.1, 0.2], [3, 3])
    with pytest.raises(ValueError, match="one id per score"):
        build_tiers([0.1, 0.2], [3])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        build_tiers([0.1, 0.2], quantiles=(1.0,))
    with pytest.raises(ValueError, match=">= 1"):
        build_tiers([0.1, 0.2], top_ks=(0,))
    with pytest.raises(ValueError, match="direction"):
        build_tiers([0.1, 0.2], directions=("up",))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        build_tiers([])


def test_output_score_baseline_same_size():
    s_out = np.array([0.05, 0.01, 0.30, 0.02, 0.30, 0.00, 0.10, 0.03, 0.04, 0.20])
    t = output_score_tier(s_out, 3, IDS)
    assert t == Tier("outscore_top3", "pos", "output_score", 3, (102, 104, 109))
    tiers = build_tiers(DELTA, IDS)
    base = output_score_baselines(tiers, s_out, IDS)
    assert set(base) == {t.name for t in tiers}
    for tier in tiers:
        assert base[tier.name].size == tier.size
    with pytest.raises(ValueError, match=r"n_features must be an integer in \[1, 10\]"):
        output_score_tier(s_out, 11, IDS)


def test_tier_score_is_mean_of_feature_scores():
    t = Tier("dC_pos_top2", "pos", "topk", 2, (101, 106))
    assert tier_score(t, {101: 0.5, 106: 1.0, 999: 2.0}) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no score for features"):
        tier_score(t, {101: 0.5})


def test_pick_best_tier_ties_and_nans():
    choice = pick_best_tier({"a": 0.2, "b": 0.5, "c": 0.5, "d": math.nan})
    assert (choice.name, choice.score) == ("b", 0.5)  # first of the tied best
    assert pick_best_tier({"x": math.nan, "y": -1.0}).name == "y"
    with pytest.raises(ValueError, match="no tier has a finite score"):
        pick_best_tier({"x": math.nan})
    with pytest.raises(ValueError, match="no tier has a finite score"):
        pick_best_tier({})


def test_pick_tier_honest_reports_heldout_of_selection_choice():
    selection = {"t1": 0.9, "t2": 0.4, "t3": 0.6}
    heldout = {"t1": 0.3, "t2": 0.7, "t3": 0.5}
    c = pick_tier_honest(selection, heldout)
    assert (c.name, c.selection_score, c.heldout_score) == ("t1", 0.9, 0.3)
    assert (c.oracle_name, c.oracle_heldout_score) == ("t2", 0.7)
    assert c.optimism == pytest.approx(0.4)
    with pytest.raises(ValueError, match="same tiers"):
        pick_tier_honest({"t1": 0.1}, {"t2": 0.1})
    with pytest.raises(ValueError, match="is NaN"):
        pick_tier_honest({"t1": 0.1}, {"t1": math.nan})
