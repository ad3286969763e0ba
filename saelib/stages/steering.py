"""Stage ``steering`` (protocol §4): the AxBench steering utility g(θ) of one SAE.

Concepts are the SAE's CONCEPT100 latents with their AutoInterp explanations; each gets
``n_instructions`` seeded instructions (the first ``n_select`` choose α, the rest are held out) and
is steered at every factor in batched, cached generation passes; the unsteered model answers the
same instructions once per model. The profile's judge, calibrated once per model
(``judge_calibration.json``), rates every generation. ``steering.jsonl`` holds each generation
with its ratings; block ``steering`` of ``result.json`` holds g(θ), α* and the score per concept,
costs and provenance (:class:`SteerRecord`). Notebook ``steering.ipynb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..judges.config import JudgeConfig
from ..profiles import ModelEntry, Profile
from ..results import read_jsonl, write_jsonl
from ..sae.io import load_sae
from ..steering.axbench import SteeringConfig, steering_score
from ..steering.run import judge_calibration, steer_concepts, steering_concepts
from . import interp
from .layout import JUDGE_CALIBRATION, model_dir, resolve_job, unsteered_dir
from .records import BlockRecord, read_block, settings_record
from .runner import BlockStage, Context, stage_model

NAME = "steering"
STEER_ROWS = "steering.jsonl"


@dataclass(frozen=True)
class SteerRecord(BlockRecord):
    """Block ``steering``: g(θ), the concepts' α* and held-out scores, generations and costs."""

    BLOCK = "steering"

    g: float
    partial: bool
    reason: str | None
    n_concepts: int
    concepts: list[dict[str, Any]]
    alpha_star_counts: dict[str, int]
    mean_hm_by_alpha: dict[str, float]
    generations: int
    new_tokens: int
    judge: str
    judge_usage: dict[str, Any]
    rows_file: str


def settings(profile: Profile) -> tuple[SteeringConfig, JudgeConfig]:
    """The profile's ``(SteeringConfig, JudgeConfig)`` (protocol §4)."""
    return profile.section("steering"), profile.section("judge")


def _record_settings(profile: Profile) -> dict[str, Any]:
    config, judge_cfg = settings(profile)
    return settings_record(steering=config, judge=judge_cfg)


def model_judge_calibration(profile: Profile, entry: ModelEntry, lm, progress: bool = False):
    """The judge's calibration for ``entry``'s model (``judge_calibration.json`` beside its
    activations), made on first use and shared by every SAE of the model, in both the steering
    and the selection stage (:func:`saelib.steering.run.judge_calibration`)."""
    config, judge_cfg = settings(profile)
    return judge_calibration(lm, config, judge_cfg, model_dir(profile, entry) / JUDGE_CALIBRATION,
                             unsteered_cache=unsteered_dir(profile, entry), progress=progress)


def _compute(ctx: Context) -> tuple[dict[str, Any], int]:
    profile, entry, job, out, timer = ctx.profile, ctx.entry, ctx.job, ctx.out, ctx.timer
    config, judge_cfg = settings(profile)
    autointerp = read_block(profile, job, interp.InterpRecord)
    concepts = steering_concepts(read_jsonl(out / interp.INTERP_ROWS), list(autointerp.concept100),
                                 config.n_concepts)
    partial, reason = False, None
    if not concepts:
        partial, reason = True, "no CONCEPT100 latent has an explanation: nothing to steer"
    elif len(concepts) < config.n_concepts:
        partial = True
        reason = (f"{len(concepts)} of the {config.n_concepts} requested concepts have an "
                  f"explanation (CONCEPT100 holds {len(autointerp.concept100)})")
    with timer("load"):
        lm = stage_model(entry, profile.device)
        sae = load_sae(out / "sae", device=profile.device)
    run_ = steer_concepts(lm, sae, entry.layer, concepts, config, judge_cfg, timer, ctx.progress,
                          unsteered_cache=unsteered_dir(profile, entry),
                          calibration=model_judge_calibration(profile, entry, lm, ctx.progress))
    write_jsonl(out / STEER_ROWS, run_.rows)
    return {"g": steering_score(run_.scores), "partial": partial, "reason": reason,
            **run_.summary(config.factors), "rows_file": STEER_ROWS}, config.seed


#: The steering stage: needs the SAE's current AutoInterp explanations (its concepts).
STAGE = BlockStage(SteerRecord, _record_settings, "interp", interp.autointerp_done, _compute)


def done(profile: Profile, job) -> bool:
    """Steering ran for this SAE as saved now, on its current AutoInterp concepts, with the
    profile's current steering/judge settings."""
    return STAGE.done(profile, job)


def run(profile: Profile | str, model: str, arch: str, level: int,
        progress: bool = True) -> SteerRecord:
    """(Or, when done, return the recorded) steering score g(θ) of one SAE (protocol §4)."""
    return STAGE.run(profile, model, arch, level, progress)


def rows(profile: Profile | str, model: str, arch: str, level: int) -> pd.DataFrame:
    """``steering.jsonl`` of one SAE: every generation with its ratings and HM."""
    *_, out = resolve_job(profile, model, arch, level)
    return pd.DataFrame(read_jsonl(out / STEER_ROWS))
