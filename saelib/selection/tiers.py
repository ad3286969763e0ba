"""Selection tiers built from ΔC_k, the output-score baseline, and the two ways to pick a tier.

Why: protocol §6 ranks candidate features by ΔC_k in both directions (most positive, most
negative), forms tiers (top-K for K in 1..5, or the features beyond a quantile q in
{0.99, 0.95, 0.90, 0.80}), steers with each tier and keeps the best tier per SAE. The Arad et al.
output-score baseline selects the same number of features, ranked by S_out. The paper picks the
best tier by the same steering score it then reports, which is optimistic; :func:`pick_tier_honest`
picks on a selection split and reports the held-out score (the protocol asks the book to show both).

Conventions (the paper is silent on them, so they are stated here and in the book):

* **Order inside a tier.** Features are listed from most to least extreme (``pos``: descending
  ΔC_k; ``neg``: ascending ΔC_k). Ties in the score keep the candidate pool's order (stable sort),
  so ties at a top-K cut go to the feature listed first in the pool.
* **Quantile tiers.** The threshold is ``numpy.quantile`` with its default linear interpolation;
  ``pos`` keeps features *strictly above* the q-quantile, ``neg`` those *strictly below* the
  (1 − q)-quantile. Ties at the threshold are therefore all left out, and a pool whose scores are
  all equal gives empty quantile tiers.
* **Empty or oversize tiers are not built.** A quantile tier with no feature, or a top-K tier with
  K larger than the pool, is omitted from :func:`build_tiers`'s result (steering an empty set is
  meaningless and a top-K of the whole pool duplicates a smaller tier). Tier names are stable, so
  tables align across SAEs by name; a missing name means "not built".
* **Ties between tiers.** :func:`pick_best_tier` keeps the first tier (mapping order) among equal
  best scores; with :func:`build_tiers`' order that is ``pos`` before ``neg``, top-K before
  quantile, and smaller K / larger q first, i.e. the smaller tier. NaN scores (a tier that could
  not be scored) are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np

__all__ = [
    "DIRECTIONS", "DEFAULT_TOP_KS", "DEFAULT_QUANTILES", "Tier", "TierChoice", "HonestTierChoice",
    "build_tiers", "output_score_tier", "output_score_baselines", "tier_score", "pick_best_tier",
    "pick_tier_honest", "tier_table_and_picks",
]

Direction = Literal["pos", "neg"]
TierKind = Literal["topk", "quantile", "output_score"]

#: ΔC_k directions (protocol §6): most positive and most negative ΔC_k.
DIRECTIONS: tuple[str, ...] = ("pos", "neg")
#: Top-K tiers of the paper (protocol §6).
DEFAULT_TOP_KS: tuple[int, ...] = (1, 2, 3, 4, 5)
#: Quantile tiers of the paper (protocol §6).
DEFAULT_QUANTILES: tuple[float, ...] = (0.99, 0.95, 0.90, 0.80)


@dataclass(frozen=True)
class Tier:
    """One candidate selection: which features to steer with.

    ``kind`` is ``"topk"`` (``param`` = K), ``"quantile"`` (``param`` = q) or ``"output_score"``
    (the Arad et al. baseline; ``param`` = number of features, ``direction`` = ``"pos"`` because
    higher S_out is better). ``feature_ids`` are ordered from most to least extreme.
    """

    name: str
    direction: str
    kind: str
    param: float
    feature_ids: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.feature_ids)


@dataclass(frozen=True)
class TierChoice:
    """The paper's pick: the tier with the best score, and that score."""

    name: str
    score: float


@dataclass(frozen=True)
class HonestTierChoice:
    """A tier chosen on the selection split, reported on the held-out split.

    ``oracle_name`` / ``oracle_heldout_score`` are what the paper's way (best held-out score)
    would have reported on the same numbers; ``optimism`` = oracle − honest held-out score ≥ 0.
    """

    name: str
    selection_score: float
    heldout_score: float
    oracle_name: str
    oracle_heldout_score: float

    @property
    def optimism(self) -> float:
        return self.oracle_heldout_score - self.heldout_score


