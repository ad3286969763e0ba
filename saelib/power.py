"""How much steering data g(θ) needs to decide (protocol §4–5; issue "Steering with the power to
decide").

g(θ) is a mean over concepts of held-out harmonic-mean scores at each concept's α*. How close it
is to the SAE's utility depends on how many concepts it averages (concepts differ: between-concept
variance σ²_c) and how many held-out instructions each concept gets (answers differ: within-concept
variance σ²_w). From a pilot's rows, one-way random-effects ANOVA per SAE, pooled over SAEs, gives
both; then SE(g) = sqrt(σ²_c / C + σ²_w / (C · H)) for C concepts and H held-out instructions, which
is what :func:`design_table` minimises within a generation budget.

Rank agreement across SAEs is then limited twice: by the number of SAEs n (the sampling spread of
Kendall's τ_b) and by how much of the spread of g across SAEs is measurement noise. Under
independence sd(τ) = sqrt(2(2n + 5) / (9n(n − 1))) (Kendall 1938); noise attenuates a true
association roughly by sqrt(reliability), as for Pearson's r (Spearman's correction, an
approximation for τ), so :func:`saes_to_detect` asks for the n at which the attenuated τ clears
z_{1−α/2} + z_{power} standard deviations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from .observations import mean_ci
from .steering.axbench import heldout_at_star, steered_answers

#: The paper's pooled τ_b(μ, g) (Table 1), the association the default should be able to see.
PAPER_POOLED_TAU = 0.298


def g_interval(scores: Sequence[float], *, n_resamples: int = 9999, level: float = 0.95,
               seed: int = 0) -> tuple[float, float, float]:
    """g(θ) = mean of the concepts' held-out scores with a percentile bootstrap interval over
    concepts; ``(g, low, high)`` (NaN bounds with fewer than two concepts)."""
    return mean_ci(scores, n_resamples=n_resamples, level=level, seed=seed)


def heldout_cells(rows: Iterable[Mapping[str, Any]]) -> dict[int, list[float]]:
    """Each concept's held-out HM scores at its α* (chosen on the selection rows, as g does)."""
    cells: dict[int, list[float]] = {}
    for r in heldout_at_star(list(rows)):
        cells.setdefault(int(r["latent"]), []).append(float(r["hm"]))
    return cells


@dataclass(frozen=True)
class VarianceComponents:
    """Pooled one-way random-effects ANOVA of held-out HM at α*: concepts within an SAE.

    ``between_concept`` σ²_c and ``within_concept`` σ²_w; ``n_saes`` SAEs, ``n_concepts`` and
    ``n_heldout`` the mean pilot sizes per SAE (the pilot's own SE is :meth:`se` at them)."""

    between_concept: float
    within_concept: float
    n_saes: int
    n_concepts: float
    n_heldout: float

    def se(self, n_concepts: int | float, n_heldout: int | float) -> float:
        """Standard error of one SAE's g with ``n_concepts`` × ``n_heldout`` held-out answers."""
        return math.sqrt(self.between_concept / n_concepts
                         + self.within_concept / (n_concepts * n_heldout))

    def to_dict(self) -> dict[str, float]:
        return {"between_concept": self.between_concept, "within_concept": self.within_concept,
                "n_saes": self.n_saes, "n_concepts": self.n_concepts, "n_heldout": self.n_heldout,
                "pilot_se": self.se(self.n_concepts, self.n_heldout)}


def variance_components(rows_per_sae: Sequence[Iterable[Mapping[str, Any]]]) -> VarianceComponents:
    """σ²_c and σ²_w from pilot steering rows (one list of ``steering.jsonl`` rows per SAE).

    Per SAE, the within-concept sum of squares around each concept's mean and the between-concept
    sum of squares around the SAE's mean; pooled over SAEs by degrees of freedom (the SAEs' own
    means differ, which is what g is meant to measure, so they are not part of either term).
    σ²_c = (MS_between − σ²_w) / n̄ with n̄ the mean cell size, floored at 0."""
    ss_w = df_w = ss_b = df_b = 0.0
    sizes: list[int] = []
    concepts: list[int] = []
    for rows in rows_per_sae:
        cells = [np.asarray(v, dtype=float) for v in heldout_cells(rows).values() if len(v)]
        if not cells:
            continue
        concepts.append(len(cells))
        sizes.extend(len(c) for c in cells)
        grand = float(np.concatenate(cells).mean())
        ss_w += sum(float(((c - c.mean()) ** 2).sum()) for c in cells)
        df_w += sum(len(c) - 1 for c in cells)
        ss_b += sum(len(c) * (float(c.mean()) - grand) ** 2 for c in cells)
        df_b += len(cells) - 1
    if df_w <= 0 or df_b <= 0:
        raise ValueError("variance components need SAEs with at least two concepts and concepts "
                         "with at least two held-out answers at α*")
    within = ss_w / df_w
    n_bar = float(np.mean(sizes))
    between = max(0.0, (ss_b / df_b - within) / n_bar)
    return VarianceComponents(between, within, len(concepts), float(np.mean(concepts)), n_bar)


