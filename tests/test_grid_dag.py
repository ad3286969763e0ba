"""The grid's scheduling rules, with notebook execution replaced by a recorder (no papermill)."""

from __future__ import annotations

import yaml

from saelib import grid, pipeline
from saelib.profiles import PARAMS_DIR, profile_from_dict


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
    assert len([j for j in jobs if j.stage == "steer"]) == 5 * 2
    assert len([j for j in jobs if j.stage == "select"]) == 5 * 2
    for i, job in enumerate(jobs):
        for dep in job.deps:
            assert names.index(dep) < i, f"{job.name} runs before its dependency {dep}"


def test_failure_blocks_dependants_only_and_resume_skips_done(tmp_path, monkeypatch):
    profile = _profile(tmp_path)
    monkeypatch.setattr(pipeline, "prepare", lambda p: {})
    ran: list[str] = []
    done: set[str] = set()

    def fake_run(profile_, job):
        ran.append(job.name)
        if job.name.endswith("gated-s0"):
            raise RuntimeError("boom")
        job.output(profile_).parent.mkdir(parents=True, exist_ok=True)
        job.output(profile_).write_text("{}")
        done.add(job.name)

    monkeypatch.setattr(grid, "run_notebook", fake_run)
    original = grid.build_jobs

    def jobs_with_fake_done(p):
        jobs = original(p)
        for j in jobs:
            j.done = (lambda name=j.name: name in done)
        return jobs

    monkeypatch.setattr(grid, "build_jobs", jobs_with_fake_done)
    report = grid.run_grid(profile, progress=False)
    assert list(report.failed) == ["smollm2-135m-instruct-gated-s0"]
    assert "boom" in report.failed["smollm2-135m-instruct-gated-s0"]
    assert report.blocked == ["interp-smollm2-135m-instruct-gated-s0",
                              "steer-smollm2-135m-instruct-gated-s0",
                              "select-smollm2-135m-instruct-gated-s0", "analysis"]
    assert len(report.ran) == 17  # capture + 4 trains and their interp, steer, select; the rest blocked
    error_file = grid.executed_dir(profile) / "train" / "smollm2-135m-instruct-gated-s0.error.txt"
    assert "RuntimeError: boom" in error_file.read_text()

    ran.clear()
    report2 = grid.run_grid(profile, progress=False)
    assert ran == ["smollm2-135m-instruct-gated-s0"], "a rerun must redo only the unfinished job"
    assert len(report2.skipped) == 17
