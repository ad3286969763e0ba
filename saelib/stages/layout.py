"""The run folder: where every stage reads and writes (README "Artefacts").

``runs/<profile>/<model slug>/L<layer>/`` holds a model's tokens, activations and the inputs every
SAE of it shares; one folder per SAE (``<arch>-s<level>``) beside them holds the saved SAE, its
``result.json`` and its stages' row files. Only this module builds these paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sae_lens.constants import SAE_WEIGHTS_FILENAME as SAE_WEIGHTS

from ..models import model_slug
from ..profiles import ModelEntry, Profile, ProfileError, load_profile

#: Every SAE's record: the train stage's keys at the top, one block per later stage.
RESULT = "result.json"
#: The zero-ablated run's CE and KL sums, shared by a model's SAEs (:func:`saelib.evals.core.lm_metrics`).
ZERO_ABLATION = "zero_ablation.json"
#: The capture stage's record, beside the model's activations.
CAPTURE = "capture.json"
#: The judge's calibration, made once per model (:func:`saelib.steering.run.judge_calibration`).
JUDGE_CALIBRATION = "judge_calibration.json"
#: The judge stage's record (an LLM judge on a sample of what the profile's judge rated), one per profile.
JUDGE_RECORD = "judge.json"
#: Each job's wall seconds and outcome, one per profile (``saelib.grid``).
GRID_RECORD = "grid.json"

__all__ = ["CAPTURE", "GRID_RECORD", "JUDGE_CALIBRATION", "JUDGE_RECORD", "RESULT",
           "SAE_WEIGHTS", "ZERO_ABLATION", "SAEJob", "activations_dir", "as_profile",
           "descriptive_dir", "model_dir", "resolve_job", "sae_dir", "sae_jobs", "tokens_dir",
           "unsteered_dir"]


@dataclass(frozen=True)
class SAEJob:
    """One SAE of the grid: (model, architecture, sparsity level)."""

    model: str
    arch: str
    level: int

    @property
    def name(self) -> str:
        return f"{self.arch}-s{self.level}"


def as_profile(profile: Profile | str) -> Profile:
    return profile if isinstance(profile, Profile) else load_profile(profile)


def model_dir(profile: Profile, entry: ModelEntry) -> Path:
    return profile.run_root() / model_slug(entry.name) / f"L{entry.layer}"


def tokens_dir(profile: Profile, entry: ModelEntry) -> Path:
    return model_dir(profile, entry) / "tokens"


def activations_dir(profile: Profile, entry: ModelEntry, split: str) -> Path:
    return model_dir(profile, entry) / "activations" / split


def descriptive_dir(profile: Profile, entry: ModelEntry) -> Path:
    """The model's inputs of the descriptive metrics (absorption prompts, probing texts), shared
    by all its SAEs (:func:`saelib.evals.descriptive.capture_inputs`)."""
    return model_dir(profile, entry) / "descriptive"


def unsteered_dir(profile: Profile, entry: ModelEntry) -> Path:
    """Where the unsteered answers of ``entry``'s model are cached for all its SAEs
    (:func:`saelib.steering.run.unsteered_answers`)."""
    return model_dir(profile, entry) / "unsteered"


def sae_dir(profile: Profile, job: SAEJob) -> Path:
    return model_dir(profile, profile.model(job.model)) / job.name


def sae_jobs(profile: Profile) -> list[SAEJob]:
    """Every SAE of the profile, in a stable order (model, level, architecture)."""
    return [SAEJob(m.name, arch, level) for m in profile.models
            for level in range(len(profile.grid.targets)) for arch in profile.grid.architectures]


def resolve_job(profile: Profile | str, model: str, arch: str, level: int
                ) -> tuple[Profile, ModelEntry, SAEJob, Path]:
    """The validated profile, model entry, job and SAE folder of one grid cell (every per-SAE
    stage starts here): an unknown model or a level outside the grid is a ``ProfileError``."""
    profile = as_profile(profile)
    entry = profile.model(model)
    if not 0 <= level < len(profile.grid.targets):
        raise ProfileError(f"level {level} out of range 0..{len(profile.grid.targets) - 1}")
    job = SAEJob(entry.name, arch, level)
    return profile, entry, job, sae_dir(profile, job)
