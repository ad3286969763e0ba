"""The grid's scheduling rules, with notebook execution replaced by a recorder (no papermill)."""

from __future__ import annotations

import json

import pytest
import yaml

from saelib import grid, stages
from saelib.profiles import PARAMS_DIR, profile_from_dict

from conftest import training_provenance


def _profile(tmp_path, **grid_overrides):
    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["runs_dir"] = str(tmp_path)
    data["grid"].update(grid_overrides)
    return profile_from_dict(data, name="smoke")


def test_jobs_form_a_dag_in_order(tmp_path):
    profile = _profile(tmp_path, targets=[10, 20], l1={"standard": [0.02, 0.01], "gated": [0.02, 0.01]})
    jobs = grid.build_jobs(profile)
    names = [j.name for j in jobs]
    assert len([j for j in jobs if j.stage == "train"]) == 5 * 2
    assert len([j for j in jobs if j.stage == "capture"]) == 1
    assert len([j for j in jobs if j.stage == "steering"]) == 5 * 2
    assert len([j for j in jobs if j.stage == "selection"]) == 5 * 2
    for i, job in enumerate(jobs):
        for dep in job.deps:
            assert names.index(dep) < i, f"{job.name} runs before its dependency {dep}"


def test_progress_is_weighted_by_the_plan(tmp_path, monkeypatch):
    """The bar counts planned seconds: the capture (alone, every core) weighs its stage's whole
    plan, a per-SAE job its stage's share over the workers; a profile the plan cannot count
    weighs every job alike."""
    from saelib import plan

    profile = _profile(tmp_path)
    jobs = {j.name: j for j in grid.build_jobs(profile)}
    stage_s = {s.stage: s.seconds for s in plan.build_plan(profile).stages}
    weights = grid.planned_weights(profile, jobs, workers=2)
    assert weights["capture-smollm2-135m-instruct"] == pytest.approx(stage_s["capture"])
    assert weights["train-smollm2-135m-instruct-topk-s0"] == pytest.approx(stage_s["train"] / 5 / 2)
    assert weights["observations"] == weights["analysis"] == pytest.approx(stage_s["analysis"] / 2 / 2)
    assert sum(weights.values()) == pytest.approx(plan.build_plan(profile).wall_seconds)

    def no_plan(*a, **k):
        raise KeyError("no shape for this model")

    line = grid.plan_line(profile)
    assert line.startswith("grid smoke: planned ") and "--profile smoke" in line
    monkeypatch.setattr(plan, "build_plan", no_plan)
    assert set(grid.planned_weights(profile, jobs, workers=2).values()) == {1.0}
    assert grid.plan_line(profile) is None


def test_a_skipped_job_leaves_the_bars_total_and_a_run_one_advances_it():
    import io

    out = io.StringIO()
    bar = grid.WorkBar({"capture": 300.0, "train-a": 20.0, "train-b": 20.0}, desc="grid x", file=out)
    bar.skip("capture")  # done in an earlier run: its work is not this run's
    assert bar.bar.total == pytest.approx(40.0) and bar.bar.n == 0
    bar.ran("train-a")
    assert bar.bar.n == pytest.approx(20.0) and bar.done == 2
    bar.ran("train-b")
    bar.close()
    assert "3/3 jobs" in out.getvalue() and "100%" in out.getvalue()


