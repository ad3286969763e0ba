"""The judge stage's sample and its figures, on planted run folders and a loopback chat server."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from saelib import report, stages
from saelib.profiles import PARAMS_DIR, profile_from_dict
from saelib.stages import judge
from saelib.stages.layout import SAEJob

from test_judges_openai import FakeOpenAIServer


def test_chosen_saes_cover_every_architecture_before_any_repeats():
    jobs = [SAEJob("m", arch, level) for arch in ("standard", "gated", "topk") for level in range(4)]
    chosen = judge.choose_saes(jobs, 4, seed=0)
    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert {j.arch for j in chosen[:3]} == {"standard", "gated", "topk"}
    assert judge.choose_saes(jobs, 4, seed=0) == chosen  # seeded
    assert len(judge.choose_saes(jobs, 50, seed=0)) == 12


def test_chosen_saes_of_two_models_cover_both_and_every_architecture():
    archs = ("standard", "gated", "jumprelu", "topk", "batchtopk")
    jobs = [SAEJob(m, arch, level) for m in ("a", "b") for level in range(6) for arch in archs]
    chosen = judge.choose_saes(jobs, 6, seed=0)
    assert len(set(chosen)) == 6
    assert {j.arch for j in chosen} == set(archs) and {j.model for j in chosen} == {"a", "b"}
    assert sum(j.model == "a" for j in chosen) == 3
    assert len(judge.choose_saes(jobs, 100, seed=0)) == 60


def test_g_rows_are_the_held_out_rows_at_each_concepts_alpha_star():
    rows = [{"latent": lat, "split": split, "alpha": a} for lat in (1, 2)
            for split in ("select", "heldout") for a in (1.0, 2.0)]
    block = {"concepts": [{"latent": 1, "alpha_star": 2.0}, {"latent": 2, "alpha_star": 1.0}]}
    assert judge.g_rows(rows, block) == [{"latent": 1, "split": "heldout", "alpha": 2.0},
                                         {"latent": 2, "split": "heldout", "alpha": 1.0}]


def test_each_chosen_sae_gives_whole_concepts_of_g_rows_and_half_the_sample_spreads():
    """12 concepts × 5 held-out answers per SAE (the default's design): 6 chosen SAEs would fill
    150 with their g rows alone; each gives two whole concepts (10 rows, ≤ 75 / 6) instead."""
    from saelib.judges.agreement import JudgeAgreementConfig

    jobs = [SAEJob("m", arch, level) for arch in ("standard", "gated", "topk") for level in range(3)]
    steered, results = {}, {}
    for job in jobs:
        steered[job] = [{"sae": job.name, "latent": c, "split": split, "alpha": a}
                        for c in range(12) for split, n in (("select", 5), ("heldout", 5))
                        for _ in range(n) for a in ((1.0, 1.5, 2.0) if split == "select" else (1.5,))]
        results[job] = {"steering": {"concepts": [{"latent": c, "alpha_star": 1.5} for c in range(12)]}}
    cfg = JudgeAgreementConfig(n_generations=150, n_saes=6)
    chosen, sample = judge.sample_generations(steered, results, cfg)
    assert len(chosen) == 6 and len(sample) == 150
    for job in chosen:
        mine = [r for r in sample[:60] if r["sae"] == job.name]
        per_concept = Counter(r["latent"] for r in mine)
        assert len(mine) == 10 and set(per_concept.values()) == {5}, job
        assert all(r["split"] == "heldout" for r in mine)
    assert Counter(r["alpha"] for r in sample[60:]) == {1.0: 30, 1.5: 30, 2.0: 30}


def test_fill_spreads_the_sample_evenly_over_the_factors():
    pool = [{"alpha": a, "i": i} for a in (1.0, 1.5, 2.0) for i in range(40 if a == 1.0 else 10)]
    got = judge.fill_by_factor(pool, 24, seed=0)
    assert Counter(r["alpha"] for r in got) == {1.0: 8, 1.5: 8, 2.0: 8}
    assert len({id(r) for r in got}) == 24


def _planted_run(tmp_path, server):
    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["runs_dir"] = str(tmp_path / "runs")
    data["judge"] = {"base_url": server.base_url, "api_key_env": "", "max_retries": 0}
    data["judge_agreement"] = {"n_generations": 20, "n_latents": 0, "n_saes": 2,
                               "backend": "openai"}
    profile = profile_from_dict(data, name="smoke")
    for k, job in enumerate(stages.sae_jobs(profile)[:3]):
        rows = []
        for lat in (10, 20):
            for idx in range(4):
                for a in (1.0, 2.0):
                    # the rules agree with the server's answers (2, 1, 0) except at α = 2
                    rate = (2, 1, 0) if a == 1.0 else (1, 1, 1)
                    rows.append({"latent": lat, "concept": f"concept {lat}", "instruction": f"task {idx}",
                                 "instruction_index": idx, "split": "select" if idx < 2 else "heldout",
                                 "alpha": a, "output": f"text {k} {lat} {idx} {a}",
                                 "concept_rating": rate[0], "instruction_rating": rate[1],
                                 "fluency_rating": rate[2], "hm": 0.0 if a == 1.0 else 1.0})
        out = stages.sae_dir(profile, job)
        out.mkdir(parents=True)
        (out / stages.steering.STEER_ROWS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        block = {"g": 1.0 if k == 0 else 0.0,
                 "concepts": [{"latent": lat, "alpha_star": 2.0 if k == 0 else 1.0} for lat in (10, 20)]}
        (out / stages.layout.RESULT).write_text(json.dumps({"steering": block}))
    return profile


def test_planted_disagreement_is_found_where_it_was_planted(tmp_path):
    server = FakeOpenAIServer()  # answers every rating with concept 2, instruction 1, fluency 0
    try:
        profile = _planted_run(tmp_path, server)
        record = judge.run(profile, progress=False)
        assert record["n_generations"] == 20 and len(record["saes"]) == 2
        gens = record["generations"]
        assert all(g["llm"] == [2, 1, 0] for g in gens)
        agree = sum(g["alpha"] == 1.0 for g in gens) / len(gens)
        assert record["ratings"]["concept"]["exact_match"] == pytest.approx(agree)
        assert record["ratings"]["instruction"]["exact_match"] == 1.0
        assert sorted(g["half"] for g in gens) == [0] * 10 + [1] * 10
        for p in record["per_sae"]:
            assert p["n_generations"] == 4  # 2 concepts × 2 held-out instructions at α*
            assert p["g_llm"] == 0.0  # the server's fluency 0 makes every HM 0
            assert p["g_rule"] == pytest.approx(p["g"])  # the recorded g, recomputed from the rows
        requests = len(server.requests)
        assert judge.done(profile)
        assert judge.run(profile, progress=False)["n_generations"] == 20
        assert len(server.requests) == requests, "a current record is returned, nothing asked"
    finally:
        server.close()


def test_latents_are_rescored_on_the_stored_windows_against_the_stored_truth(tmp_path):
    server = FakeOpenAIServer()  # explains "words about cats and dogs", detects windows 2, 5 and 7
    try:
        profile = _planted_run(tmp_path, server)
        profile = profile_from_dict({**yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text()),
                                     "runs_dir": str(tmp_path / "runs"),
                                     "judge": {"base_url": server.base_url, "api_key_env": "",
                                               "max_retries": 0},
                                     "judge_agreement": {"n_generations": 4, "n_latents": 2,
                                                         "n_saes": 2, "backend": "openai"}},
                                    name="smoke")
        window = {"token_ids": [1, 2, 3], "acts": [0.0, 5.0, 0.0]}
        truth = [False, True, False, False, True, False, True, True]  # 2, 5, 7 right; 8 missed
        for k, job in enumerate(stages.sae_jobs(profile)[:3]):
            rows = [{"latent": lat, "max_act": 5.0, "explanation": f"rule words {k} {lat}", "score": 0.5,
                     "in_concept100": True, "predictions": [0], "truth": truth,
                     "explain_windows": [window] * 3, "score_windows": [window] * len(truth)}
                    for lat in (10, 20)]
            (stages.sae_dir(profile, job) / stages.interp.INTERP_ROWS).write_text(
                "".join(json.dumps(r) + "\n" for r in rows))
        record = judge.run(profile, progress=False)
        assert record["n_latents"] == 2 and {it["sae"] for it in record["latent_items"]} == set(record["saes"])
        for it in record["latent_items"]:
            assert it["llm_predictions"] == [1, 4, 6]
            assert it["llm_score"] == pytest.approx(7 / 8) and it["rule_score"] == 0.5
            assert it["llm_explanation"] == "words about cats and dogs"
            assert it["llm_predictions_given_rule_explanation"] == [1, 4, 6]
        lat = record["latents"]
        assert lat["detection"]["n_windows"] == 16
        assert lat["mean_llm_score_given_rule_explanation"] == pytest.approx(7 / 8)
        # the server always answers "2, 5, 7", the prompt's own example: counted as such
        assert lat["answers"]["llm"] == {"every_window": 0, "no_window": 0, "the_prompts_example": 2}
        assert lat["answers"]["llm_given_rule_explanation"]["the_prompts_example"] == 2
        assert lat["answers"]["rule"] == {"every_window": 0, "no_window": 0, "the_prompts_example": 0}
        assert lat["constant_answer_score"] == {"every_window": 0.5, "no_window": 0.5}
        detect = [m for m in server.requests if "numbered text excerpts" in json.dumps(m)]
        assert sum("rule words" in json.dumps(m) for m in detect) == 2, "one per latent from the rule explanation"
        assert sum("cats and dogs" in json.dumps(m) for m in detect) == 1, "the same request is asked once"
        assert all(p["mu_llm"] == pytest.approx(7 / 8) for p in record["per_sae"])
    finally:
        server.close()


def test_answers_that_ignore_the_text_are_counted_by_kind():
    """Every window, none, or exactly the prompt's example ("2, 5, 7" → indices 1, 4, 6; with 4
    windows "2" → index 1); any other answer is none of these."""
    items = [{"truth": [True] * 8, "p": list(range(8))}, {"truth": [False] * 8, "p": []},
             {"truth": [True] * 8, "p": [6, 4, 1]}, {"truth": [True] * 4, "p": [1]},
             {"truth": [True] * 8, "p": [1, 4]}]
    assert judge.answer_kinds(items, "p") == {"every_window": 1, "no_window": 1, "the_prompts_example": 2}


def _latents(llm: float, given_rule: float, fired: float = 0.4) -> dict:
    kinds = {"every_window": 3, "no_window": 2, "the_prompts_example": 1}
    return {"n": 10, "mean_rule_score": 0.66, "mean_llm_score": llm,
            "mean_llm_score_given_rule_explanation": given_rule,
            "constant_answer_score": {"every_window": fired, "no_window": 1 - fired},
            "answers": {"rule": kinds, "llm": kinds, "llm_given_rule_explanation": kinds},
            "score": {"kendall_tau_b": 0.1, "n": 10},
            "detection": {"exact_match": 0.5, "kappa": 0.0, "n_windows": 140}}


def test_the_latents_text_says_when_the_llm_detects_no_better_than_a_constant_answer():
    text = report.judge_latents_text(_latents(0.50, 0.53))
    assert "none fires" in text and "0.600" in text
    assert "3 name every window, 2 none, 1 exactly the prompt's example (of 10)" in text
    assert "measures nothing" in text
    weak = report.judge_latents_text(_latents(0.55, 0.75))
    assert "measures nothing" not in weak and "its explanations are the weak link" in weak
    good = report.judge_latents_text(_latents(0.80, 0.85))
    assert "measures nothing" not in good and "weak link" not in good
    old = {k: v for k, v in _latents(0.5, 0.5).items()
           if k not in ("constant_answer_score", "answers", "mean_llm_score_given_rule_explanation")}
    assert report.judge_latents_text(old).startswith("10 latents: mean score 0.660 (rules) vs 0.500")
