"""End to end on the smoke profile: papermill grid, resume, and the Jupyter Book build.

The real packaged SmolLM2-135M-Instruct and corpus, the five architectures once each (protocol §2),
in a temporary run folder: ``$SAELIB_RUNS`` moves ``runs_dir``, and since the papermill kernels
inherit the environment, the notebooks (which reload the profile by name) write there too.
"""

from __future__ import annotations

import json
import math

import nbformat
import pytest

from saelib import book, power
from saelib import stages as pipeline_stages
from saelib.grid import build_jobs, executed_dir, run_grid, run_notebook
from saelib.models import model_slug
from saelib.profiles import PAPER_ARCHITECTURES, PARAMS_DIR, RUNS_ENV, load_profile
from saelib.results import read_jsonl

from browser import browser_or_skip  # tests/browser.py (pytest puts tests/ on sys.path)
from secrets_util import CANARY, files_containing

pytestmark = pytest.mark.slow


def error_outputs(path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [f"{o.get('ename')}: {o.get('evalue')}" for cell in nb.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]


def repo_grid_record_state():
    """(exists, mtime) of the smoke grid record in the repository's own ``runs/``."""
    path = PARAMS_DIR.parent / load_profile("smoke").runs_dir / "smoke" / "grid.json"
    return (path.exists(), path.stat().st_mtime_ns if path.exists() else None)


def test_smoke_grid_runs_resumes_and_builds_the_book(tmp_path, monkeypatch):
    untouched = repo_grid_record_state()
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)  # planted: must reach no artefact (end of test)
    profile = load_profile("smoke")
    root = profile.run_root()
    assert root == tmp_path / "smoke"
    jobs = build_jobs(profile)
    stages = [j.stage for j in jobs]
    assert {s: stages.count(s) for s in set(stages)} == {"capture": 1, "train": 5, "interp": 5, "steering": 5, "selection": 5,
                                                         "judge": 1, "analysis": 1, "observations": 1}

    report = run_grid(profile, progress=False, workers=2)  # as `make book`: two kernels at a time
    assert report.failed == {} and report.blocked == [] and report.ok
    assert sorted(report.ran) == sorted(j.name for j in jobs)
    print("smoke grid seconds:", {k: round(v, 1) for k, v in report.seconds.items()})

    model_root = pipeline_stages.layout.model_dir(profile, profile.models[0])
    streamed = json.loads((model_root / "capture.json").read_text())
    assert [p.name for p in (model_root / "activations").iterdir()] == ["eval"]
    assert streamed["splits"]["train"]["cells"] == 5 and streamed["splits"]["train"]["rounds"] >= 1
    assert streamed["splits"]["train"]["forward_contexts"] == (
        streamed["splits"]["train"]["rounds"] * streamed["splits"]["train"]["contexts"])

    results = pipeline_stages.analysis.load_results(profile)
    assert sorted(r["arch"] for r in results) == sorted(PAPER_ARCHITECTURES)
    for r in results:
        core = r["core"]
        assert core["l0"] > 0, r["arch"]
        assert math.isfinite(core["explained_variance"]) and math.isfinite(core["mse"]), r["arch"]
        assert r["provenance"]["seed"] == profile.seed and r["provenance"]["profile"] == "smoke"
        job = pipeline_stages.SAEJob(r["model"], r["arch"], r["level"])
        saved = json.loads((pipeline_stages.sae_dir(profile, job) / "sae" / "cfg.json").read_text())["metadata"]
        assert saved["hook_name"] == f"blocks.{r['layer']}.hook_resid_post", r["arch"]
        assert saved["model_name"] == r["model"] and saved["saelib_arch"], r["arch"]
        # ReLU/Gated/JumpReLU keep their calibration's best probe (no second training)
        assert r["sparsity_method"].get("final_from_probe", False) == (
            r["sparsity_method"]["method"] == "calibrated"), r["arch"]
        # streaming mode (params/smoke.yaml): the capture job trained every SAE from one stream
        assert r["sparsity_method"]["streamed"] and r["train"]["n_steps"] > 0, r["arch"]
        # ...and calibration put every ReLU / Gated / JumpReLU SAE in the ±25 % band at this size
        if r["sparsity_method"]["method"] == "calibrated":
            trace = r["sparsity_method"]["trace"]
            assert trace["band"] == pytest.approx([0.75 * r["target_l0"], 1.25 * r["target_l0"]])
            assert trace["within_band"] and trace["band"][0] <= trace["realised_l0"] <= \
                trace["band"][1], (r["arch"], trace)
            assert trace["realised_l0"] == pytest.approx(core["l0"], rel=0.25), r["arch"]
        steer = r["steering"]
        assert steer["g"] is not None and 0 <= steer["g"] <= 2, r["arch"]
        rows = read_jsonl(pipeline_stages.sae_dir(profile, pipeline_stages.SAEJob(r["model"], r["arch"], r["level"]))
                          / pipeline_stages.steering.STEER_ROWS)
        n_factors = len(profile.steering["factors"])
        n_select = profile.steering["n_select"]  # selection at every factor, held out at α*
        assert len(rows) == steer["n_concepts"] * (n_select * n_factors + 4 - n_select) \
            and steer["n_concepts"] >= 1, r["arch"]
        assert {row["split"] for row in rows} == {"select", "heldout"}
        sel = r["selection"]
        assert sel["n_features"] == profile.grid.width and math.isfinite(sel["delta_conf"]["std"])
        assert sel["delta_conf"]["min"] < sel["delta_conf"]["max"], r["arch"]
        names = {t["name"] for t in sel["tiers"]}
        assert {"dC_pos_top1", "dC_neg_top1", "outscore_top1"} <= names, names
        assert sel["paper"]["tier"] in names and sel["honest"]["tier"] in names
        assert sel["paper"]["g_delta_conf"] >= sel["honest"]["g_delta_conf"]  # the oracle pick
        desc = r["descriptive"]  # SAEBench's metrics from the same notebook as AutoInterp
        assert 0 <= desc["dense_fraction"] <= 1 and desc["probing_sets"] == 2, r["arch"]
        for key, acc in desc["probing"].items():
            assert 0 <= acc <= 1, (r["arch"], key)
        assert desc["absorption_partial"] or 0 <= desc["absorption_fraction"] <= 1, r["arch"]
        assert set(desc["not_computed"]) == {"SCR", "RAVEL"}
        print(f"{r['arch']:10s} L0 {core['l0']:7.2f}  EV {core['explained_variance']:.3f}  "
              f"CE rec {core['ce_loss_recovered']:.3f}  mu {r['interp']['mu']:.3f}  g {steer['g']:.3f}")
    for job in jobs:
        out = job.output(profile)
        assert out.exists(), out
        assert error_outputs(out) == [], out
    assert not list(executed_dir(profile).rglob("*.error.txt"))
    assert repo_grid_record_state() == untouched  # nothing was written to the repository's runs/
    grid_record = json.loads((root / "grid.json").read_text())
    assert grid_record["failed"] == {} and grid_record["finished"] is True
    # grid.json is rewritten after every job, so a fresh run's summary sees this run's times
    first_analysis = nbformat.read({j.name: j for j in jobs}["analysis"].output(profile), as_version=4)
    outputs = json.dumps([c.get("outputs", []) for c in first_analysis.cells])
    assert "all measured stages" in outputs, "the plan's table shows no measured stage"
    # and the shipped CPU profiles at the rates this run measured
    assert "cpu-2core at this run's rates" in outputs

    # The grid ran the per-SAE notebooks on warm kernels (saelib.warm); on a fresh kernel, one
    # SAE's AutoInterp and steering notebooks write the same bytes (the unsteered answers, shared
    # by the SAEs of a model, are reused from the grid's cache, as in any later job).
    sae_job = pipeline_stages.SAEJob(profile.models[0].name, "standard", 0)
    folder = pipeline_stages.sae_dir(profile, sae_job)
    rows = [pipeline_stages.interp.INTERP_ROWS, pipeline_stages.steering.STEER_ROWS]
    warm_bytes = {name: (folder / name).read_bytes() for name in rows}
    by_name = {j.name: j for j in jobs}
    for stage, name in zip(("interp", "steering"), rows):
        (folder / name).unlink()
        job = by_name[f"{stage}-{model_slug(sae_job.model)}-{sae_job.name}"]
        assert job.warm and not job.done()
        run_notebook(profile, job)  # outside a grid run: no pool, so a fresh kernel
        assert job.done() and (folder / name).read_bytes() == warm_bytes[name], stage

    again = run_grid(profile, progress=False)
    assert again.ok
    summaries = ["analysis", "observations"]
    assert sorted(again.skipped) == sorted(j.name for j in jobs if j.stage not in summaries)
    assert sorted(again.ran) == summaries  # the summaries are always re-rendered
    assert [r["train"] for r in pipeline_stages.analysis.load_results(profile)] == [r["train"] for r in results]

    index = book.build(profile)
    assert index.exists() and index.name == "index.html"
    summary = index.parent / "book" / "executed" / "analysis" / "analysis.html"
    html = summary.read_text()
    for arch in PAPER_ARCHITECTURES:
        assert arch in html, f"{arch} missing from the summary page"
    for stage in ("train", "interp", "steering", "selection"):
        assert len(list((index.parent / "book" / "executed" / stage).glob("*.html"))) == 5, stage
    verdicts = json.loads((root / "executed" / "observations" / "key_observations.json").read_text())
    assert [o["observation"] for o in verdicts["observations"]] == [1, 2, 2, 3]
    assert all(o["verdict"] in {"reproduces", "contradicted", "inconclusive (underpowered)", "no data"}
               for o in verdicts["observations"])
    observations_html = (index.parent / "book" / "executed" / "observations" / "observations.html").read_text()
    assert "Key observations" in observations_html and "Power: what this run" in observations_html
    powered = json.loads((root / "executed" / "observations" / "steering_power.json").read_text())
    assert powered["saes"] == 5 and 0 <= powered["g_positive"] <= 5
    assert powered["saes_to_detect_paper_tau_noise_free"] == power.saes_to_detect(power.PAPER_POOLED_TAU)
    assert "the bootstrap interval over concepts excludes 0" in observations_html
    # The judge job: the packaged 1.5B model through llama.cpp re-judged the smoke sample.
    judged = json.loads((root / "judge.json").read_text())
    assert judged["n_generations"] == profile.judge_agreement["n_generations"]
    assert judged["n_latents"] == profile.judge_agreement["n_latents"]
    assert judged["judge_b"].startswith("llama") and judged["judge_usage"]["requests"] > 0
    for kind in ("concept", "instruction", "fluency"):
        conf = judged["ratings"][kind]["confusion"]
        assert sum(map(sum, conf)) == judged["n_generations"], kind
    assert {p["sae"] for p in judged["per_sae"]} == set(judged["saes"]) and len(judged["saes"]) == 2
    judge_html = (index.parent / "book" / "executed" / "judge" / "judge.html").read_text()
    for heading in ("Judge agreement", "μ and g under both judges", "Apache-2.0",
                    "A constant answer scores"):
        assert heading in judge_html, heading
    analysis_html = summary.read_text()
    for heading in ("Appendix: costs and runtimes", "Appendix: the cost plan", "Appendix: parameter shapes",
                    "SAEBench metrics across L0", "How sure is each g(θ)?",
                    "Feature pages: the latents behind g(θ)"):
        assert heading in analysis_html, heading

    # Secrets: the key planted in the environment is in no executed notebook, result, log or page.
    assert files_containing(root, CANARY) == []
    assert files_containing(index.parent, CANARY) == []

    # A real browser: every page of the smoke book, served on 127.0.0.1, loads in headless
    # Chromium with no missing image, broken internal link, script error or traceback. Last, as
    # without Chromium (outside CI) it skips.
    from saelib.browsercheck import check_book

    chromium = browser_or_skip()
    report = check_book(index.parent, chromium=chromium)
    assert report.ok, "\n".join(report.problems)
    assert len(report.pages) >= 22 and sum(p.images for p in report.pages) >= 5