def test_failure_blocks_dependants_only_and_resume_skips_done(tmp_path, monkeypatch):
    """Through the real Dask LocalCluster. Dask pickles each task, so the fake job records what it
    ran in a file (a closure's list would be a copy), and a job is done when its marker exists. A
    failed job's traceback stays while it fails and goes once it succeeds."""
    profile = _profile(tmp_path)
    monkeypatch.setattr(stages.capture, "prepare", lambda p: {})
    log = tmp_path / "ran.txt"
    marks = tmp_path / "done"
    marks.mkdir()

    def fake_run(profile_, job):
        with open(log, "a") as f:
            f.write(job.name + "\n")
        if job.name.endswith("gated-s0") and (tmp_path / "fail").exists():
            raise RuntimeError("boom")
        job.output(profile_).parent.mkdir(parents=True, exist_ok=True)
        job.output(profile_).write_text("{}")
        (marks / job.name).touch()

    def ran() -> list[str]:
        return log.read_text().split() if log.exists() else []

    monkeypatch.setattr(grid, "run_notebook", fake_run)
    original = grid.build_jobs

    def jobs_with_fake_done(p, capture_threads=None):
        jobs = original(p, capture_threads)
        for j in jobs:
            j.done = (lambda name=j.name: (marks / name).exists())
        return jobs

    monkeypatch.setattr(grid, "build_jobs", jobs_with_fake_done)
    (tmp_path / "fail").touch()
    report = grid.run_grid(profile, progress=False, workers=2)
    assert list(report.failed) == ["train-smollm2-135m-instruct-gated-s0"]
    assert "boom" in report.failed["train-smollm2-135m-instruct-gated-s0"]
    assert report.blocked == ["interp-smollm2-135m-instruct-gated-s0",
                              "steering-smollm2-135m-instruct-gated-s0",
                              "selection-smollm2-135m-instruct-gated-s0", "judge", "analysis",
                              "observations"]
    assert len(report.ran) == 17  # capture + 4 trains and their interp, steering, selection; the rest blocked
    assert sorted(ran()) == sorted([*report.ran, "train-smollm2-135m-instruct-gated-s0"])
    error_file = grid.executed_dir(profile) / "train" / "train-smollm2-135m-instruct-gated-s0.error.txt"
    assert "RuntimeError: boom" in error_file.read_text()
    assert "dask LocalCluster(2)" == json.loads((profile.run_root() / "grid.json").read_text())["engine"]

    log.unlink()
    report2 = grid.run_grid(profile, progress=False)
    assert ran() == ["train-smollm2-135m-instruct-gated-s0"], "a rerun must redo only the unfinished job"
    assert len(report2.skipped) == 17
    assert error_file.exists(), "a job that fails again keeps its traceback"

    (tmp_path / "fail").unlink()
    report3 = grid.run_grid(profile, progress=False)
    assert report3.ok and "train-smollm2-135m-instruct-gated-s0" in report3.ran
    assert not error_file.exists(), "a job that now succeeds leaves no stale traceback"


def test_the_summary_notebooks_read_this_runs_job_times(tmp_path, monkeypatch):
    """grid.json is rewritten after every job, so the analysis notebook (a job of the run,
    among its last) finds the measured seconds of every job that ran before it; a fresh run's
    book showed none when the record was written at the end only."""
    profile = _profile(tmp_path)
    monkeypatch.setattr(stages.capture, "prepare", lambda p: {})
    log, seen = tmp_path / "ran.txt", tmp_path / "seen-by-analysis.json"

    def fake_run(profile_, job):
        if job.name == "analysis":
            seen.write_text((profile_.run_root() / "grid.json").read_text())
        with open(log, "a") as f:
            f.write(job.name + "\n")
        job.output(profile_).parent.mkdir(parents=True, exist_ok=True)
        job.output(profile_).write_text("{}")

    monkeypatch.setattr(grid, "run_notebook", fake_run)
    report = grid.run_grid(profile, progress=False, workers=1)
    assert report.ok
    before = log.read_text().split()
    before = before[:before.index("analysis")]
    record = json.loads(seen.read_text())
    assert record["finished"] is False
    assert sorted(record["job_seconds"]) == sorted(before) and len(before) > 20
    assert set(record["job_stages"]) == {j.name for j in grid.build_jobs(profile)}
    final = json.loads((profile.run_root() / "grid.json").read_text())
    assert final["finished"] is True and sorted(final["job_seconds"]) == sorted(report.ran)

    from saelib import plan, report as book_report

    measured = book_report.grid_seconds(profile).set_index("stage")["seconds"].to_dict()
    table = plan.plan_vs_measured(plan.build_plan(profile), measured).set_index("stage")
    assert table["measured s"].notna().sum() >= 5
    last = table.loc["all measured stages"]
    assert last["measured s"] == pytest.approx(sum(final["job_seconds"].values()))
    assert last["measured / planned"] == pytest.approx(last["measured s"] / last["planned s"])


