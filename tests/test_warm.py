"""Warm kernels (saelib.warm): notebooks run one after another on one kernel see a fresh kernel's
state, a failure or ``max_jobs`` replaces the kernel, and the grid lends them to per-SAE jobs only.

Real ipykernel processes through papermill, on tiny notebooks; the kernels preload ``torch``
only (the grid's preload is the whole stack). That the real stages give the same bytes on a warm
kernel as on a fresh one is checked on the smoke grid (``tests/test_grid_smoke.py``).
"""

from __future__ import annotations

import json
import os

import nbformat
import pytest
import yaml
from papermill.exceptions import PapermillExecutionError

from saelib import grid, stages, warm
from saelib.profiles import PARAMS_DIR, profile_from_dict

PROBE = """import os, json, torch
from saelib.stages.records import peak_rss_mb
leftover = [k for k in ('planted', 'big') if k in globals()]
planted = 1
threads, draw = torch.get_num_threads(), torch.rand(1).item()
torch.set_num_threads(3)
torch.manual_seed(123)
big = bytearray(mb << 20)
big[::4096] = b'x' * len(big[::4096])
json.dump({'cwd': os.getcwd(), 'leftover': leftover, 'threads': threads, 'draw': draw,
           'pid': os.getpid(), 'peak_mb': peak_rss_mb()}, open(name + '.json', 'w'))"""


def _notebook(path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("name = ''\nmb = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nb.metadata = {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"},
                   "language_info": {"name": "python"}}
    nbformat.write(nb, str(path))


def _run(kernel, nb, folder, name, mb=1) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    kernel.execute(nb, folder / f"{name}.ipynb", {"name": name, "mb": mb}, cwd=folder)
    return json.loads((folder / f"{name}.json").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def test_notebooks_on_one_warm_kernel_each_see_a_fresh_kernels_state(tmp_path):
    nb = tmp_path / "probe.ipynb"
    _notebook(nb, PROBE)
    # A large parent (the test suite's process had 6 GB): Linux folds a forked parent's peak into
    # the child's ru_maxrss at exec, so a kernel's peak RSS must not come from getrusage.
    ballast = bytearray(600 << 20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    kernel = warm.WarmKernel(modules=("torch",))
    try:
        first = _run(kernel, nb, tmp_path / "a", "first", mb=400)
        second = _run(kernel, nb, tmp_path / "b", "second")
    finally:
        kernel.shutdown()
    assert kernel.started == 1 and first["pid"] == second["pid"], "one kernel ran both"
    assert first["leftover"] == [] and second["leftover"] == [], "the namespace was cleared"
    assert first["cwd"] == str(tmp_path / "a") and second["cwd"] == str(tmp_path / "b")
    assert second["threads"] == first["threads"], "torch's thread count was put back"
    assert second["draw"] == first["draw"], "torch's global random state was put back"
    assert first["peak_mb"] > 400 and second["peak_mb"] < first["peak_mb"] - 300, \
        "each notebook's peak RSS is its own"
    executed = nbformat.read(str(tmp_path / "b" / "second.ipynb"), as_version=4)
    counts = [c.execution_count for c in executed.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), "execution counts restart"
    assert not _alive(first["pid"]), "shutdown stops the kernel"
    del ballast


def test_a_failed_notebook_takes_its_kernel_with_it_and_max_jobs_replaces_one(tmp_path):
    probe, boom = tmp_path / "probe.ipynb", tmp_path / "boom.ipynb"
    _notebook(probe, PROBE)
    _notebook(boom, "raise ValueError('boom')")
    kernel = warm.WarmKernel(modules=("torch",), max_jobs=2)
    try:
        a = _run(kernel, probe, tmp_path / "a", "a")
        with pytest.raises(PapermillExecutionError, match="boom"):
            kernel.execute(boom, tmp_path / "boom-out.ipynb", {}, cwd=tmp_path)
        assert kernel.km is None and not _alive(a["pid"])
        b = _run(kernel, probe, tmp_path / "b", "b")
        c = _run(kernel, probe, tmp_path / "c", "c")
        assert kernel.km is None and not _alive(b["pid"]), "two jobs: replaced after the second"
        d = _run(kernel, probe, tmp_path / "d", "d")
    finally:
        kernel.shutdown()
    assert len({a["pid"], b["pid"], d["pid"]}) == 3 and b["pid"] == c["pid"]
    assert kernel.started == 3


def test_a_kernel_that_cannot_preload_is_a_clear_error(tmp_path):
    nb = tmp_path / "probe.ipynb"
    _notebook(nb, PROBE)
    kernel = warm.WarmKernel(modules=("no_such_module_here",))
    with pytest.raises(warm.WarmKernelError, match="No module named 'no_such_module_here'"):
        kernel.execute(nb, tmp_path / "out.ipynb", {"name": "x"}, cwd=tmp_path)
    assert kernel.km is None


def test_the_grid_lends_warm_kernels_to_per_sae_jobs_only(tmp_path, monkeypatch):
    """Four per-SAE-like jobs on two workers share at most two kernels; a job not marked warm,
    and every job with ``warm_kernels=False``, gets its own; the pool's kernels are stopped when
    the grid ends."""
    monkeypatch.setattr(grid, "NOTEBOOKS", tmp_path / "nbs")
    (tmp_path / "nbs").mkdir()
    _notebook(tmp_path / "nbs" / "probe.ipynb", PROBE)
    monkeypatch.setattr(warm, "PRELOAD", ("torch",))
    monkeypatch.setattr(stages.capture, "prepare", lambda p: {})
    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["runs_dir"] = str(tmp_path / "runs")
    profile = profile_from_dict(data, name="smoke")

    def jobs(p, capture_threads=None):
        out = [grid.Job(f"w{i}", "probe", {"name": f"w{i}"}, lambda: False, warm=True)
               for i in range(4)]
        return out + [grid.Job("cold", "probe", {"name": "cold"}, lambda: False, deps=["w0"])]

    monkeypatch.setattr(grid, "build_jobs", jobs)

    def pids() -> dict[str, int]:
        folder = grid.executed_dir(profile) / "probe"
        return {p.stem: json.loads(p.read_text())["pid"] for p in folder.glob("*.json")}

    report = grid.run_grid(profile, progress=False, workers=2)
    assert report.ok and len(report.ran) == 5
    seen = pids()
    warm_pids = {seen[f"w{i}"] for i in range(4)}
    assert 1 <= len(warm_pids) <= 2, "two workers: at most two warm kernels"
    assert seen["cold"] not in warm_pids, "a job not marked warm gets a fresh kernel"
    assert not any(_alive(p) for p in warm_pids), "the grid stops its warm kernels at the end"

    report = grid.run_grid(profile, progress=False, workers=2, warm_kernels=False)
    assert report.ok and len(set(pids().values())) == 5, "warm_kernels=False: a kernel per job"
