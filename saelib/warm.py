"""Warm kernels: the grid's per-SAE notebooks run on kernels that have already imported the stack.

Why: a fresh papermill kernel spent ~14 s of a per-SAE job beside the stage's own work, starting
the process and importing torch, TransformerLens and sae-lens (which bring transformers, datasets
and wandb), then loading the model; on a warm kernel it is ~2 s (median job wall minus the
record's seconds on the default's grid: interp 35 -> 21 s, steering 112 -> 95, selection 49 ->
32), ~24 minutes of job time over the default's 120 per-SAE notebooks. A warm kernel pays the
imports once per worker. Papermill still runs every notebook (its
parameters cell, its executed copy, its error): the engine registered as ``saelib-warm`` is
papermill's nbclient engine handed a running kernel (nbclient's ``km``: a kernel it did not
start, it leaves running). The stages keep their model loaded per process too
(:func:`saelib.stages.runner.stage_model`).

Before each notebook the kernel is put back into the state a fresh one starts in, as far as a
notebook can see it (:func:`reset_kernel`): IPython's user namespace cleared and its execution
count restarted, figures closed, the working directory the job's folder, torch's thread count
and global random state as at start. Modules stay imported, which is the point; saelib keeps no
state across stage calls that changes a result (the smoke grid's test, ``tests/test_grid_smoke.py``,
reruns one SAE's AutoInterp and steering notebooks on a fresh kernel and gets the same bytes;
``tests/test_warm.py`` checks the reset on probe notebooks). A notebook that fails
takes its kernel with it (the next job starts a new one), and a kernel is replaced after
``max_jobs`` notebooks, so what a library caches per process cannot grow without bound.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

#: Imported by every warm kernel when it starts: what the per-SAE notebooks import.
PRELOAD = ("saelib.stages", "saelib.report", "pandas", "seaborn", "matplotlib.pyplot")

#: The papermill engine name under which :class:`WarmEngine` is registered.
ENGINE = "saelib-warm"

#: Notebooks one warm kernel runs before it is replaced by a fresh one.
MAX_JOBS = 40

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: Seconds allowed for a kernel to start and import :data:`PRELOAD`, and for a reset.
START_TIMEOUT = 300.0

# -- inside the kernel -------------------------------------------------------------------------

_START: dict[str, Any] = {}


def preload(modules: tuple[str, ...] = PRELOAD) -> None:
    """Import ``modules`` and remember what :func:`reset_kernel` restores (runs in the kernel)."""
    import importlib

    import torch

    for name in modules:
        importlib.import_module(name)
    _START.update(threads=torch.get_num_threads(), rng=torch.get_rng_state())


def reset_kernel(cwd: str) -> None:
    """Put this kernel into a fresh kernel's state for the next notebook (runs in the kernel)."""
    import gc
    import sys

    import torch
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:
        shell.reset(new_session=True)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
    os.chdir(cwd)
    try:  # restart the peak-RSS count (VmHWM, which records.peak_rss_mb reads) for this job
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if _START:
        torch.set_num_threads(_START["threads"])
        torch.set_rng_state(_START["rng"])
    gc.collect()


# -- in the grid's process ---------------------------------------------------------------------


class WarmKernelError(RuntimeError):
    """A warm kernel could not start, import what it preloads, or reset."""


def _engine():
    """:class:`WarmEngine`, defined and registered with papermill on first use (so that the
    kernel side of this module does not import papermill)."""
    global _ENGINE_CLASS
    if _ENGINE_CLASS is not None:
        return _ENGINE_CLASS
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines
    from papermill.utils import merge_kwargs, remove_args

    class WarmEngine(NBClientEngine):
        """Papermill's nbclient engine on a running kernel (``km``): nbclient neither starts nor
        stops a kernel it was handed; this engine also closes the client's channels after the
        notebook, which nbclient leaves open for a kernel it does not own."""

        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False,
                                     stdout_file=None, stderr_file=None, start_timeout=60,
                                     execution_timeout=None, **kwargs):
            kwargs = remove_args(["input_path", "timeout", "startup_timeout"], **kwargs)
            final = merge_kwargs(kwargs, timeout=execution_timeout, startup_timeout=start_timeout,
                                 kernel_name=kernel_name, log_output=log_output,
                                 stdout_file=stdout_file, stderr_file=stderr_file)
            client = PapermillNotebookClient(nb_man, **final)
            try:
                return client.execute()
            finally:
                if client.kc is not None:
                    client.kc.stop_channels()

    papermill_engines.register(ENGINE, WarmEngine)
    _ENGINE_CLASS = WarmEngine
    return WarmEngine


_ENGINE_CLASS = None