def test_plan_against_no_measurement_has_no_ratio():
    from saelib import plan
    from saelib.profiles import load_profile

    p = plan.build_plan(load_profile("smoke"))
    table = plan.plan_vs_measured(p, {}).set_index("stage")
    assert table["measured s"].isna().all() and table["measured / planned"].isna().all()
    assert table.loc["all", "planned s"] == pytest.approx(p.seconds)
    half = plan.plan_vs_measured(p, {"train": 10.0, "observations": 1.0, "analysis": 2.0}).set_index("stage")
    assert half.loc["analysis", "measured s"] == 3.0, "both summary notebooks count as analysis"
    planned = half.loc["train", "planned s"] + half.loc["analysis", "planned s"]
    assert half.loc["all measured stages", "planned s"] == pytest.approx(planned)
    assert half.loc["all measured stages", "measured s"] == 13.0


def test_the_grid_runs_on_a_running_scheduler_by_address(tmp_path, monkeypatch):
    """``--scheduler tcp://…``: the same grid on an already running Dask cluster (here a local
    one; dask-jobqueue's SLURMCluster hands out such an address too)."""
    from distributed import LocalCluster

    profile = _profile(tmp_path)
    monkeypatch.setattr(stages.capture, "prepare", lambda p: {})
    marks = tmp_path / "done"
    marks.mkdir()

    def fake_run(profile_, job):
        job.output(profile_).parent.mkdir(parents=True, exist_ok=True)
        job.output(profile_).write_text("{}")
        (marks / job.name).touch()

    monkeypatch.setattr(grid, "run_notebook", fake_run)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                      scheduler_port=0, protocol="tcp") as cluster:
        report = grid.run_grid(profile, progress=False, scheduler=cluster.scheduler_address)
    assert report.ok and len(report.ran) == len(grid.build_jobs(profile))
    assert sorted(p.name for p in marks.iterdir()) == sorted(report.ran)
    engine = json.loads((profile.run_root() / "grid.json").read_text())["engine"]
    assert engine == f"dask {cluster.scheduler_address}"


def test_an_sae_whose_knob_was_chosen_another_way_is_trained_again(tmp_path):
    """train_done holds only when the saved SAE's sparsity knob was chosen as the profile now asks:
    with calibration on, ReLU, Gated and JumpReLU are calibrated; TopK/BatchTopK use k."""
    calibrated = _profile(tmp_path / "a", calibrate=True)
    fixed = _profile(tmp_path / "b", calibrate=False)
    expect = {"standard": "calibrated", "gated": "calibrated", "jumprelu": "calibrated",
              "topk": "k", "batchtopk": "k"}
    for job in stages.sae_jobs(calibrated):
        assert stages.train.sparsity_method(calibrated, job) == expect[job.arch]
    assert {j.arch: stages.train.sparsity_method(fixed, j) for j in stages.sae_jobs(fixed)} == {
        "standard": "profile l1 (uncalibrated)", "gated": "profile l1 (uncalibrated)",
        "jumprelu": "l0_target", "topk": "k", "batchtopk": "k"}
    job = next(j for j in stages.sae_jobs(calibrated) if j.arch == "jumprelu")
    out = stages.sae_dir(calibrated, job)
    (out / "sae").mkdir(parents=True)
    (out / "sae" / stages.layout.SAE_WEIGHTS).write_bytes(b"weights")
    (out / stages.layout.RESULT).write_text(json.dumps({"train": {}, "sparsity_method": {"method": "l0_target"},
                                                        "provenance": training_provenance(calibrated)}))
    assert not stages.train.done(calibrated, job)  # trained before JumpReLU was calibrated
    record = {"train": {}, "sparsity_method": {"method": "calibrated"},
              "provenance": training_provenance(calibrated)}
    (out / stages.layout.RESULT).write_text(json.dumps(record))
    assert stages.train.done(calibrated, job)
    # trained with other training settings (e.g. before JumpReLU's training changed): again
    record["provenance"]["config"]["training"]["jumprelu_ste_to_input"] = True
    (out / stages.layout.RESULT).write_text(json.dumps(record))
    assert not stages.train.done(calibrated, job)
    record["provenance"]["config"]["training"].update(jumprelu_ste_to_input=False, progress=True,
                                                      sparse_decode=False)
    (out / stages.layout.RESULT).write_text(json.dumps(record))
    assert stages.train.done(calibrated, job)  # settings that change nothing trained


