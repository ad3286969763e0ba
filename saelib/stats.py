"""Rank agreement between two per-SAE scores: Kendall τ_b pooled and by axis, with Ψ (protocol §5).

Why: the paper's central claim is a rank statistic over SAEs. Table 1 (interpretability μ vs
steering g) and Table 3 (μ vs steering gain L) report τ_b over all SAEs ("pooled", with a BCa
bootstrap CI), τ_b within each architecture, sparsity level and model, their per-axis means
Ψ_A (architecture), Ψ_B (sparsity), Ψ_C (model), and Ψ = (Ψ_A + Ψ_B + Ψ_C) / 3.

What is computed, and the choices the paper leaves open (documented here and in the book):

* τ_b is scipy's (``scipy.stats.kendalltau(variant='b')``) for the point estimates. Resampled
  τ_b's use an equivalent vectorised form on the pair-sign matrices,
  ``τ_b = Σ s_x s_y / sqrt(Σ |s_x| · Σ |s_y|)`` with ``s_x[i, j] = sign(x_i − x_j)``, which is
  exactly τ_b = (P − Q) / sqrt((n0 − n1)(n0 − n2)); the tests check it against scipy with ties.
* ``pairs`` is the number of SAE pairs in the group, n(n − 1)/2.
* p-values: a permutation test per group (``scipy.stats.permutation_test``, pairings, two-sided,
  seeded); exact when n! ≤ the number of permutations. scipy's two-sided p is
  2·min(P(T ≥ t), P(T ≤ t)), capped at 1.
* Pooled CI: BCa (``scipy.stats.bootstrap``, paired resampling of SAEs, ``method='BCa'``), as the
  paper reports. BCa needs every resample's τ_b; when some resamples have all-tied scores (small
  or heavily tied tables, e.g. lifts where many SAEs sit at −100 %), it is undefined, and the
  pooled CI falls back to the percentile interval of the defined resamples, as the groups' CIs
  are made (``ci_method`` and ``reason`` say so).
* Group CIs and all standard errors: a stratified bootstrap over SAEs. For a group, SAEs are
  resampled within the group; for Ψ_A / Ψ_B / Ψ_C, within each of that axis's groups (so every
  group keeps its size); for Ψ, within each model (the three axes share SAEs, so they must see the
  same resample). Resampled τ_b's are computed from multiplicity weights (copies of one SAE are
  tied with each other, which is what τ_b on the expanded resample does). A replicate in which a
  group's scores are all tied has no τ_b; such replicates are dropped for that group (and the group
  is left out of that replicate's Ψ mean), and the number dropped is reported. Group CIs are
  percentile intervals of the remaining replicates: BCa would need every replicate defined, which
  small groups (n ≈ 5) do not give.
* A group with n < 2, or whose x or y values are all tied, has τ_b NaN with a ``reason``; Ψ_axis
  is the mean over the groups with a defined τ_b (``n_groups`` says how many).
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

__all__ = [
    "AXES", "AgreementConfig", "GroupTau", "PsiValue", "AgreementTable", "kendall_tau_b",
    "mean_of_group_taus", "combine_psi", "rank_agreement",
]

#: Ψ's axes (protocol §5): letter -> the table column it groups by (defaults; see rank_agreement).
AXES: dict[str, str] = {"A": "architecture", "B": "sparsity", "C": "model"}

_BATCH = 256  # resamples per vectorised batch: 256 × n² floats stays small for n ≤ 100 SAEs


@dataclass(frozen=True)
class AgreementConfig:
    """Resampling parameters of the rank-agreement analysis (profile key: ``stats``).

    ``n_permutations`` for each group's permutation p-value, ``n_bootstrap`` for every bootstrap
    (pooled BCa, group and Ψ intervals), ``confidence_level`` for all intervals, ``seed`` for all
    resampling (each group draws from its own stream derived from the seed and the group's name,
    so adding a model does not change another group's p-value).
    """

    n_permutations: int = 9999
    n_bootstrap: int = 9999
    confidence_level: float = 0.95
    seed: int = 0

    def validate(self) -> "AgreementConfig":
        for name in ("n_permutations", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 99:
                raise ValueError(f"stats.{name} must be an integer >= 99, got {value!r}")
        if not (isinstance(self.confidence_level, (int, float)) and 0.5 <= self.confidence_level < 1):
            raise ValueError(f"stats.confidence_level must be in [0.5, 1), got {self.confidence_level!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"stats.seed must be a non-negative integer, got {self.seed!r}")
        return self


@dataclass(frozen=True)
class GroupTau:
    """τ_b within one group of SAEs, in the paper's layout (group, n, pairs, τ_b, p, CI).

    ``axis`` is ``"pooled"``, ``"architecture"``, ``"sparsity"`` or ``"model"``; ``se`` is the
    bootstrap standard error; ``ci_method`` says how the interval was made; ``reason`` explains a
    NaN (or notes dropped degenerate bootstrap replicates), else ``None``.
    """

    group: str
    n: int
    pairs: int
    tau: float
    p: float
    ci_low: float
    ci_high: float
    axis: str = "pooled"
    se: float = math.nan
    ci_method: str = ""
    reason: str | None = None


@dataclass(frozen=True)
class PsiValue:
    """Ψ_A, Ψ_B, Ψ_C (mean τ_b over one axis's groups) or Ψ (mean of the three), with bootstrap
    standard error and percentile CI."""

    name: str
    value: float
    n_groups: int
    se: float
    ci_low: float
    ci_high: float
    reason: str | None = None


@dataclass(frozen=True)
class AgreementTable:
    """Everything behind one of the paper's τ tables (Table 1 or Table 3)."""

    x: str
    y: str
    pooled: GroupTau
    groups: tuple[GroupTau, ...]
    psi_a: PsiValue
    psi_b: PsiValue
    psi_c: PsiValue
    psi: PsiValue
    config: AgreementConfig = field(default_factory=AgreementConfig)

    def groups_on(self, axis: str) -> tuple[GroupTau, ...]:
        return tuple(g for g in self.groups if g.axis == axis)

    def to_frame(self) -> pd.DataFrame:
        """One row per group in the paper's layout, with each axis's Ψ after its groups.

        Columns: axis, group, n, pairs, tau_b, p, ci_low, ci_high, se, ci_method, n_groups,
        reason. Ψ rows have ``axis='psi'``, n/pairs/p empty and ``n_groups`` set.
        """
        rows: list[dict[str, Any]] = []

        def group_row(g: GroupTau) -> dict[str, Any]:
            return {"axis": g.axis, "group": g.group, "n": g.n, "pairs": g.pairs, "tau_b": g.tau,
                    "p": g.p, "ci_low": g.ci_low, "ci_high": g.ci_high, "se": g.se,
                    "ci_method": g.ci_method, "n_groups": pd.NA, "reason": g.reason}

        def psi_row(v: PsiValue) -> dict[str, Any]:
            return {"axis": "psi", "group": v.name, "n": pd.NA, "pairs": pd.NA, "tau_b": v.value,
                    "p": math.nan, "ci_low": v.ci_low, "ci_high": v.ci_high, "se": v.se,
                    "ci_method": "percentile", "n_groups": v.n_groups, "reason": v.reason}

        rows.append(group_row(self.pooled))
        for letter, psi in (("A", self.psi_a), ("B", self.psi_b), ("C", self.psi_c)):
            rows.extend(group_row(g) for g in self.groups_on(AXES[letter]))
            rows.append(psi_row(psi))
        rows.append(psi_row(self.psi))
        frame = pd.DataFrame(rows)
        for col in ("n", "pairs", "n_groups"):
            frame[col] = frame[col].astype("Int64")
        return frame

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for ``saelib.results.write_json``."""
        return asdict(self)


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """scipy's Kendall τ_b; NaN when either side has fewer than 2 distinct values."""
    return kendall_tau_b_p(x, y)[0]


def kendall_tau_b_p(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """scipy's Kendall τ_b and its two-sided asymptotic p; both NaN when either side has fewer
    than 2 distinct values (the judge pages' agreement; the grid's τ_b use permutation p's)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {xa.shape} and {ya.shape}")
    if _degenerate(xa, ya) is not None:
        return math.nan, math.nan
    res = sps.kendalltau(xa, ya, variant="b")
    return float(res.statistic), float(res.pvalue)


def mean_of_group_taus(taus: Sequence[float]) -> float:
    """Ψ_axis: the mean of the group τ_b's that are defined (NaN ones left out); NaN if none."""
    arr = np.asarray(taus, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def combine_psi(psi_a: float, psi_b: float, psi_c: float) -> float:
    """Ψ = (Ψ_A + Ψ_B + Ψ_C) / 3 (protocol §5); NaN if any axis is NaN."""
    return (float(psi_a) + float(psi_b) + float(psi_c)) / 3.0


def _degenerate(x: np.ndarray, y: np.ndarray) -> str | None:
    if x.size < 2:
        return f"n = {x.size} < 2 SAEs"
    if np.unique(x).size < 2:
        return "x has fewer than 2 distinct values (all tied)"
    if np.unique(y).size < 2:
        return "y has fewer than 2 distinct values (all tied)"
    return None


def _signs(v: np.ndarray) -> np.ndarray:
    """Pair-sign matrices ``sign(v_i − v_j)`` over the last axis: (..., n) -> (..., n, n)."""
    return np.sign(v[..., :, None] - v[..., None, :])


def _tau_b_vectorised(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """τ_b along ``axis`` for batches (broadcasting); NaN where a side is all tied."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    y = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    sx, sy = _signs(x), _signs(y)
    num = (sx * sy).sum(axis=(-2, -1))
    dx = np.abs(sx).sum(axis=(-2, -1))
    dy = np.abs(sy).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((dx > 0) & (dy > 0), num / np.sqrt(dx * dy), np.nan)


def _tau_b_weighted(sx: np.ndarray, sy: np.ndarray, w_BN: np.ndarray) -> np.ndarray:
    """τ_b of bootstrap resamples given as multiplicities ``w_BN`` of the n SAEs.

    A pair of copies (i, j) counts w_i·w_j times; copies of one SAE are tied in x and y and add
    nothing (the diagonal of a sign matrix is 0), exactly as τ_b on the expanded resample.
    """
    num = np.einsum("bi,ij,bj->b", w_BN, sx * sy, w_BN)
    dx = np.einsum("bi,ij,bj->b", w_BN, np.abs(sx), w_BN)
    dy = np.einsum("bi,ij,bj->b", w_BN, np.abs(sy), w_BN)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((dx > 0) & (dy > 0), num / np.sqrt(dx * dy), np.nan)


def _rng(seed: int, *labels: str) -> np.random.Generator:
    """A stream per (seed, purpose, group): results for a group do not depend on other groups."""
    key = [seed] + [zlib.crc32(label.encode()) for label in labels]
    return np.random.default_rng(np.random.SeedSequence(key))


def _stratified_weights(strata: Sequence[np.ndarray], n: int, n_boot: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Multiplicities (n_boot, n) of a bootstrap that resamples SAEs within each stratum."""
    w = np.zeros((n_boot, n), dtype=np.float64)
    for idx in strata:
        m = idx.size
        w[:, idx] = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot)
    return w


def _percentile_ci(reps: np.ndarray, level: float) -> tuple[float, float, float, int]:
    """(se, low, high, n_dropped) from replicates, NaN ones dropped."""
    finite = reps[np.isfinite(reps)]
    dropped = reps.size - finite.size
    if finite.size < 2:
        return math.nan, math.nan, math.nan, dropped
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(finite.std(ddof=1)), float(low), float(high), dropped


def _permutation_p(x: np.ndarray, y: np.ndarray, cfg: AgreementConfig, label: str) -> float:
    res = sps.permutation_test(
        (y,), lambda yy, axis=-1: _tau_b_vectorised(x, yy, axis=axis),
        permutation_type="pairings", vectorized=True, n_resamples=cfg.n_permutations,
        alternative="two-sided", batch=_BATCH, rng=_rng(cfg.seed, "perm", label))
    return float(res.pvalue)


def _pooled_bca(x: np.ndarray, y: np.ndarray, cfg: AgreementConfig
                ) -> tuple[float, float, float, str | None]:
    """The pooled BCa interval (se, low, high, None), or, when BCa is undefined, why (the caller
    then makes the percentile interval; scipy's degenerate-data warnings are that case)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap((x, y), _tau_b_vectorised, paired=True, vectorized=True,
                            n_resamples=cfg.n_bootstrap, batch=_BATCH, method="BCa",
                            confidence_level=cfg.confidence_level,
                            rng=_rng(cfg.seed, "boot", "pooled"))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    undefined = None
    if not (math.isfinite(low) and math.isfinite(high)):
        n_nan = int(np.isnan(res.bootstrap_distribution).sum())
        undefined = (f"BCa interval undefined: {n_nan} of {cfg.n_bootstrap} resamples had all-tied "
                     f"scores")
    return float(np.nanstd(res.bootstrap_distribution, ddof=1)), low, high, undefined


def _group_tau(axis: str, group: str, x: np.ndarray, y: np.ndarray, cfg: AgreementConfig,
               pooled: bool = False) -> GroupTau:
    n = int(x.size)
    pairs = n * (n - 1) // 2
    why = _degenerate(x, y)
    if why is not None:
        return GroupTau(group, n, pairs, math.nan, math.nan, math.nan, math.nan, axis=axis,
                        reason=why)
    tau = kendall_tau_b(x, y)
    label = f"{axis}={group}"
    p = _permutation_p(x, y, cfg, label)
    undefined = None
    if pooled:
        se, low, high, undefined = _pooled_bca(x, y, cfg)
        if undefined is None:
            return GroupTau(group, n, pairs, tau, p, low, high, axis=axis, se=se, ci_method="BCa")
    w = _stratified_weights([np.arange(n)], n, cfg.n_bootstrap, _rng(cfg.seed, "boot", label))
    reps = _tau_b_weighted(_signs(x), _signs(y), w)
    se, low, high, dropped = _percentile_ci(reps, cfg.confidence_level)
    reason = (f"{dropped} of {cfg.n_bootstrap} bootstrap resamples had all-tied scores and were "
              f"dropped") if dropped else None
    if undefined:
        reason = f"{undefined}; percentile interval instead. {reason or ''}".strip()
    return GroupTau(group, n, pairs, tau, p, low, high, axis=axis, se=se,
                    ci_method="percentile", reason=reason)


def _group_index(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Positions of each group, in order of first appearance in the table."""
    out: dict[str, np.ndarray] = {}
    for value in pd.unique(labels):
        out[str(value)] = np.flatnonzero(labels == value)
    return out


def _psi_replicates(w_BN: np.ndarray, sx: np.ndarray, sy: np.ndarray,
                    groups: Mapping[str, np.ndarray]) -> np.ndarray:
    """Ψ_axis per replicate: the mean over groups of the resampled group τ_b (NaN left out)."""
    taus = np.stack([_tau_b_weighted(sx[np.ix_(idx, idx)], sy[np.ix_(idx, idx)], w_BN[:, idx])
                     for idx in groups.values()], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(taus, axis=1)


def _psi_value(name: str, value: float, n_groups: int, reps: np.ndarray, level: float,
               reason: str | None) -> PsiValue:
    se, low, high, dropped = _percentile_ci(reps, level)
    if dropped and reason is None:
        reason = f"{dropped} of {reps.size} bootstrap replicates undefined and dropped"
    return PsiValue(name, value, n_groups, se, low, high, reason)


def _as_frame(table: Any) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    try:
        return pd.DataFrame(list(table))
    except TypeError as exc:
        raise ValueError("table must be a pandas DataFrame or a sequence of row mappings") from exc


def _finite_column(frame: pd.DataFrame, col: str) -> np.ndarray:
    values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"score column {col!r} has missing or non-finite values in rows "
                         f"{bad[:10].tolist()}; drop or fix those SAEs first")
    return values


def rank_agreement(table: Any, x: str, y: str, *, config: AgreementConfig | None = None,
                   architecture_col: str = AXES["A"], sparsity_col: str = AXES["B"],
                   model_col: str = AXES["C"]) -> AgreementTable:
    """Kendall τ_b between columns ``x`` and ``y`` of a table of SAEs, pooled and by axis.

    Args:
        table: one row per SAE (a DataFrame or a sequence of dicts) with the three axis columns
            and the two score columns, e.g. ``x='mu'``, ``y='g'`` for Table 1 or ``y='gain'`` for
            Table 3. Scores must be finite (drop failed SAEs first, and say so in the book).
        x, y: the score columns.
        config: resampling parameters (:class:`AgreementConfig`), validated here.
        architecture_col, sparsity_col, model_col: the axis columns (Ψ_A, Ψ_B, Ψ_C).

    Returns:
        An :class:`AgreementTable`; ``to_frame()`` gives the book's table.
    """
    cfg = (config or AgreementConfig()).validate()
    frame = _as_frame(table)
    axis_cols = {"A": architecture_col, "B": sparsity_col, "C": model_col}
    missing = [c for c in (x, y, *axis_cols.values()) if c not in frame.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; it has {list(frame.columns)}")
    if len(frame) == 0:
        raise ValueError("table has no rows (no SAEs)")
    xv, yv = (_finite_column(frame, col) for col in (x, y))
    n = xv.size

    pooled = _group_tau("pooled", "all", xv, yv, cfg, pooled=True)
    group_index = {letter: _group_index(frame[col].to_numpy()) for letter, col in axis_cols.items()}
    groups: list[GroupTau] = []
    for letter, index in group_index.items():
        groups.extend(_group_tau(AXES[letter], name, xv[idx], yv[idx], cfg)
                      for name, idx in index.items())

    sx, sy = _signs(xv), _signs(yv)
    level = cfg.confidence_level
    psis: dict[str, PsiValue] = {}
    for letter, index in group_index.items():
        taus = [g.tau for g in groups if g.axis == AXES[letter]]
        defined = int(np.isfinite(taus).sum())
        value = mean_of_group_taus(taus)
        reason = None if defined else f"no {AXES[letter]} group has a defined τ_b"
        if defined and defined < len(taus):
            reason = f"{len(taus) - defined} of {len(taus)} groups have no τ_b and are left out"
        w = _stratified_weights(list(index.values()), n, cfg.n_bootstrap,
                                _rng(cfg.seed, "psi", letter))
        reps = _psi_replicates(w, sx, sy, index)
        psis[letter] = _psi_value(f"Ψ_{letter}", value, defined, reps, level, reason)

    total = combine_psi(psis["A"].value, psis["B"].value, psis["C"].value)
    w = _stratified_weights(list(group_index["C"].values()), n, cfg.n_bootstrap,
                            _rng(cfg.seed, "psi", "all"))
    reps = np.mean([_psi_replicates(w, sx, sy, group_index[letter]) for letter in "ABC"], axis=0)
    reason = None if math.isfinite(total) else "some axis Ψ is undefined"
    psi = _psi_value("Ψ", total, sum(p.n_groups for p in psis.values()), reps, level, reason)
    return AgreementTable(x, y, pooled, tuple(groups), psis["A"], psis["B"], psis["C"], psi, cfg)