def _as_scores(name: str, values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (one score per candidate feature), "
                         f"got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))[:10].tolist()
        raise ValueError(f"{name} must be finite; non-finite at positions {bad}")
    return arr


def _as_feature_ids(feature_ids: Sequence[int] | None, n: int) -> np.ndarray:
    if feature_ids is None:
        return np.arange(n, dtype=np.int64)
    if hasattr(feature_ids, "detach"):
        feature_ids = feature_ids.detach().cpu().numpy()
    ids = np.asarray(feature_ids)
    if ids.ndim != 1 or ids.size != n:
        raise ValueError(f"feature_ids must be 1-D with one id per score ({n}), got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"feature_ids must be integers, got dtype {ids.dtype}")
    if np.unique(ids).size != n:
        raise ValueError("feature_ids must be unique (each candidate feature once)")
    return ids.astype(np.int64)


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _order(scores: np.ndarray, direction: str) -> np.ndarray:
    """Positions from most to least extreme; stable, so ties keep pool order."""
    keys = -scores if direction == "pos" else scores
    return np.argsort(keys, kind="stable")


def _fmt_q(q: float) -> str:
    return f"{q:g}"


def build_tiers(delta_F, feature_ids: Sequence[int] | None = None, *,
                top_ks: Iterable[int] = DEFAULT_TOP_KS,
                quantiles: Iterable[float] = DEFAULT_QUANTILES,
                directions: Iterable[str] = DIRECTIONS) -> tuple[Tier, ...]:
    """All ΔC_k tiers of one SAE's candidate pool (protocol §6).

    Args:
        delta_F: ΔC_k per candidate feature, shape ``(F,)`` (numpy, list or torch), finite.
        feature_ids: the SAE latent id of each candidate (default ``0..F-1``), unique integers.
        top_ks: K values for top-K tiers, each ``>= 1``.
        quantiles: q values for quantile tiers, each in ``(0, 1)``.
        directions: subset of ``("pos", "neg")``.

    Returns:
        Tiers named ``dC_{direction}_top{K}`` and ``dC_{direction}_q{q}``, ordered by direction,
        then top-K (ascending K), then quantiles (in the given order). Empty quantile tiers and
        top-K tiers with K > F are omitted (module docstring).
    """
    scores = _as_scores("delta_F", delta_F)
    ids = _as_feature_ids(feature_ids, scores.size)
    top_ks = tuple(top_ks)
    quantiles = tuple(quantiles)
    directions = tuple(directions)
    for k in top_ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"top_ks must be integers >= 1, got {k!r}")
    for q in quantiles:
        if not (isinstance(q, (int, float)) and 0.0 < q < 1.0):
            raise ValueError(f"quantiles must lie strictly between 0 and 1, got {q!r}")
    for d in directions:
        _check_direction(d)

    tiers: list[Tier] = []
    for direction in directions:
        order = _order(scores, direction)
        for k in top_ks:
            if k > scores.size:
                continue
            tiers.append(Tier(f"dC_{direction}_top{int(k)}", direction, "topk", int(k),
                              tuple(int(i) for i in ids[order[:k]])))
        for q in quantiles:
            if direction == "pos":
                keep = scores > np.quantile(scores, q)
            else:
                keep = scores < np.quantile(scores, 1.0 - q)
            chosen = order[keep[order]]
            if chosen.size == 0:
                continue
            tiers.append(Tier(f"dC_{direction}_q{_fmt_q(q)}", direction, "quantile", float(q),
                              tuple(int(i) for i in ids[chosen])))
    return tuple(tiers)


def output_score_tier(s_out_F, n_features: int, feature_ids: Sequence[int] | None = None) -> Tier:
    """The Arad et al. baseline: the ``n_features`` candidates with the highest S_out.

    Ties keep pool order (stable sort). Named ``outscore_top{n}``.
    """
    scores = _as_scores("s_out_F", s_out_F)
    ids = _as_feature_ids(feature_ids, scores.size)
    if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)) \
            or not 1 <= n_features <= scores.size:
        raise ValueError(f"n_features must be an integer in [1, {scores.size}] (the pool size), "
                         f"got {n_features!r}")
    order = _order(scores, "pos")[:n_features]
    return Tier(f"outscore_top{int(n_features)}", "pos", "output_score", int(n_features),
                tuple(int(i) for i in ids[order]))


def output_score_baselines(tiers: Iterable[Tier], s_out_F,
                           feature_ids: Sequence[int] | None = None) -> dict[str, Tier]:
    """For every ΔC_k tier, the output-score tier with the same number of features.

    Returns ``{ΔC tier name: baseline tier}``; tiers of equal size share one baseline.
    """
    scores = _as_scores("s_out_F", s_out_F)
    out: dict[str, Tier] = {}
    by_size: dict[int, Tier] = {}
    for tier in tiers:
        if tier.size not in by_size:
            by_size[tier.size] = output_score_tier(scores, tier.size, feature_ids)
        out[tier.name] = by_size[tier.size]
    return out


