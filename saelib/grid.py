"""``python -m saelib.grid --profile NAME``: run every notebook of a profile through papermill.

The grid is a DAG of jobs built from :data:`saelib.stages.STAGES`: capture ×models → train ×SAEs →
interp ×SAEs (AutoInterp μ, each after its SAE's training) → steering ×SAEs (AxBench g, each after
its SAE's AutoInterp, whose explanations are its concepts) → selection ×SAEs (ΔC_k and output
score of every feature, then the selected tiers steered against g) → analysis, observations.
Each job is one papermill execution of its stage's notebook into
``runs/<profile>/executed/<stage>/``, which the book renders. Resumable: a job whose outputs are
complete (its stage's ``done`` check) and whose executed notebook exists is skipped; one failed
job does not stop the others (its dependants are skipped and reported); a summary of failures
closes the run.
"""

from __future__ import annotations

import argparse
import contextvars
import logging
import os
import shutil
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nbformat
import papermill as pm
from distributed import Client, LocalCluster
from distributed import wait as dask_wait
from tqdm.auto import tqdm

from . import stages, warm
from .models import model_slug
from .profiles import Profile, ProfileError, load_profile
from .results import CorruptFileError, provenance, read_json, write_json
from .stages.layout import GRID_RECORD

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@dataclass
class Job:
    """One notebook execution: its stage, parameters, dependencies and 'already done' check."""

    name: str
    stage: str
    parameters: dict[str, Any]
    done: Callable[[], bool]
    deps: list[str] = field(default_factory=list)
    #: Runs on a warm kernel when the grid has a pool (:mod:`saelib.warm`): the per-SAE jobs.
    warm: bool = False

    def output(self, profile: Profile) -> Path:
        return executed_dir(profile) / self.stage / f"{self.name}.ipynb"


def executed_dir(profile: Profile) -> Path:
    return profile.run_root() / "executed"


def build_jobs(profile: Profile, capture_threads: int | None = None) -> list[Job]:
    """The job DAG of a profile from :data:`saelib.stages.STAGES`, in a valid execution order:
    the per-model jobs, then each SAE's chain of per-SAE stages (so one worker finishes an SAE
    before it starts the next), then the profile's summaries. ``capture_threads``: torch threads
    for each per-model job (None: the kernel's default)."""
    by_scope = {scope: [s for s in stages.STAGES if s.scope == scope]
                for scope in ("model", "sae", "profile")}
    jobs: list[Job] = []
    for st in by_scope["model"]:
        for entry in profile.models:
            params = {"profile": profile.name, "model": entry.name}
            if capture_threads:
                params["threads"] = int(capture_threads)
            jobs.append(Job(f"{st.name}-{model_slug(entry.name)}", st.name, params,
                            lambda e=entry, d=st.done: d(profile, e)))
    for job in stages.sae_jobs(profile):
        params = {"profile": profile.name, "model": job.model, "arch": job.arch, "level": job.level}
        for st in by_scope["sae"]:
            deps = [f"{need}-{model_slug(job.model)}" + ("" if stages.stage(need).scope == "model"
                                                         else f"-{job.name}") for need in st.needs]
            jobs.append(Job(f"{st.name}-{model_slug(job.model)}-{job.name}", st.name, dict(params),
                            lambda j=job, d=st.done: d(profile, j), deps=deps, warm=True))
    for st in by_scope["profile"]:
        deps = [j.name for j in jobs if j.stage in st.needs]
        done = (lambda d=st.done: d(profile)) if st.done is not None else (lambda: False)
        jobs.append(Job(st.name, st.name, {"profile": profile.name}, done, deps=deps))
    return jobs


def run_notebook(profile: Profile, job: Job, log_output: bool = False) -> None:
    """Execute ``job``'s notebook into its executed copy, in an empty ``contextvars`` context.

    Why the empty context: Dask runs a task in a copy of the submitting thread's context, and
    papermill's nbclient keeps its event loop in a context variable (jupyter_core's
    ``run_sync``); after one papermill run in the main thread, both worker threads of a grid
    got that thread's loop and one of them failed with "This event loop is already running"."""
    contextvars.Context().run(_run_notebook, profile, job, log_output)


