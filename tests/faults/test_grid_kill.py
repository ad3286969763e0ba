"""Killing the grid (SIGKILL) mid-run and rerunning it: the rerun finishes the grid and redoes no
job that had finished. The real scheduler (saelib.grid.run_grid on a Dask LocalCluster with two
workers) in a child process; each notebook execution is replaced by a short fake job that writes
its output atomically, so the kill can land at any point of the DAG within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

RUNNER = textwrap.dedent('''
    import os, sys, time, random
    from pathlib import Path
    import yaml
    from saelib import grid, stages
    from saelib.profiles import PARAMS_DIR, profile_from_dict

    root = Path(sys.argv[1])
    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["runs_dir"] = str(root)
    data["grid"].update(targets=[10, 20], l1={"standard": [0.02, 0.01], "gated": [0.02, 0.01]})
    profile = profile_from_dict(data, name="smoke")
    marks = root / "done"
    marks.mkdir(exist_ok=True)
    stages.capture.prepare = lambda p: {}

    def fake_run(profile_, job):
        with open(root / "started.txt", "a") as f:
            f.write(job.name + "\\n")
        time.sleep(0.05 + 0.1 * random.random())
        out = job.output(profile_)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name("." + out.name + ".tmp")
        tmp.write_text("{}")
        os.replace(tmp, out)
        (marks / job.name).touch()
        with open(root / "finished.txt", "a") as f:
            f.write(job.name + "\\n")

    grid.run_notebook = fake_run
    original = grid.build_jobs

    def jobs(p, capture_threads=None):
        js = original(p, capture_threads)
        for j in js:
            j.done = (lambda name=j.name: (marks / name).exists())
        return js

    grid.build_jobs = jobs
    report = grid.run_grid(profile, workers=2, progress=False)
    sys.exit(0 if report.ok else 1)
''')


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _run(script: Path, root: Path, kill_after_finished: int | None) -> int | None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, str(script), str(root)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    if kill_after_finished is None:
        return proc.wait(timeout=300)
    deadline = time.monotonic() + 300
    while len(_lines(root / "finished.txt")) < kill_after_finished:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the grid ended before the planned kill")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return None


def test_sigkill_mid_grid_then_rerun_finishes_without_redoing_finished_jobs(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    root = tmp_path / "runs"
    root.mkdir()
    kills = []  # (jobs finished before the kill, how many job starts were logged by then)
    for kill_at in (5, 19, 33):  # three kills at different depths of the 44-job DAG
        _run(script, root, kill_at)
        kills.append((set(_lines(root / "finished.txt")), len(_lines(root / "started.txt"))))
    assert _run(script, root, None) == 0
    started, finished = _lines(root / "started.txt"), _lines(root / "finished.txt")
    all_jobs = set(finished)
    assert len(all_jobs) == 44  # capture + 10 × (train, interp, steer, select) + judge + analysis + observations
    summaries = {"analysis", "observations"}  # always re-rendered, by design
    for done_before, n_started in kills:
        again = (done_before - summaries) & set(started[n_started:])
        assert not again, f"finished before a kill and run again after it: {sorted(again)}"
    redone = [n for n in all_jobs - summaries if started.count(n) > 1]
    assert len(redone) <= 2 * 3, redone  # at most the two in flight at each kill
    assert len(finished) == len(all_jobs) + len([n for n in finished if n in summaries]) - len(summaries)
    assert not [p for p in root.rglob(".*.tmp")], "a half-written output is visible"
