"""saelib.power: planted variance components are recovered, designs obey the budget, and the
τ_b power arithmetic matches its closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from saelib import power


def planted_rows(n_saes: int, n_concepts: int, n_heldout: int, sd_c: float, sd_w: float,
                 seed: int = 0) -> list[list[dict]]:
    """Steering rows whose held-out HM at α* (= 2.0, the best on the selection rows) is
    SAE mean + concept effect (sd ``sd_c``) + answer noise (sd ``sd_w``)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_saes):
        mu = rng.uniform(0.2, 0.8)
        rows = []
        for c in range(n_concepts):
            effect = rng.normal(0, sd_c)
            for alpha, sel in ((1.0, 0.1), (2.0, 0.9)):
                rows.append({"latent": c, "split": "select", "alpha": alpha, "hm": sel})
            for i in range(n_heldout):
                rows.append({"latent": c, "split": "heldout", "alpha": 2.0,
                             "hm": mu + effect + rng.normal(0, sd_w)})
                rows.append({"latent": c, "split": "heldout", "alpha": 1.0, "hm": 99.0})
        out.append(rows)
    return out


def test_variance_components_recover_planted_values():
    vc = power.variance_components(planted_rows(40, 30, 6, sd_c=0.2, sd_w=0.3))
    assert vc.between_concept == pytest.approx(0.04, rel=0.2)
    assert vc.within_concept == pytest.approx(0.09, rel=0.1)
    assert (vc.n_saes, vc.n_concepts, vc.n_heldout) == (40, 30, 6)
    assert vc.se(30, 6) == pytest.approx(math.sqrt(0.04 / 30 + 0.09 / 180), rel=0.15)


def test_only_heldout_rows_at_alpha_star_count():
    rows = planted_rows(1, 2, 3, 0.0, 0.0)[0]
    cells = power.heldout_cells(rows)
    assert sorted(cells) == [0, 1]
    assert all(len(v) == 3 and 99.0 not in v for v in cells.values())


def test_no_between_concept_spread_gives_zero():
    vc = power.variance_components(planted_rows(10, 20, 5, sd_c=0.0, sd_w=0.3, seed=1))
    assert vc.between_concept < 0.01


def test_variance_components_refuse_a_pilot_too_small():
    with pytest.raises(ValueError, match="at least two"):
        power.variance_components(planted_rows(3, 1, 1, 0.1, 0.1))


def test_design_table_respects_budget_and_minimum():
    vc = power.VarianceComponents(0.04, 0.09, 30, 4, 3)
    table = power.design_table(vc, budget_generations=600, n_factors=3, n_select=5)
    assert len(table) and (table["generations"] <= 600).all() and (table["concepts"] >= 12).all()
    assert (table["instructions"] == table["heldout"] + 5).all()
    assert (table["generations"] == table["concepts"] * (5 * 3 + table["heldout"])).all()
    best = table.iloc[0]
    assert best["se"] == table["se"].min()
    # A held-out answer costs one generation, a concept 5 · 3 more: with no within-concept noise
    # only concepts lower the SE (the best design has one held-out answer); with no
    # between-concept noise SE² = σ²_w / (C·H) and C·H = H · budget / (15 + H) grows with H.
    no_within = power.design_table(power.VarianceComponents(0.04, 0.0, 30, 4, 3),
                                   budget_generations=600, n_factors=3)
    assert no_within.iloc[0]["heldout"] == 1 and no_within.iloc[0]["concepts"] == 600 // 16
    no_between = power.design_table(power.VarianceComponents(0.0, 0.09, 30, 4, 3),
                                    budget_generations=600, n_factors=3)
    assert no_between.iloc[0]["heldout"] == 10
    assert power.design_table(vc, budget_generations=100, n_factors=3).empty


def test_tau_power_matches_closed_form():
    assert power.tau_null_sd(10) == pytest.approx(math.sqrt(2 * 25 / (9 * 10 * 9)))
    n = power.saes_to_detect(0.298)
    z = 1.959964 + 0.841621
    assert 0.298 / power.tau_null_sd(n) >= z > 0.298 / power.tau_null_sd(n - 1)
    assert 30 < n < 50
    assert power.saes_to_detect(0.298, rel=0.25) > 3 * n
    assert power.saes_to_detect(0.298, rel=0.0) is None


def test_reliability():
    g = np.linspace(0, 1, 11)
    assert power.reliability(g, np.zeros(11)) == pytest.approx(1.0)
    assert power.reliability(g, np.full(11, 10.0)) == 0.0
    assert math.isnan(power.reliability([0.5], [0.1]))


def test_g_interval_brackets_the_mean():
    g, lo, hi = power.g_interval([0.0, 0.5, 1.0, 0.25, 0.75], n_resamples=999)
    assert g == pytest.approx(0.5) and lo < g < hi
    assert power.g_interval([0.0, 0.0])[1:] == (0.0, 0.0)


def test_cli_reads_a_runs_steering_rows(tmp_path, monkeypatch, capsys):
    """``python -m saelib.power`` on a run folder whose SAEs hold planted steering rows."""
    from saelib.profiles import RUNS_ENV, load_profile
    from saelib.results import write_jsonl
    from saelib.stages.layout import sae_dir, sae_jobs
    from saelib.stages.steering import STEER_ROWS

    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    profile = load_profile("smoke")
    jobs = sae_jobs(profile)
    for job, rows in zip(jobs, planted_rows(len(jobs), 8, 4, sd_c=0.2, sd_w=0.1)):
        sae_dir(profile, job).mkdir(parents=True, exist_ok=True)
        write_jsonl(sae_dir(profile, job) / STEER_ROWS, rows)
    power.main(["--profile", "smoke", "--budget-factor", "20"])
    out = capsys.readouterr().out
    assert f"{len(jobs)} SAEs; between-concept variance" in out
    assert "designs within 240 steered generations" in out  # 20 x 2 concepts x (2 x 2 factors + 2)
    assert "concepts" in out.splitlines()[2]
    assert "2 factors, 2 selection instructions:" in out  # the smoke profile's own split
    # its designs count 2 selection instructions at 2 factors: C · (2 · 2 + H) generations
    rows = [line.split() for line in out.splitlines()[3:] if line.strip()]
    assert rows and all(int(r[3]) == int(r[0]) * (4 + int(r[1])) for r in rows)
    power.main(["--profile", "smoke", "--budget", "120"])
    assert "designs within 120 steered generations per SAE (10x today's 12)" in capsys.readouterr().out


def test_cli_without_a_run_says_so(tmp_path, monkeypatch):
    from saelib.profiles import RUNS_ENV

    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    with pytest.raises(SystemExit, match="no steering rows"):
        power.main(["--profile", "smoke"])