def tier_score(tier: Tier, feature_scores: Mapping[int, float]) -> float:
    """A tier's steering score: the mean of its features' concept scores.

    Why: selecting features replaces CONCEPT100 by the tier's features as the concepts steered, so
    g_sel is the mean concept score over the tier (protocol §4, §6).
    """
    if tier.size == 0:
        raise ValueError(f"tier {tier.name!r} has no features")
    missing = [f for f in tier.feature_ids if f not in feature_scores]
    if missing:
        raise ValueError(f"tier {tier.name!r}: no score for features {missing[:10]}")
    return float(np.mean([float(feature_scores[f]) for f in tier.feature_ids]))


def pick_best_tier(scores_by_tier: Mapping[str, float]) -> TierChoice:
    """The paper's way: the tier with the highest steering score (protocol §6).

    NaN scores are skipped; ties keep the first tier in mapping order (module docstring).
    Raises ``ValueError`` if no tier has a finite score.
    """
    best_name: str | None = None
    best = -math.inf
    for name, score in scores_by_tier.items():
        score = float(score)
        if math.isnan(score):
            continue
        if best_name is None or score > best:
            best_name, best = name, score
    if best_name is None:
        raise ValueError("no tier has a finite score (got "
                         f"{len(scores_by_tier)} tiers); cannot pick a best tier")
    return TierChoice(best_name, best)


def pick_tier_honest(selection_scores_by_tier: Mapping[str, float],
                     heldout_scores_by_tier: Mapping[str, float]) -> HonestTierChoice:
    """Choose the tier on the selection split, report its held-out score.

    Why: the paper keeps the tier with the best reported score, so the reported score is the
    maximum of several noisy estimates (optimistic). Choosing on one split of the instructions and
    reporting on the other removes that bias; the paper's oracle pick on the held-out scores is
    returned beside it so the book can show the optimism.

    Both mappings must have the same tier names; ties and NaNs as in :func:`pick_best_tier`.
    """
    sel_names, held_names = set(selection_scores_by_tier), set(heldout_scores_by_tier)
    if sel_names != held_names:
        raise ValueError("selection and held-out scores must cover the same tiers; only in "
                         f"selection: {sorted(sel_names - held_names)}, only in held-out: "
                         f"{sorted(held_names - sel_names)}")
    chosen = pick_best_tier(selection_scores_by_tier)
    heldout = float(heldout_scores_by_tier[chosen.name])
    if math.isnan(heldout):
        raise ValueError(f"held-out score of the chosen tier {chosen.name!r} is NaN")
    oracle = pick_best_tier(heldout_scores_by_tier)
    return HonestTierChoice(chosen.name, chosen.score, heldout, oracle.name, oracle.score)


def lift_pct(g: float, g_base: float) -> float | None:
    """Relative lift of a selected tier's score over the SAE's g(θ), in % (Table 2); undefined
    (None) when g(θ) is 0."""
    return (g - g_base) / g_base * 100.0 if g_base else None


def tier_table_and_picks(tiers: Sequence[Tier], baselines: Mapping[str, Tier],
                         heldout: Mapping[int, float], selection: Mapping[int, float],
                         g_base: float) -> dict:
    """Every tier's held-out and selection-half scores, and both picks with their lifts.

    ``tiers`` are the ΔC_k tiers and ``baselines`` the output-score tier of each one's size (by
    tier name); ``heldout`` / ``selection`` each feature's held-out score and selection-half score
    at its α*. The paper's pick is the best held-out ΔC_k tier; the honest pick is chosen on the
    selection half and reported held out; each is compared with the output-score baseline of the
    same size and with g(θ) = ``g_base`` (protocol §6)."""
    all_tiers = {t.name: t for t in (*tiers, *baselines.values())}
    table = [{"name": t.name, "kind": t.kind, "direction": t.direction, "size": t.size,
              "features": list(t.feature_ids), "heldout": tier_score(t, heldout),
              "selection": tier_score(t, selection)} for t in all_tiers.values()]
    paper = pick_best_tier({t.name: tier_score(t, heldout) for t in tiers})
    honest = pick_tier_honest({t.name: tier_score(t, selection) for t in tiers},
                              {t.name: tier_score(t, heldout) for t in tiers})
    g_out = tier_score(baselines[paper.name], heldout)
    g_out_honest = tier_score(baselines[honest.name], heldout)
    return {"g_base": g_base, "tiers": table,
            "paper": {"tier": paper.name, "g_delta_conf": paper.score, "g_output_score": g_out,
                      "lift_pct": lift_pct(paper.score, g_base),
                      "lift_output_score_pct": lift_pct(g_out, g_base)},
            "honest": {"tier": honest.name, "selection_score": honest.selection_score,
                       "g_delta_conf": honest.heldout_score, "g_output_score": g_out_honest,
                       "lift_pct": lift_pct(honest.heldout_score, g_base),
                       "lift_output_score_pct": lift_pct(g_out_honest, g_base),
                       "optimism": honest.optimism}}