class WarmKernel:
    """One running kernel that executes notebooks one after another (not thread-safe: a
    :class:`KernelPool` hands it to one job at a time)."""

    def __init__(self, kernel_name: str = "python3", max_jobs: int = MAX_JOBS,
                 modules: tuple[str, ...] | None = None):
        self.kernel_name = kernel_name
        self.max_jobs = max_jobs
        self.modules = tuple(PRELOAD if modules is None else modules)
        self.km = None
        self.jobs = 0
        self.started = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def _run(self, code: str) -> None:
        """Run ``code`` on the kernel and wait for it; an error is a :class:`WarmKernelError`."""
        kc = self.km.client()
        kc.start_channels()
        errors: list[str] = []

        def hook(msg: dict) -> None:
            if msg["msg_type"] == "error":
                c = msg["content"]
                trace = _ANSI.sub("", "\n".join(c.get("traceback", [])))
                errors.append(f"{c.get('ename')}: {c.get('evalue')}\n{trace}")

        try:
            self._sync(kc.wait_for_ready(timeout=START_TIMEOUT))
            reply = self._sync(kc.execute_interactive(code, store_history=False, allow_stdin=False,
                                                      timeout=START_TIMEOUT, output_hook=hook))
        except Exception as e:
            raise WarmKernelError(f"warm kernel: {type(e).__name__}: {e}") from e
        finally:
            kc.stop_channels()
        if reply["content"]["status"] != "ok" or errors:
            raise WarmKernelError("warm kernel: " + ("\n".join(errors) or str(reply["content"])))

    def _sync(self, coro):
        """Run ``coro`` to its end on this kernel's own event loop.

        Why a private loop rather than jupyter_core's ``run_sync`` (which nbclient uses): this
        kernel is started, reset and stopped from whichever thread holds it (a Dask worker's, or
        the main thread when the grid ends), and ``run_sync`` keeps its loop in a context
        variable, which Dask copies from the submitting thread into every task
        (:func:`saelib.grid.run_notebook`); a loop of its own is never one another thread runs."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def start(self, cwd: str | Path) -> None:
        from jupyter_client.manager import AsyncKernelManager

        self.km = AsyncKernelManager(kernel_name=self.kernel_name)
        try:
            self._sync(self.km.start_kernel(cwd=str(cwd)))
        except Exception as e:
            self.km = None
            raise WarmKernelError(f"warm kernel did not start: {type(e).__name__}: {e}") from e
        self.jobs = 0
        self.started += 1
        try:
            self._run(f"__import__('saelib.warm').warm.preload({self.modules!r})")
        except WarmKernelError:
            self.shutdown(now=True)
            raise

    @property
    def alive(self) -> bool:
        return self.km is not None and bool(self._sync(self.km.is_alive()))

    def execute(self, input_path: str | Path, output_path: str | Path, parameters: dict,
                cwd: str | Path, log_output: bool = False) -> None:
        """``papermill.execute_notebook`` of ``input_path`` on this kernel, in folder ``cwd``."""
        import papermill as pm

        _engine()
        if not self.alive:
            self.start(cwd)
        ok = False
        try:
            self._run(f"__import__('saelib.warm').warm.reset_kernel({str(cwd)!r})")
            pm.execute_notebook(str(input_path), str(output_path), parameters=parameters,
                                kernel_name=self.kernel_name, progress_bar=False,
                                log_output=log_output, engine_name=ENGINE,
                                km=self.km, resources={"metadata": {"path": str(cwd)}})
            ok = True
        finally:
            self.jobs += 1
            if not ok or self.jobs >= self.max_jobs:
                self.shutdown(now=not ok)

    def shutdown(self, now: bool = False) -> None:
        """Stop the kernel (``now``: kill it; else ask it to exit, so its exit handlers run)."""
        km, self.km = self.km, None
        if km is None:
            return
        try:
            self._sync(km.shutdown_kernel(now=now))
        finally:
            self._sync(km.cleanup_resources())
            self._loop.close()
            self._loop = None


class KernelPool:
    """Warm kernels lent to one job at a time; as many exist as jobs have run at once."""

    def __init__(self, **kernel_kwargs: Any):
        self.kernel_kwargs = kernel_kwargs
        self._idle: queue.SimpleQueue[WarmKernel] = queue.SimpleQueue()
        self._all: list[WarmKernel] = []
        self._lock = threading.Lock()

    @contextmanager
    def kernel(self) -> Iterator[WarmKernel]:
        try:
            k = self._idle.get_nowait()
        except queue.Empty:
            k = WarmKernel(**self.kernel_kwargs)
            with self._lock:
                self._all.append(k)
        try:
            yield k
        finally:
            self._idle.put(k)

    def close(self) -> None:
        """Stop every kernel, letting each run its exit handlers (wandb's temporary folders)."""
        with self._lock:
            kernels, self._all = self._all, []
        for k in kernels:
            k.shutdown(now=False)


_ACTIVE: KernelPool | None = None


def active_pool() -> KernelPool | None:
    """The pool of the grid run in progress in this process, or None."""
    return _ACTIVE


@contextmanager
def kernel_pool(enabled: bool = True, **kernel_kwargs: Any) -> Iterator[KernelPool | None]:
    """A :class:`KernelPool` for the duration of a grid run (``enabled=False``: none, so every
    notebook gets a fresh kernel), closed at the end."""
    global _ACTIVE
    if not enabled:
        yield None
        return
    pool = KernelPool(**kernel_kwargs)
    before, _ACTIVE = _ACTIVE, pool
    try:
        yield pool
    finally:
        _ACTIVE = before
        pool.close()