def design_table(vc: VarianceComponents, *, budget_generations: int, n_factors: int,
                 n_select: int = 5, min_concepts: int = 12, max_concepts: int = 100,
                 heldout: Iterable[int] = range(1, 11)) -> pd.DataFrame:
    """Every (concepts C ≥ ``min_concepts``, held-out H) design whose steered generations per SAE,
    C · (``n_select`` · ``n_factors`` + H) (selection instructions at every factor, held-out ones
    at α* only), fit ``budget_generations``, with its SE(g); sorted by SE, best first. Empty when
    even the smallest design does not fit."""
    rows = []
    for h in heldout:
        per_concept = steered_answers(1, n_select, h, n_factors)
        for c in range(min_concepts, max_concepts + 1):
            if c * per_concept > budget_generations:
                break
            rows.append({"concepts": c, "heldout": h, "instructions": n_select + h,
                         "generations": c * per_concept, "se": vc.se(c, h)})
    cols = ["concepts", "heldout", "instructions", "generations", "se"]
    return pd.DataFrame(rows, columns=cols).sort_values(["se", "generations"], ignore_index=True)


def tau_null_sd(n: int) -> float:
    """Standard deviation of Kendall's τ over n pairs under independence (no ties)."""
    if n < 2:
        return math.inf
    return math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))


def reliability(g_values: Sequence[float], ses: Sequence[float]) -> float:
    """Share of the spread of g across SAEs that is not measurement noise:
    1 − mean(SE²) / var(g), floored at 0 (NaN with fewer than two SAEs)."""
    g = np.asarray(g_values, dtype=float)
    se = np.asarray(ses, dtype=float)
    keep = np.isfinite(g) & np.isfinite(se)
    g, se = g[keep], se[keep]
    if len(g) < 2 or not g.var(ddof=1) > 0:
        return math.nan
    return max(0.0, 1.0 - float((se ** 2).mean()) / float(g.var(ddof=1)))


def saes_to_detect(tau: float = PAPER_POOLED_TAU, *, rel: float = 1.0, alpha: float = 0.05,
                   power: float = 0.8, max_n: int = 100_000) -> int | None:
    """Smallest number of SAEs at which a true τ_b of ``tau``, attenuated by sqrt(``rel``), is
    detected by a two-sided test at ``alpha`` with probability ``power``; None when it never is
    (no reliable signal, or beyond ``max_n``)."""
    if not (rel > 0 and tau != 0):
        return None
    target = abs(tau) * math.sqrt(rel)
    need = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    lo, hi = 2, max_n
    if target / tau_null_sd(hi) < need:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if target / tau_null_sd(mid) >= need:
            hi = mid
        else:
            lo = mid + 1
    return lo


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m saelib.power --profile NAME [--budget-factor 4 | --budget N]``: the variance
    components of a finished run's steering rows and the designs that fit ``budget-factor`` times
    the profile's steered generations per SAE (or ``N`` of them), best first (the pilot behind a
    profile's ``steering`` section)."""
    import argparse

    from . import report
    from .stages.layout import as_profile

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default")
    budget_arg = ap.add_mutually_exclusive_group()
    budget_arg.add_argument("--budget-factor", type=float, default=4.0)
    budget_arg.add_argument("--budget", type=int, default=None,
                            help="steered generations per SAE (instead of --budget-factor)")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    profile = as_profile(args.profile)
    steering = profile.section("steering")
    rows = report.steering_rows(profile)
    if not rows:
        raise SystemExit(f"profile {profile.name!r}: no steering rows under {profile.run_root()}; "
                         "run its grid first")
    vc = variance_components(rows)
    now = steering.answers_per_sae()
    budget = args.budget if args.budget is not None else int(args.budget_factor * now)
    if budget < 1:
        raise SystemExit(f"the budget must be at least one generation per SAE, got {budget}")
    print(f"{vc.n_saes} SAEs; between-concept variance {vc.between_concept:.4f}, within-concept "
          f"{vc.within_concept:.4f}; SE(g) now {vc.se(vc.n_concepts, vc.n_heldout):.4f} "
          f"({vc.n_concepts:.1f} concepts x {vc.n_heldout:.1f} held-out answers at α*)")
    print(f"designs within {budget} steered generations per SAE ({budget / now:.3g}x today's "
          f"{now}), {len(steering.factors)} factors, {steering.n_select} selection instructions:")
    table = design_table(vc, budget_generations=budget, n_factors=len(steering.factors),
                         n_select=steering.n_select)
    print(table.head(args.top).to_string(index=False) if len(table) else "  none fits")


if __name__ == "__main__":
    main()