def _run_notebook(profile: Profile, job: Job, log_output: bool) -> None:
    out = job.output(profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial.ipynb")  # hidden until complete; papermill wants .ipynb
    notebook = NOTEBOOKS / f"{job.stage}.ipynb"
    pool = warm.active_pool() if job.warm else None
    if pool is not None:
        # A per-SAE notebook on a warm kernel (saelib.warm): the imports are paid once per worker.
        with pool.kernel() as kernel:
            kernel.execute(notebook, tmp, job.parameters, cwd=out.parent, log_output=log_output)
    else:
        _execute_fresh(notebook, tmp, job, out.parent, log_output)
    _retitle(tmp, job)
    tmp.replace(out)


def _execute_fresh(notebook: Path, tmp: Path, job: Job, folder: Path, log_output: bool) -> None:
    # The kernel starts in the job's folder (so a notebook's relative writes, e.g. the analysis
    # CSV, land beside its executed copy) through nbclient's ``resources.metadata.path``, not
    # papermill's ``cwd``: that one os.chdir()s this whole process, and jobs run as threads of it
    # (``dask_client``), so two jobs starting together would swap folders.
    # ``shutdown_kernel="immediate"``: once the last cell has run and its outputs are in, nbclient
    # stops the kernel at once instead of asking it to exit and polling for up to 5 s; the job's
    # results are written by its cells, so nothing is lost, and each of the grid's ~120 notebooks
    # is ~2.5 s shorter (measured with papermill 2.7 on this machine).
    pm.execute_notebook(str(notebook), str(tmp), parameters=job.parameters,
                        kernel_name="python3", progress_bar=False, log_output=log_output,
                        resources={"metadata": {"path": str(folder)}},
                        shutdown_kernel="immediate")


def error_file(profile: Profile, job: Job) -> Path:
    """Where a failed job's traceback goes, beside its executed notebook; a later successful run
    of the job removes it, so what is left names only jobs that are failing now."""
    return executed_dir(profile) / job.stage / f"{job.name}.error.txt"


def _retitle(path: Path, job: Job) -> None:
    """Append the job's parameters to the notebook's title, so the book's table of contents tells
    the thirty 'Train one SAE' pages apart."""
    nb = nbformat.read(str(path), as_version=4)
    detail = " · ".join(f"level {v}" if k == "level" else str(v)
                        for k, v in job.parameters.items() if k != "profile")
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("# ") and detail:
            first, _, rest = cell.source.partition("\n")
            cell.source = f"{first} ({detail})\n{rest}"
            break
    nbformat.write(nb, str(path))


@dataclass
class GridReport:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def run_grid(profile: Profile | str, *, workers: int = 1, only: str | None = None,
             progress: bool = True, scheduler: str | None = None,
             warm_kernels: bool = True) -> GridReport:
    """Run (or resume) the whole grid of ``profile`` on Dask; never raises for a single job's failure.

    ``scheduler``: the address of a running Dask scheduler (``tcp://host:8786``; its workers need
    this repository, its environment and the profile's ``runs/`` folder on a shared file system),
    e.g. one that dask-jobqueue's ``SLURMCluster`` started (README). Without it, a
    ``LocalCluster`` with ``workers`` single-threaded workers in this process: each job's work
    runs in a papermill kernel (a subprocess), so a worker only waits on it. ``warm_kernels``
    (local runs only): the per-SAE notebooks run on one warm kernel per worker, which imports
    the stack once (:mod:`saelib.warm`); the others, and all with ``warm_kernels=False``, each
    on a fresh kernel.
    """
    profile = stages.as_profile(profile)
    share_cores(workers)
    report = GridReport()
    t0 = time.perf_counter()
    stages.capture.prepare(profile)
    report.seconds["prepare"] = time.perf_counter() - t0
    jobs = {j.name: j for j in build_jobs(profile, capture_threads(profile, workers, scheduler))}
    every_job = {name: j.stage for name, j in jobs.items()}  # before --only narrows the run
    if only:
        jobs = {n: j for n, j in jobs.items() if j.stage == only or n == only}
    pending = dict(jobs)
    finished: set[str] = set()
    bar = WorkBar(planned_weights(profile, jobs, workers), desc=f"grid {profile.name}",
                  disable=not progress)
    running: dict[Any, Job] = {}
    record = _GridRecord(profile, report, every_job,
                         engine="dask " + (scheduler or f"LocalCluster({workers})"))

    def start_ready(client, slots: int) -> None:
        for name, job in list(pending.items()):
            deps = [d for d in job.deps if d in jobs]
            if any(d in report.failed or d in report.blocked for d in deps):
                report.blocked.append(name)
                del pending[name]
                bar.skip(name)
                continue
            if all(d in finished for d in deps) and len(running) < slots:
                del pending[name]
                is_done = job.done() and job.output(profile).exists()
                if is_done:  # a summary stage (no `done`) is never done: re-rendered each run
                    report.skipped.append(name)
                    finished.add(name)
                    bar.skip(name)
                    continue
                running[client.submit(_timed, run_notebook, profile, job, key=f"{name}-{time.time_ns()}",
                                      pure=False)] = job

    with kernel_tmpdir(profile, local=scheduler is None), \
            warm.kernel_pool(enabled=warm_kernels and scheduler is None), \
            dask_client(workers, scheduler) as client:
        slots = max(1, workers if scheduler is None else _cluster_threads(client, workers))
        start_ready(client, slots)
        while running or pending:
            if not running:
                start_ready(client, slots)
                if not running:
                    break
            done = _first_completed(list(running))
            for fut in done:
                job = running.pop(fut)
                try:
                    report.seconds[job.name] = fut.result()
                    report.ran.append(job.name)
                    finished.add(job.name)
                    error_file(profile, job).unlink(missing_ok=True)  # an earlier run's, now stale
                except Exception as e:  # one job's failure must not stop the grid
                    report.failed[job.name] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                    error_file(profile, job).parent.mkdir(parents=True, exist_ok=True)
                    error_file(profile, job).write_text("".join(traceback.format_exception(e)))
                bar.ran(job.name)
                record.write(finished=False)
            start_ready(client, slots)
    bar.close()
    report.seconds["total"] = time.perf_counter() - t0
    record.write(finished=True)
    return report


class _GridRecord:
    """The run's ``grid.json``, rewritten (atomically) after every job and at the end.

    Why after every job: the summary notebooks run inside the grid, as its last jobs, and their
    cost tables (plan against measured seconds per stage) read this record; written only at the
    end, a fresh run's book showed no measured time at all, and a resumed one the previous
    run's. A killed run also keeps the times of the jobs it finished.

    ``job_seconds``: wall seconds of the latest successful execution of every job, across resumed
    runs (a resumed run skips finished jobs; their times from earlier runs stay). Jobs no longer
    in the DAG (renamed or removed stages) are dropped. ``finished`` is False while the run goes
    on (the running summary notebook's own time is not in yet)."""

    def __init__(self, profile: Profile, report: GridReport, every_job: dict[str, str],
                 engine: str) -> None:
        self.path = profile.run_root() / GRID_RECORD
        self.report, self.every_job, self.engine = report, every_job, engine
        self.earlier: dict[str, float] = {}
        if self.path.exists():
            try:
                self.earlier = recorded_job_seconds(read_json(self.path))
            except (CorruptFileError, AttributeError):
                self.earlier = {}
        self.provenance = provenance(profile=profile.name)

    def write(self, finished: bool) -> None:
        r = self.report
        job_seconds = {**self.earlier, **{k: v for k, v in r.seconds.items() if k in r.ran}}
        job_seconds = {k: v for k, v in job_seconds.items() if k in self.every_job}
        write_json(self.path, {"finished": finished, "ran": r.ran, "skipped": r.skipped,
                               "failed": r.failed, "blocked": r.blocked, "seconds": r.seconds,
                               "job_seconds": job_seconds, "job_stages": self.every_job,
                               "engine": self.engine,
                               "provenance": {**self.provenance, "created_unix": time.time()}})


def planned_weights(profile: Profile, jobs: dict[str, Job], workers: int) -> dict[str, float]:
    """Each job's share of the run's wall time by the profile's plan (:mod:`saelib.plan`): its
    stage's job seconds per job, divided by ``workers`` except for the stages that run alone.

    Why: a job count is a poor measure of progress when a capture takes as long as ten per-SAE
    jobs (the bar's first estimate was 19 h for a 2.6 h run). A profile the plan cannot count
    (a model without a known shape, say) weighs every job alike."""
    from . import plan

    p = _plan(profile)
    if p is None:
        return {name: 1.0 for name in jobs}
    stage_plans = p.stages
    per_job = {s.stage: s.seconds / s.jobs / (1 if s.stage in plan.ALONE else max(1, workers))
               for s in stage_plans if s.jobs and s.seconds > 0}
    fallback = min(per_job.values(), default=1.0)  # a stage the plan has no work for
    return {name: per_job.get(plan.plan_stage(job.stage), fallback) for name, job in jobs.items()}


def _plan(profile: Profile):
    """The profile's plan, or None when the plan cannot count it: progress and advice must
    never stop a run."""
    from . import plan

    try:
        return plan.build_plan(profile)
    except Exception:
        return None


def plan_line(profile: Profile) -> str | None:
    """What the whole grid should take by the profile's plan, said before it starts (None when
    the plan cannot count the profile)."""
    p = _plan(profile)
    if p is None:
        return None
    return (f"grid {profile.name}: planned {p.wall_seconds / 3600:.2f} h on {p.hardware.name} "
            f"with {p.hardware.workers} worker(s), from scratch (python -m saelib.plan "
            f"--profile {profile.name})")


class WorkBar:
    """The grid's progress bar in planned seconds of work (:func:`planned_weights`), with the
    job count beside it: a job that runs advances the bar by its weight; one that is skipped
    (done in an earlier run) or blocked leaves the total, so a resumed run's remaining time is
    extrapolated from the work this run did, at this machine's measured rate."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"

    def __init__(self, weights: dict[str, float], desc: str, disable: bool = False,
                 file: Any = None) -> None:
        self.weights, self.name = weights, desc
        self.jobs, self.done = len(weights), 0
        self.bar = tqdm(total=sum(weights.values()), desc=self._desc(), smoothing=0,
                        disable=disable, bar_format=self.FORMAT, file=file)

    def _desc(self) -> str:
        return f"{self.name} ({self.done}/{self.jobs} jobs)"

    def ran(self, name: str) -> None:
        self.done += 1
        self.bar.set_description_str(self._desc(), refresh=False)
        self.bar.update(self.weights[name])

    def skip(self, name: str) -> None:
        self.done += 1
        self.bar.total -= self.weights[name]
        self.bar.set_description_str(self._desc(), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def recorded_job_seconds(record: dict[str, Any]) -> dict[str, float]:
    """Each job's latest wall seconds from a ``grid.json`` record; a record written before
    ``job_seconds`` existed has only this run's ``seconds`` (with the run's own totals)."""
    return dict(record.get("job_seconds") or {k: v for k, v in record.get("seconds", {}).items()
                                              if k not in ("prepare", "total")})


#: The kernels' temporary folder during a local grid run, under the profile's run folder.
KERNEL_TMP = ".kernel-tmp"


@contextmanager
def kernel_tmpdir(profile: Profile, local: bool = True):
    """``TMPDIR`` for the kernels a local grid run starts: a folder under the run folder, emptied
    at the start and removed at the end.

    Why: :func:`run_notebook` stops each fresh kernel at once (a kill), so nothing it registered
    for its exit runs, and wandb (imported by sae-lens) makes two temporary folders per process
    that it removes only at exit: each notebook left two in the system's temporary folder (~240
    per default grid). Kernels inherit this process's environment when they start; with a remote
    ``scheduler`` (``local=False``) they start elsewhere and nothing is changed."""
    if not local:
        yield None
        return
    path = profile.run_root() / KERNEL_TMP
    shutil.rmtree(path, ignore_errors=True)  # what a killed earlier run left
    path.mkdir(parents=True)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def dask_client(workers: int, scheduler: str | None = None):
    """A Dask client: on ``scheduler`` if given, else on an in-process ``LocalCluster``.

    Why in-process threads (``processes=False``): a job is a papermill run whose kernel is already
    a separate process; worker processes would only add start-up time and pickling. No dashboard
    (it would need bokeh and a free port 8787).
    """
    # The grid's own progress bar and summary say what happens; Dask's INFO lines would drown them.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _cluster_threads(client, default: int) -> int:
    threads = sum(client.nthreads().values())
    return threads or default


def _first_completed(futures: list) -> list:
    return list(dask_wait(futures, return_when="FIRST_COMPLETED").done)


def share_cores(workers: int) -> None:
    """Give each of ``workers`` concurrent notebook kernels an equal share of the CPU cores.

    Why: every kernel's torch would otherwise start one thread per core, and ``workers`` kernels
    on the same cores oversubscribe them (each matmul's threads wait on the others'). Kernels
    inherit this process's environment; a value the user set is kept.
    """
    if workers > 1:
        per = str(max(1, (os.cpu_count() or 1) // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, per)


def capture_threads(profile: Profile, workers: int, scheduler: str | None = None) -> int | None:
    """Threads for each capture kernel: this machine's cores shared among the profile's captures,
    which run first and together (they are the DAG's roots), instead of the 1/``workers`` share
    every kernel gets (:func:`share_cores`). None on a remote scheduler (its workers' cores are
    not this machine's) or with one worker (the kernel has every core already)."""
    if scheduler is not None or workers <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // max(1, min(workers, len(profile.models))))


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saelib.grid", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--workers", type=int, default=1, help="notebooks executed at once (LocalCluster workers)")
    ap.add_argument("--scheduler", help="address of a running Dask scheduler (e.g. a SLURMCluster's); "
                                        "default: a LocalCluster with --workers workers")
    ap.add_argument("--only", help=f"run one stage ({', '.join(s.name for s in stages.STAGES)}) "
                                   "or one job by name")
    ap.add_argument("--list", action="store_true", help="list the jobs and whether each is done")
    ap.add_argument("--fresh-kernels", action="store_true",
                    help="a fresh kernel for every notebook (default: per-SAE notebooks share "
                         "one warm kernel per worker)")
    args = ap.parse_args(argv)
    try:
        profile = load_profile(args.profile)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for job in build_jobs(profile):
            state = "done" if job.done() and job.output(profile).exists() else "todo"
            print(f"{state:5s} {job.stage:9s} {job.name}")
        return 0
    if not args.only and (line := plan_line(profile)):
        print(line)
    report = run_grid(profile, workers=args.workers, only=args.only, scheduler=args.scheduler,
                      warm_kernels=not args.fresh_kernels)
    print(f"grid {profile.name}: ran {len(report.ran)}, skipped {len(report.skipped)} (already done), "
          f"failed {len(report.failed)}, blocked {len(report.blocked)}; {report.seconds['total']:.0f} s")
    for name, err in report.failed.items():
        print(f"  FAILED {name}: {err}  (traceback: {executed_dir(profile)}/*/{name}.error.txt)")
    for name in report.blocked:
        print(f"  BLOCKED {name}: a job it depends on failed")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
