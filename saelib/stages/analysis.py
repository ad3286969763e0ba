"""Stages ``analysis`` and ``observations``: read every SAE's record, compare the judges.

The analysis notebook renders the paper's tables and figures from the SAEs' ``result.json`` files
(:func:`sae_results`) and runs the one computation of its own: the profile's judge against a second
back-end on a seeded sample of the same steered generations (:func:`run_judge_agreement`,
``judge_agreement.json``; protocol §4). The observations notebook states the paper's key
observations with verdicts from the same records.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..judges.agreement import JudgeAgreementConfig, judge_agreement, sample_items
from ..judges.base import RatingItem, Ratings
from ..judges.factory import make_judge
from ..models import resolve_hf_source
from ..profiles import Profile
from ..results import CorruptFileError, provenance, read_json, read_jsonl, write_json
from . import interp, selection, steering, train
from .layout import JUDGE_AGREEMENT, RESULT, as_profile, sae_dir, sae_jobs
from .records import Record, StaleRecord, read_result, settings_record

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
                print(f"note: {result.get('arch')}-s{result.get('level')}: {e}", file=sys.stderr)
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


@dataclass(frozen=True)
class JudgeAgreementRecord(Record):
    """``judge_agreement.json``: per-kind agreement, the second judge's unparsable answers, every
    item with both ratings, the cost and provenance."""

    judge_a: str
    judge_b: str
    per_kind: dict[str, dict[str, Any]]
    n_items: int
    n_pool: int
    unparsable_ratings: int | None
    ratings_requested: int
    judge_usage: dict[str, Any]
    items: list[dict[str, Any]]
    keys: list[list[Any]]
    settings: dict[str, Any]
    seconds: float
    items_per_s: float
    provenance: dict[str, Any]


def run_judge_agreement(profile: Profile | str, progress: bool = False) -> JudgeAgreementRecord | None:
    """(Or, when current, return the recorded) agreement between the profile's judge and the
    ``judge_agreement`` section's back-end on a seeded sample of steered generations (protocol §4).

    The first judge's ratings are the ones already in every SAE's ``steering.jsonl``; the second
    rates the same (concept, instruction, output) items. Returns None when ``n_items`` is 0 or no
    SAE has steering rows yet.
    """
    profile = as_profile(profile)
    cfg: JudgeAgreementConfig = profile.section("judge_agreement")
    _, judge_cfg = steering.settings(profile)
    if cfg.n_items == 0:
        return None
    rows = []
    for job in sae_jobs(profile):
        path = sae_dir(profile, job) / steering.STEER_ROWS
        if path.exists():
            rows += [{**r, "sae": f"{job.model}/{job.name}"} for r in read_jsonl(path)]
    if not rows:
        return None
    items = sample_items(rows, cfg.n_items, cfg.seed)
    keys = [[r["sae"], r["latent"], r["instruction_index"], r["alpha"]] for r in items]
    settings = settings_record(judge_agreement=cfg, judge=judge_cfg)
    out = profile.run_root() / JUDGE_AGREEMENT
    if out.exists():
        try:
            old = JudgeAgreementRecord.from_json(read_json(out))
            if old.settings == settings and old.keys == json.loads(json.dumps(keys)):
                return old
        except (StaleRecord, CorruptFileError):
            pass  # another schema or unreadable: rate again
    second_cfg = replace(judge_cfg, backend=cfg.backend, max_tokens_rating=cfg.max_tokens,
                         local_model=resolve_hf_source(cfg.local_model) if cfg.backend == "local"
                         else judge_cfg.local_model)
    t0 = time.perf_counter()
    second = make_judge(second_cfg)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    theirs = second.rate([RatingItem(r["concept"], r["instruction"], r["output"]) for r in items])
    rate_s = time.perf_counter() - t1
    ours = [Ratings(r["concept_rating"], r["instruction_rating"], r["fluency_rating"]) for r in items]
    name_a = judge_cfg.backend
    name_b = (f"{cfg.backend} ({cfg.local_model})" if cfg.backend == "local"
              else f"{cfg.backend} ({judge_cfg.model})")
    report = judge_agreement(ours, theirs, name_a, name_b)
    usage = asdict(second.usage)
    record = JudgeAgreementRecord(
        **report.to_dict(), n_items=len(items), n_pool=len(rows),
        unparsable_ratings=usage.get("extra", {}).get("unparsable_ratings"),
        ratings_requested=3 * len(items), judge_usage=usage,
        items=[{"sae": r["sae"], "latent": r["latent"], "alpha": r["alpha"],
                "concept": r["concept"], "output": r["output"],
                name_a: [a.concept, a.instruction, a.fluency],
                name_b: [b.concept, b.instruction, b.fluency]}
               for r, a, b in zip(items, ours, theirs)],
        keys=keys, settings=settings, seconds=load_s + rate_s,
        items_per_s=len(items) / max(rate_s, 1e-9),
        provenance=provenance(settings, cfg.seed, {"load": load_s, "rate": rate_s},
                              profile=profile.name))
    write_json(out, record.to_json())
    return record
