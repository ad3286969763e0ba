"""The key-observation verdicts (saelib.observations): fixed rules on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from saelib import observations as obs
from saelib.stats import AgreementConfig, rank_agreement


@pytest.mark.parametrize("low, high, expect, verdict", [
    (0.1, 0.4, "positive", obs.REPRODUCES), (-0.1, 0.4, "positive", obs.INCONCLUSIVE),
    (-0.4, -0.1, "positive", obs.CONTRADICTED), (-0.15, 0.1, "null", obs.REPRODUCES),
    (0.05, 0.3, "null", obs.CONTRADICTED), (math.nan, 0.3, "null", obs.NO_DATA),
    # a CI that holds 0 but is wider than the band says nothing: 30 SAEs usually give this
    (-0.2, 0.1, "null", obs.INCONCLUSIVE), (-0.526, 0.334, "null", obs.INCONCLUSIVE),
    (0.02, 0.15, "null", obs.REPRODUCES),  # a trivially small association is still "none"
])
def test_interval_verdicts(low, high, expect, verdict):
    assert obs.interval_verdict(low, high, expect=expect) == verdict


def test_mean_ci_brackets_the_mean_and_handles_degenerate_input():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 0.5, size=40)
    m, lo, hi = obs.mean_ci(x, n_resamples=999)
    assert m == pytest.approx(x.mean()) and lo < m < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std(ddof=1) / math.sqrt(40), rel=0.25)
    assert obs.mean_ci([0.2, 0.2, 0.2]) == (0.2, 0.2, 0.2)
    assert math.isnan(obs.mean_ci([0.3])[1]) and math.isnan(obs.mean_ci([])[0])


def _table(g, dc, out):
    n = len(g)
    return pd.DataFrame({"model": ["m"] * n, "arch": ["topk"] * n, "level": range(n), "g": g,
                         "paper_g_delta_conf": dc, "paper_g_output_score": out,
                         "honest_g_delta_conf": g, "honest_g_output_score": out})


def test_observation_2_reproduces_only_when_both_differences_are_positive():
    g = np.linspace(0.1, 0.3, 12)
    clear = _table(g, g + 0.2, g + 0.1)
    paper, honest = (obs.observation_2(clear, way, n_resamples=999) for way in ("paper", "honest"))
    assert paper.verdict == obs.REPRODUCES and paper.n == 12
    # the paper's figure also in our units: Table 2's mean ΔC_k minus none, and minus output score
    assert "g_ΔC − g = +0.190, g_ΔC − g_out = +0.079" in paper.paper
    assert honest.verdict != obs.REPRODUCES  # the honest ΔC_k equals g here: no lift
    worse = _table(g, g + 0.2, g + 0.3)  # ΔC_k beats none but loses to the output score
    assert obs.observation_2(worse, "paper", n_resamples=999).verdict == obs.CONTRADICTED
    assert obs.observation_2(_table(g, g, g).drop(columns=["paper_g_delta_conf"]), "paper").verdict == obs.NO_DATA


def test_observations_1_and_3_read_the_pooled_interval():
    rng = np.random.default_rng(1)
    mu = rng.uniform(size=30)
    frame = pd.DataFrame({"mu": mu, "g": mu + rng.normal(0, 0.05, 30), "lift": rng.normal(size=30),
                          "architecture": ["a", "b", "c", "d", "e"] * 6,
                          "sparsity": np.repeat(range(6), 5), "model": "m"})
    cfg = AgreementConfig(n_permutations=199, n_bootstrap=199)
    t1 = rank_agreement(frame, "mu", "g", config=cfg)
    t3 = rank_agreement(frame, "mu", "lift", config=cfg)
    o1, o3 = obs.observation_1(t1), obs.observation_3(t3)
    assert o1.verdict == obs.REPRODUCES and o1.ours.startswith("τ_b = 0.8") and o1.n == 30
    # an unrelated lift over 30 SAEs: the CI holds 0 but is wider than the band
    assert o3.verdict == obs.INCONCLUSIVE and o3.half_width > 0.1 and "band" in o3.ours
    assert o1.to_dict()["ci_half_width"] == pytest.approx(o1.half_width) and "±" in o1.ours
    assert obs.observation_1(None).verdict == obs.NO_DATA
    rows = obs.observations_frame(obs.key_observations(frame.assign(paper_g_delta_conf=1.0), t1, t3,
                                                       n_resamples=199))
    assert list(rows["observation"]) == [1, 2, 2, 3]


def test_too_few_saes_never_give_a_verdict():
    """Two SAEs with a tied τ_b of −1 give the 'interval' [−1, −1]: no verdict stands on that."""
    g = np.linspace(0.1, 0.3, obs.MIN_SAES - 1)
    few = obs.observation_2(_table(g, g + 0.2, g + 0.1), "paper", n_resamples=999)
    assert few.verdict == obs.INCONCLUSIVE and few.n == obs.MIN_SAES - 1
    g = np.linspace(0.1, 0.3, obs.MIN_SAES)
    assert obs.observation_2(_table(g, g + 0.2, g + 0.1), "paper", n_resamples=999).verdict == obs.REPRODUCES
    assert obs.with_enough_saes(obs.CONTRADICTED, 2) == obs.INCONCLUSIVE
    assert obs.with_enough_saes(obs.NO_DATA, 0) == obs.NO_DATA
    frame = pd.DataFrame({"mu": [0.1, 0.2], "lift": [0.5, 0.1], "architecture": ["a", "b"],
                          "sparsity": [0, 0], "model": "m"})
    t3 = rank_agreement(frame, "mu", "lift", config=AgreementConfig(n_permutations=99, n_bootstrap=99))
    assert obs.observation_3(t3).verdict == obs.INCONCLUSIVE
