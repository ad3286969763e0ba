"""Stage ``selection`` (protocol §6): ΔC_k and the output score of every feature of one SAE, and
the selected tiers steered against g(θ).

1. ΔC_k and Arad et al.'s output score for every feature: the prefix goes through the model
   once; each feature is amplified at the last position at the SAE's layer (``selection.variant``)
   and only that position is recomputed from the next block up
   (:func:`saelib.selection.amplify.amplified_logits_fast`). ``selection_scores.json`` holds ΔC_k,
   C_k and S_out per latent.
2. With ``steer_tiers``: tiers over the candidate pool (scored latents with an explanation), ΔC_k
   in both directions and the output-score baseline of each tier's size; every feature of any
   tier is steered once with the steering stage's evaluator (``selection_steering.jsonl``); the
   paper's pick and the honest pick with their lifts (:func:`saelib.selection.tiers.tier_table_and_picks`).

Block ``selection`` of ``result.json`` (:class:`SelectRecord`); notebook ``selection.ipynb``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..data.corpus import load_token_splits
from ..profiles import Profile
from ..results import read_json, read_jsonl, write_json, write_jsonl
from ..sae.io import load_sae
from ..selection.amplify import amplified_logits_fast, describe, logit_lens_tokens, prefix_state
from ..selection.confidence import output_score, topk_confidence
from ..selection.config import SelectionConfig
from ..selection.tiers import build_tiers, output_score_baselines, tier_table_and_picks
from ..steering.run import steer_concepts
from . import interp, steering, train
from .layout import SAEJob, resolve_job, tokens_dir, unsteered_dir
from .records import BlockRecord, read_block, settings_record
from .runner import BlockStage, Context, stage_model

NAME = "selection"
SELECT_SCORES = "selection_scores.json"
SELECT_ROWS = "selection_steering.jsonl"


@dataclass(frozen=True)
class SelectRecord(BlockRecord):
    """Block ``selection``: the ΔC_k and output-score summaries; with ``steer_tiers`` the tiers,
    both picks and their lifts (``reason`` says why there are none)."""

    BLOCK = "selection"

    c_k_base: float
    n_features: int
    delta_conf: dict[str, float]
    output_score: dict[str, float]
    variant: str
    prefix_tokens: int
    scores_file: str
    g_base: float | None = None
    n_pool: int | None = None
    n_steered: int | None = None
    tiers: list[dict[str, Any]] | None = None
    paper: dict[str, Any] | None = None
    honest: dict[str, Any] | None = None
    steering: dict[str, Any] | None = None
    reason: str | None = None
    rows_file: str | None = None


def settings(profile: Profile) -> SelectionConfig:
    """The profile's ``SelectionConfig`` (protocol §6)."""
    return profile.section("selection")


def _record_settings(profile: Profile) -> dict[str, Any]:
    """Selection settings, plus the steering and judge settings its tiers are evaluated with."""
    config = settings(profile)
    if not config.steer_tiers:
        return settings_record(selection=config)
    steer_cfg, judge_cfg = steering.settings(profile)
    return settings_record(selection=config, steering=steer_cfg, judge=judge_cfg)


def _needs(profile: Profile) -> str:
    """Steering when the tiers are steered against g(θ), else only the trained SAE."""
    return steering.NAME if settings(profile).steer_tiers else train.NAME


def _needs_done(profile: Profile, job: SAEJob) -> bool:
    return steering.done(profile, job) if settings(profile).steer_tiers else train.done(profile, job)


