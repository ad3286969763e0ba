"""saelib.features: a card per steered concept with the α* the selection half chose, the held-out
answers at α*, the ranks in ΔC_k and output score, highlighted windows; HTML escaped."""

from __future__ import annotations

import pytest

from saelib import features
from saelib.profiles import RUNS_ENV, load_profile
from saelib.results import write_json, write_jsonl
from saelib.stages import SAEJob, interp, sae_dir, selection, steering


def _rows(latent, best_alpha, heldout_hm):
    rows = []
    for alpha in (1.0, 2.0):
        rows.append({"latent": latent, "split": "select", "alpha": alpha,
                     "hm": 0.9 if alpha == best_alpha else 0.1})
        for i, hm in enumerate(heldout_hm):
            rows.append({"latent": latent, "split": "heldout", "alpha": alpha,
                         "hm": hm if alpha == best_alpha else 0.0, "instruction": f"q{i} <b>",
                         "output": f"out{latent}-{alpha}-{i}", "unsteered_output": "plain",
                         "concept_rating": 2, "instruction_rating": 1, "fluency_rating": 1})
    return rows


@pytest.fixture
def planted(tmp_path, monkeypatch):
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    profile = load_profile("smoke")
    jobs = [SAEJob(profile.models[0].name, arch, 0) for arch in ("topk", "gated")]
    for job, g in zip(jobs, (0.5, 0.2)):
        out = sae_dir(profile, job)
        out.mkdir(parents=True)
        write_jsonl(out / steering.STEER_ROWS, _rows(7, 2.0, [g, g + 0.2]) + _rows(3, 1.0, [0.1, 0.1]))
        write_jsonl(out / interp.INTERP_ROWS, [
            {"latent": 7, "max_act": 4.0, "explanation": "cats & <dogs>", "score": 0.75,
             "explain_windows": [{"role": "top", "token_ids": [10, 11, 12], "acts": [0.0, 4.0, 1.0]}]},
            {"latent": 3, "max_act": 2.0, "explanation": "x", "score": 0.5, "explain_windows": []}])
        write_json(out / selection.SELECT_SCORES, {"latent": [3, 5, 7, 9],
                                                   "delta_conf": [0.1, 0.4, 0.3, -0.2],
                                                   "output_score": [0.9, 0.1, 0.2, 0.3]})
    return profile, jobs


def test_cards_follow_the_records(planted):
    profile, jobs = planted
    cards = features.feature_cards(profile, jobs[0], lambda ids: [f"t{i}" for i in ids])
    assert [c.latent for c in cards] == [7, 3]  # best held-out score first
    c = cards[0]
    assert c.alpha_star == 2.0 and c.heldout_score == pytest.approx(0.6)
    assert [e["output"] for e in c.examples] == ["out7-2.0-1", "out7-2.0-0"]  # best HM first
    assert (c.delta_conf, c.delta_conf_rank, c.output_score_rank, c.n_latents) == (0.3, 2, 3, 4)
    assert c.windows[0].tokens == ("t10", "t11", "t12") and c.detection_score == 0.75
    assert cards[1].notes == ("no windows recorded for this latent",)
    page = features.card_html(c)
    assert "cats &amp; &lt;dogs&gt;" in page and "q1 &lt;b&gt;" in page and "<dogs>" not in page
    assert page.count("rgba(255,140,0,") == 2  # the two tokens with a positive activation
    assert "rank 2 of 4" in page


def test_featured_saes_pick_the_best_steering_sae_per_architecture(planted):
    profile, jobs = planted
    assert features.featured_saes(profile) == sorted(jobs, key=lambda j: j.arch)