def test_a_truncated_result_file_is_named_and_its_sae_recomputed(tmp_path, capsys):
    """A result.json cut short (a crash mid-copy, a full disk) must not crash the grid's done
    checks: the SAE counts as not trained, so every stage of it runs again, and stderr names it."""
    profile = _profile(tmp_path, calibrate=True)
    job = next(j for j in stages.sae_jobs(profile) if j.arch == "topk")
    out = stages.sae_dir(profile, job)
    (out / "sae").mkdir(parents=True)
    (out / "sae" / stages.layout.SAE_WEIGHTS).write_bytes(b"weights")
    good = json.dumps({"train": {"l0": 10}, "sparsity_method": {"method": "k"},
                       "provenance": training_provenance(profile)})
    (out / stages.layout.RESULT).write_text(good)
    assert stages.train.done(profile, job)
    (out / stages.layout.RESULT).write_text(good[: len(good) // 2])
    assert not stages.train.done(profile, job)
    assert not stages.interp.autointerp_done(profile, job) and not stages.steering.done(profile, job)
    assert str(out / stages.layout.RESULT) in capsys.readouterr().err


def test_sae_weights_that_differ_from_their_recorded_checksum_are_trained_again(tmp_path, capsys):
    """The train record keeps the weights' sha256: a truncated or replaced safetensors file makes
    the SAE not done (named on stderr), so the grid retrains it instead of evaluating bad weights."""
    from saelib.results import sha256_file

    profile = _profile(tmp_path, calibrate=True)
    job = next(j for j in stages.sae_jobs(profile) if j.arch == "topk")
    weights = stages.sae_dir(profile, job) / "sae" / stages.layout.SAE_WEIGHTS
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights" * 100)
    record = {"train": {"l0": 10, "sae_sha256": sha256_file(weights)}, "sparsity_method": {"method": "k"},
              "provenance": training_provenance(profile)}
    (weights.parent.parent / stages.layout.RESULT).write_text(json.dumps(record))
    assert stages.train.done(profile, job)
    weights.write_bytes(b"weights" * 50)
    assert not stages.train.done(profile, job)
    assert str(weights) in capsys.readouterr().err
    weights.unlink()
    assert not stages.train.done(profile, job)


def test_concurrent_jobs_each_run_in_their_own_folder(tmp_path, monkeypatch):
    """Two notebooks started together by the in-process Dask workers: each kernel's working
    directory is its own job's folder (found by the default grid, where the key-observations JSON
    landed in the analysis folder while both summaries ran at once)."""
    import threading

    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("name = ''", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os, time\ntime.sleep(0.5)\n"
                                          "open(name + '.txt', 'w').write(os.getcwd())")]
    nb.metadata = {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"},
                   "language_info": {"name": "python"}}
    monkeypatch.setattr(grid, "NOTEBOOKS", tmp_path / "nbs")
    (tmp_path / "nbs").mkdir()
    for stage in ("alpha", "beta"):
        nbformat.write(nb, str(tmp_path / "nbs" / f"{stage}.ipynb"))
    profile = _profile(tmp_path / "runs", calibrate=False)
    jobs = [grid.Job(stage, stage, {"name": stage}, lambda: False) for stage in ("alpha", "beta")]
    errors = []

    def run(job):
        try:
            grid.run_notebook(profile, job)
        except Exception as e:  # a thread's exception would vanish; keep it for the assert
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for j in jobs:
        folder = j.output(profile).parent
        assert (folder / f"{j.name}.txt").read_text() == str(folder)
        assert j.output(profile).exists()


def test_kernels_keep_their_temporary_files_in_a_folder_the_grid_removes(tmp_path, monkeypatch):
    """A kernel is killed after its last cell, so what it would remove at exit stays (wandb's two
    folders per process, found as ~240 leftovers in /tmp per default grid): the grid points the
    kernels' TMPDIR at a folder of its own and removes it with what the kernels left."""
    import os

    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import tempfile\n"
                                          "open('tmp.txt', 'w').write(tempfile.mkdtemp())")]
    nb.metadata = {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"},
                   "language_info": {"name": "python"}}
    monkeypatch.setattr(grid, "NOTEBOOKS", tmp_path / "nbs")
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, str(tmp_path / "nbs" / "alpha.ipynb"))
    profile = _profile(tmp_path / "runs", calibrate=False)
    monkeypatch.setattr(stages.capture, "prepare", lambda p: {})
    job = grid.Job("alpha", "alpha", {}, lambda: False)
    monkeypatch.setattr(grid, "build_jobs", lambda p, capture_threads=None: [job])
    monkeypatch.setenv("TMPDIR", str(tmp_path / "system-tmp"))
    assert grid.run_grid(profile, progress=False).ran == ["alpha"]
    left = (job.output(profile).parent / "tmp.txt").read_text()
    assert left.startswith(str(profile.run_root() / grid.KERNEL_TMP) + os.sep)
    assert not (profile.run_root() / grid.KERNEL_TMP).exists()
    assert os.environ["TMPDIR"] == str(tmp_path / "system-tmp")


