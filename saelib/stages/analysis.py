"""Stages ``analysis`` and ``observations``: read every SAE's record.

The analysis notebook renders the paper's tables and figures from the SAEs' ``result.json`` files
(:func:`sae_results`); the observations notebook states the paper's key observations with verdicts
from the same records. Neither computes anything of its own, so both re-render on every run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ..profiles import Profile
from ..results import read_json
from . import interp, selection, steering, train
from .layout import RESULT, as_profile, sae_dir, sae_jobs
from .records import StaleRecord, read_result

ANALYSIS = "analysis"
OBSERVATIONS = "observations"


@dataclass(frozen=True)
class SAEResult:
    """One SAE's ``result.json``, typed: the train record and each later stage's block (None
    where that stage has not run, or its block is stale)."""

    train: train.TrainRecord
    interp: interp.InterpRecord | None
    descriptive: interp.DescriptiveRecord | None
    steering: steering.SteerRecord | None
    selection: selection.SelectRecord | None

    @classmethod
    def from_json(cls, result: dict[str, Any]) -> "SAEResult":
        def block(record_cls):
            try:
                return record_cls.from_json(result[record_cls.BLOCK]) if record_cls.BLOCK in result else None
            except StaleRecord as e:
                print(f"note: {result.get('model')}/{result.get('arch')}-s{result.get('level')}: {e}",
                      file=sys.stderr)
                return None

        return cls(train.TrainRecord.from_result(result), block(interp.InterpRecord),
                   block(interp.DescriptiveRecord), block(steering.SteerRecord),
                   block(selection.SelectRecord))


def load_results(profile: Profile | str) -> list[dict[str, Any]]:
    """Every SAE's ``result.json`` of a profile as stored (missing ones skipped)."""
    profile = as_profile(profile)
    rows = []
    for job in sae_jobs(profile):
        path = sae_dir(profile, job) / RESULT
        if path.exists():
            rows.append(read_json(path))
    return rows


def sae_results(profile: Profile | str) -> list[SAEResult]:
    """Every trained SAE's typed record (the analysis reads only these); an unreadable or stale
    train record is left out, named on stderr."""
    profile = as_profile(profile)
    out = []
    for job in sae_jobs(profile):
        result = read_result(sae_dir(profile, job) / RESULT)
        if result is None or "core" not in result:
            continue
        try:
            out.append(SAEResult.from_json(result))
        except StaleRecord as e:
            print(f"note: {sae_dir(profile, job) / RESULT}: {e}; its stages will recompute it",
                  file=sys.stderr)
    return out