def _compute(ctx: Context) -> tuple[dict[str, Any], int]:
    profile, entry, out, timer = ctx.profile, ctx.entry, ctx.out, ctx.timer
    config = settings(profile)
    with timer("load"):
        lm = stage_model(entry, profile.device)
        sae = load_sae(out / "sae", device=profile.device)
    captured_bos = load_token_splits(tokens_dir(profile, entry)).bos_id
    ids = config.prefix_ids(lm.tokenizer, captured_bos)
    W_dec_FD, b_dec_D = sae.W_dec.detach(), sae.b_dec.detach()
    n_feat = W_dec_FD.shape[0]
    with timer("delta_conf"):
        state = prefix_state(lm.tl, sae.encode, ids, entry.layer)
        c_base = float(topk_confidence(state.base_logits_V, config.k))
        c_int, s_out = [], []
        for s in range(0, n_feat, config.batch_size):  # never all F × V logits at once
            feats = list(range(s, min(n_feat, s + config.batch_size)))
            logits_BV = amplified_logits_fast(lm.tl, state, W_dec_FD, b_dec_D, feats, config.alpha,
                                              config.variant, batch_size=config.batch_size)
            c_int.append(topk_confidence(logits_BV, config.k))
            lens = logit_lens_tokens(lm.tl, W_dec_FD[feats], config.lens_top, config.batch_size)
            s_out.append(output_score(logits_BV, lens))
    c_int_F = _to_numpy(c_int)
    delta_F = c_int_F - c_base
    s_out_F = _to_numpy(s_out)
    if not (np.isfinite(delta_F).all() and np.isfinite(s_out_F).all()):
        raise FloatingPointError(f"{out}: non-finite ΔC_k or output score (the amplified forward "
                                 f"overflowed); lower selection.alpha")
    write_json(out / SELECT_SCORES, {"latent": list(range(n_feat)), "delta_conf": delta_F.tolist(),
                                     "c_k": c_int_F.tolist(), "output_score": s_out_F.tolist()})
    body = {"c_k_base": c_base, "n_features": n_feat,
            "delta_conf": {"mean": float(delta_F.mean()), "std": float(delta_F.std()),
                           "min": float(delta_F.min()), "max": float(delta_F.max())},
            "output_score": {"mean": float(s_out_F.mean()), "max": float(s_out_F.max())},
            "variant": describe(config.variant), "prefix_tokens": len(ids),
            "scores_file": SELECT_SCORES}
    if config.steer_tiers:
        body.update(_steer_tiers(ctx, lm, sae, delta_F, s_out_F, config))
    return body, profile.seed


def _steer_tiers(ctx: Context, lm, sae, delta_F: np.ndarray, s_out_F: np.ndarray,
                 config: SelectionConfig) -> dict[str, Any]:
    """Step 2: build the tiers over the candidate pool, steer their features, pick tiers, lifts."""
    profile, entry, job, out = ctx.profile, ctx.entry, ctx.job, ctx.out
    steer_cfg, judge_cfg = steering.settings(profile)
    pool = [r for r in read_jsonl(out / interp.INTERP_ROWS)
            if r.get("explanation") and r["max_act"] > 0 and r.get("score") is not None]
    if not pool:
        return {"tiers": [], "reason": "no scored latent with an explanation: no candidate pool"}
    ids = [int(r["latent"]) for r in pool]
    tiers = build_tiers(delta_F[ids], ids, top_ks=config.top_ks, quantiles=config.quantiles)
    baselines = output_score_baselines(tiers, s_out_F[ids], ids)
    by_latent = {int(r["latent"]): r for r in pool}
    union = list(dict.fromkeys(f for t in (*tiers, *baselines.values()) for f in t.feature_ids))
    concepts = [{k: by_latent[f][k] for k in ("latent", "explanation", "max_act")} for f in union]
    run_ = steer_concepts(lm, sae, entry.layer, concepts, steer_cfg, judge_cfg, ctx.timer,
                          ctx.progress, unsteered_cache=unsteered_dir(profile, entry),
                          calibration=steering.model_judge_calibration(profile, entry, lm, ctx.progress))
    write_jsonl(out / SELECT_ROWS, run_.rows)
    held = {s.latent: s.score for s in run_.scores}
    sel = {s.latent: s.select_hm[s.alpha_star] for s in run_.scores}
    g_base = read_block(profile, job, steering.SteerRecord).g
    return {**tier_table_and_picks(tiers, baselines, held, sel, g_base),
            "n_pool": len(pool), "n_steered": len(union),
            "steering": {k: v for k, v in run_.summary(steer_cfg.factors).items() if k != "concepts"},
            "rows_file": SELECT_ROWS}


def _to_numpy(chunks: list[Any]) -> np.ndarray:
    """Concatenate 1-D torch chunks into one float64 numpy array."""
    return np.concatenate([c.detach().cpu().double().numpy() for c in chunks]) if chunks else np.zeros(0)


#: The selection stage.
STAGE = BlockStage(SelectRecord, _record_settings, _needs, _needs_done, _compute)


def done(profile: Profile, job: SAEJob) -> bool:
    """ΔC_k and output scores (and, with ``steer_tiers``, the tiers' steering) exist for this SAE
    as saved now, with the current settings."""
    return STAGE.done(profile, job)


def run(profile: Profile | str, model: str, arch: str, level: int,
        progress: bool = True) -> SelectRecord:
    """(Or, when done, return the recorded) feature selection of one SAE (protocol §6)."""
    return STAGE.run(profile, model, arch, level, progress)


def scores(profile: Profile | str, model: str, arch: str, level: int) -> pd.DataFrame:
    """``selection_scores.json`` of one SAE: ΔC_k, C_k and output score per latent."""
    *_, out = resolve_job(profile, model, arch, level)
    return pd.DataFrame(read_json(out / SELECT_SCORES))
