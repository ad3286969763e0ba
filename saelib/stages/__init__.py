"""The paper's pipeline as a table of stages: one module, one notebook, one record each.

=============  ==========  =======================  ===========================================
stage          scope       record                   module
=============  ==========  =======================  ===========================================
capture        model       ``capture.json``         :mod:`saelib.stages.capture` (protocol §2)
train          SAE         ``result.json`` top      :mod:`saelib.stages.train` (§2–3)
interp         SAE         blocks ``interp``,       :mod:`saelib.stages.interp` (§3)
                           ``descriptive``
steering       SAE         block ``steering``       :mod:`saelib.stages.steering` (§4)
selection      SAE         block ``selection``      :mod:`saelib.stages.selection` (§6)
judge          profile     ``judge.json``           :mod:`saelib.stages.judge` (§3–4)
analysis       profile     (reads the records)      :mod:`saelib.stages.analysis` (§5, §7)
observations   profile     ``key_observations.json``  (the notebook; :mod:`saelib.observations`)
=============  ==========  =======================  ===========================================

A stage's name is its module here, its notebook (``notebooks/<name>.ipynb``), its jobs' prefix in the grid
(``<name>-<model>[-<arch>-s<level>]``), its folder of executed notebooks and its block of
``result.json``. :data:`STAGES` drives the grid's DAG and done checks (:mod:`saelib.grid`), the
book's table of contents (:mod:`saelib.book`) and the report's cost table (:mod:`saelib.report`).
The shared pieces: :mod:`~saelib.stages.layout` (the run folder), :mod:`~saelib.stages.records`
(typed records, "is this current"), :mod:`~saelib.stages.runner` (the per-SAE skeleton).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from . import analysis, capture, interp, judge, layout, records, selection, steering, train
from .layout import SAEJob, as_profile, resolve_job, sae_dir, sae_jobs

__all__ = ["STAGES", "Stage", "SAEJob", "analysis", "as_profile", "capture", "interp", "judge", "layout",
           "records", "resolve_job", "sae_dir", "sae_jobs", "selection", "stage", "steering", "train"]


@dataclass(frozen=True)
class Stage:
    """One row of :data:`STAGES`.

    ``scope``: one job per model, per SAE or per profile. ``needs``: the stages whose jobs it
    waits for (for a per-SAE stage, the same SAE's; for a profile stage, every per-SAE job).
    ``done(profile, entry_or_job)``: its outputs are current (None: a summary, re-rendered on
    every run because it reads every record). ``title``: what it computes, in words.
    ``records``: the record classes it writes; ``rows``: the row files beside them."""

    name: str
    scope: Literal["model", "sae", "profile"]
    title: str
    needs: tuple[str, ...]
    done: Callable | None
    records: tuple[type[records.Record], ...] = ()
    rows: tuple[str, ...] = ()

    @property
    def notebook(self) -> str:
        return f"{self.name}.ipynb"


_PER_SAE = (train.NAME, interp.NAME, steering.NAME, selection.NAME)

STAGES: tuple[Stage, ...] = (
    Stage(capture.NAME, "model", "residual activations of one model", (), capture.done,
          (capture.CaptureRecord,)),
    Stage(train.NAME, "sae", "one SAE trained, its core metrics", (capture.NAME,), train.done,
          (train.TrainRecord,)),
    Stage(interp.NAME, "sae", "AutoInterp μ and the descriptive metrics", (train.NAME,),
          interp.done, (interp.InterpRecord, interp.DescriptiveRecord),
          (interp.INTERP_ROWS, interp.DESCRIPTIVE_ROWS)),
    Stage(steering.NAME, "sae", "AxBench steering g", (interp.NAME,), steering.done,
          (steering.SteerRecord,), (steering.STEER_ROWS,)),
    Stage(selection.NAME, "sae", "ΔC_k, output score, selected tiers steered", (steering.NAME,),
          selection.done, (selection.SelectRecord,),
          (selection.SELECT_SCORES, selection.SELECT_ROWS)),
    Stage(judge.NAME, "profile", "an LLM judge on a sample: agreement with the profile's judge",
          (interp.NAME, steering.NAME), judge.done, (judge.JudgeRecord,)),
    Stage(analysis.ANALYSIS, "profile", "the paper's tables and figures", _PER_SAE, None),
    Stage(analysis.OBSERVATIONS, "profile", "the key observations with verdicts", _PER_SAE, None),
)


def stage(name: str) -> Stage:
    """The stage called ``name``; an unknown name is a ``KeyError`` naming the valid ones."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; valid: {', '.join(s.name for s in STAGES)}")