def test_a_jsonl_log_cut_at_a_line_boundary_is_caught_by_its_checksum(tmp_path, capsys):
    """A stage's rows file (here AutoInterp's JSONL) that lost its last lines still parses; the
    checksum its result block recorded makes the stage not done, so the grid recomputes it."""
    from saelib.results import sha256_file, write_jsonl

    profile = _profile(tmp_path, calibrate=True)
    job = next(j for j in stages.sae_jobs(profile) if j.arch == "topk")
    out = stages.sae_dir(profile, job)
    weights = out / "sae" / stages.layout.SAE_WEIGHTS
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    (out / stages.layout.RESULT).write_text(json.dumps(
        {"train": {"sae_sha256": sha256_file(weights)}, "sparsity_method": {"method": "k"},
         "provenance": training_provenance(profile)}))
    rows = out / stages.interp.INTERP_ROWS
    write_jsonl(rows, [{"latent": i, "score": 0.5} for i in range(5)])
    settings = {"interp": {"n": 1}}
    body = {"mu": 0.5, "mean_score_all": 0.5, "width": 5, "n_live": 5, "n_rare": 0, "n_scored": 5,
            "n_concept100": 5, "concept100": list(range(5)), "partial": False, "reason": None,
            "timings_s": {}, "judge": "offline", "judge_usage": {}, "config": {}, "eval_tokens": 10,
            "rows_file": stages.interp.INTERP_ROWS}
    stages.records.finish_block(profile, job, stages.interp.InterpRecord, body, settings, 0,
                                {"autointerp": 1.0})
    assert stages.records.block_is_current(profile, job, stages.interp.InterpRecord, settings)
    lines = rows.read_text().splitlines(keepends=True)
    rows.write_text("".join(lines[:3]))
    assert not stages.records.block_is_current(profile, job, stages.interp.InterpRecord, settings)
    assert str(rows) in capsys.readouterr().err


def test_capture_jobs_get_the_machines_cores_and_give_them_back(tmp_path, monkeypatch):
    """Captures are the DAG's roots and run alone: with 2 workers each kernel has half the cores
    (share_cores), so the grid hands the capture kernel all of them (none on a remote scheduler,
    whose workers' cores are not this machine's), and run_capture restores torch's threads."""
    import torch

    profile = _profile(tmp_path)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert grid.capture_threads(profile, workers=2) == 8  # one model: every core
    assert grid.capture_threads(profile, workers=1) is None
    assert grid.capture_threads(profile, workers=2, scheduler="tcp://h:8786") is None
    captures = [j for j in grid.build_jobs(profile, capture_threads=8) if j.stage == "capture"]
    assert [j.parameters["threads"] for j in captures] == [8]
    assert all("threads" not in j.parameters for j in grid.build_jobs(profile))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.raises(Exception):
            stages.capture.run(profile, "no-such-model", progress=False, threads=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
