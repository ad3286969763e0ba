"""The paper's three key observations, each checked against our numbers with an interval.

The paper (abstract, §5–6) makes three claims; the book's "Key observations" page states, for
each, the paper's figure, ours with a 95 % interval, its half-width and n, and a verdict computed
by a fixed rule written here, so no verdict is typed by hand. A verdict the data cannot support
says so: *inconclusive (underpowered)*, never a guess.

1. **μ and g agree weakly and positively**: pooled Kendall τ_b(μ, g) ≈ 0.30, BCa CI [0.16, 0.42]
   (Table 1). *Reproduces* when our pooled τ_b's CI lies above 0; *contradicted* when it lies
   below 0; otherwise *inconclusive (underpowered)*.
2. **ΔC_k selection raises steering, more than the output score**: Table 2, lifts of 104–147 %
   over no selection, and 52.52 percentage points more than the output score's. The test is the
   paired per-SAE difference of steering scores (ΔC_k tier minus no selection; ΔC_k minus the
   output-score baseline of the same size), mean with a percentile bootstrap CI
   (``scipy.stats.bootstrap``, resampling SAEs). *Reproduces* when both CIs lie above 0;
   *contradicted* when either lies below 0; otherwise *inconclusive (underpowered)*. Reported
   for the paper's tier pick (best held-out tier, as the paper) and for the honest pick.
3. **After selection, μ no longer tracks the gain**: τ_b(μ, lift) ≈ −0.07, CI [−0.20, 0.07]
   (Table 3). "No association" is an equivalence claim, so it needs an equivalence band: a CI
   that merely contains 0 is what any small sample gives. *Reproduces* only when our CI lies
   inside (−b, b) with b = :data:`EQUIVALENCE_BAND` = 0.2 (the paper's own CI, [−0.20, 0.07],
   touches its lower edge); *contradicted* when the CI excludes 0 and does not fit in the band
   (a real association); otherwise *inconclusive (underpowered)*.

Behind any verdict other than *inconclusive* stand at least :data:`MIN_SAES` SAEs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.stats import bootstrap

from .paper import TABLE1, TABLE2, TABLE3

REPRODUCES = "reproduces"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive (underpowered)"
NO_DATA = "no data"
#: Half-width of the band of τ_b values that count as "no association" (observation 3).
EQUIVALENCE_BAND = 0.2
#: Fewest SAEs behind a verdict other than *inconclusive*. A bootstrap over n SAEs draws from
#: C(2n − 1, n) distinct resamples: 126 at n = 5, 3 at n = 2, where a perfectly tied τ_b gives the
#: "interval" [−1, −1]; 6,435 at n = 8.
MIN_SAES = 8


@dataclass(frozen=True)
class Observation:
    """One claim: the paper's figure, ours with its interval, and the verdict.

    ``half_width``: half the width of the interval the verdict reads (the widest, for
    observation 2's two differences); NaN when there is none.
    """

    number: int
    claim: str
    paper: str
    ours: str
    verdict: str
    n: int
    half_width: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"observation": self.number, "claim": self.claim, "paper": self.paper,
                "ours": self.ours, "verdict": self.verdict, "n_saes": self.n,
                "ci_half_width": self.half_width}


def interval_verdict(low: float, high: float, *, expect: str,
                     band: float = EQUIVALENCE_BAND) -> str:
    """``expect='positive'``: reproduces if the interval lies above 0, contradicted if below,
    else inconclusive. ``expect='null'``: reproduces if it lies inside (−band, band),
    contradicted if it excludes 0 outside that band, else inconclusive. NaN bounds give
    :data:`NO_DATA`."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return NO_DATA
    if expect == "positive":
        return REPRODUCES if low > 0 else CONTRADICTED if high < 0 else INCONCLUSIVE
    if expect == "null":
        if -band < low and high < band:
            return REPRODUCES
        return CONTRADICTED if (low > 0 or high < 0) else INCONCLUSIVE
    raise ValueError(f"expect must be 'positive' or 'null', got {expect!r}")


def with_enough_saes(verdict: str, n: int) -> str:
    """``verdict``, or *inconclusive* when fewer than :data:`MIN_SAES` SAEs stand behind it."""
    return INCONCLUSIVE if verdict in (REPRODUCES, CONTRADICTED) and n < MIN_SAES else verdict


def half_width(low: float, high: float) -> float:
    """Half the width of an interval (NaN when a bound is missing)."""
    return (high - low) / 2 if math.isfinite(low) and math.isfinite(high) else math.nan


def mean_ci(values: Sequence[float], *, n_resamples: int = 9999, level: float = 0.95,
            seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` with a percentile bootstrap CI (scipy.stats.bootstrap); NaNs dropped.
    Fewer than 2 values, or all equal, give a degenerate (NaN or point) interval."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) < 2:
        return float(x.mean()), math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0]), float(x[0])
    res = bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=level,
                    method="percentile", random_state=np.random.default_rng(seed))
    return float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def _fmt_tau(tau: float, low: float, high: float, n: int) -> str:
    if not math.isfinite(tau):
        return f"undefined (n = {n})"
    return f"τ_b = {tau:.3f} [{low:.3f}, {high:.3f}] (± {half_width(low, high):.3f}), n = {n}"


def _tau_observation(number: int, claim: str, paper_table, table, missing: str,
                     expect: str) -> Observation:
    """Observations 1 and 3: the pooled τ_b of ``table`` (an :class:`saelib.stats.AgreementTable`
    or None) against the paper's, judged by :func:`interval_verdict`."""
    lo, hi = paper_table.pooled_ci
    paper = f"τ_b = {paper_table.pooled:.3f} [{lo:.3f}, {hi:.3f}], 90 SAEs ({paper_table.source})"
    for source, values in paper_table.other_versions.items():
        paper += f"; τ_b = {values['pooled']:.3f} ({source})"
    if table is None:
        return Observation(number, claim, paper, missing, NO_DATA, 0)
    p = table.pooled
    ours = _fmt_tau(p.tau, p.ci_low, p.ci_high, p.n)
    if p.ci_method != "BCa" and math.isfinite(p.tau):  # stats: heavily tied scores, BCa undefined
        ours += f" ({p.ci_method} interval: BCa undefined on tied scores)"
    if expect == "null":
        ours += f"; equivalence band |τ_b| < {EQUIVALENCE_BAND}"
    verdict = with_enough_saes(interval_verdict(p.ci_low, p.ci_high, expect=expect), p.n)
    return Observation(number, claim, paper, ours, verdict, p.n, half_width(p.ci_low, p.ci_high))


def observation_1(table1) -> Observation:
    """``table1``: :class:`saelib.stats.AgreementTable` of μ vs g (or None)."""
    return _tau_observation(1, "Higher interpretability goes with better steering, weakly "
                               "(pooled τ_b(μ, g) > 0).", TABLE1, table1,
                            "no SAE has both μ and g", "positive")


def observation_2(table, way: str = "paper", *, n_resamples: int = 9999, seed: int = 0) -> Observation:
    """``table``: :func:`saelib.report.sae_table` with selection columns; ``way``: 'paper' or
    'honest' tier pick."""
    claim = (f"ΔC_k selection raises steering above no selection and above the output score "
             f"({way} tier pick).")
    paper = (f"lift 104–147 % over none; +52.52 pp of mean lift over the output score; in score "
             f"units, as ours: g_ΔC − g = {_paper_mean_gap(TABLE2.no_selection):+.3f}, g_ΔC − "
             f"g_out = {_paper_mean_gap(TABLE2.output_score):+.3f} (means over its 3 models)")
    cols = ["g", f"{way}_g_delta_conf", f"{way}_g_output_score"]
    if not set(cols) <= set(table):
        return Observation(2, claim, paper, "no SAE has a selection result", NO_DATA, 0)
    done = table.dropna(subset=cols)
    if done.empty:
        return Observation(2, claim, paper, "no SAE has a selection result", NO_DATA, 0)
    d_none = (done[cols[1]] - done["g"]).tolist()
    d_out = (done[cols[1]] - done[cols[2]]).tolist()
    m1, l1, h1 = mean_ci(d_none, n_resamples=n_resamples, seed=seed)
    m2, l2, h2 = mean_ci(d_out, n_resamples=n_resamples, seed=seed + 1)
    v1 = interval_verdict(l1, h1, expect="positive")
    v2 = interval_verdict(l2, h2, expect="positive")
    order = [CONTRADICTED, NO_DATA, INCONCLUSIVE, REPRODUCES]
    verdict = with_enough_saes(min((v1, v2), key=order.index), len(done))
    w1, w2 = half_width(l1, h1), half_width(l2, h2)
    ours = (f"g_ΔC − g = {m1:+.3f} [{l1:+.3f}, {h1:+.3f}] (± {w1:.3f}); g_ΔC − g_out = "
            f"{m2:+.3f} [{l2:+.3f}, {h2:+.3f}] (± {w2:.3f}) (mean g = {done['g'].mean():.3f}), "
            f"n = {len(done)}")
    return Observation(2, claim, paper, ours, verdict, len(done), max(w1, w2))


def _paper_mean_gap(baseline) -> float:
    """Table 2's ΔC_k score minus ``baseline``'s, averaged over the paper's models: the paper's
    observation 2 in the units ours is measured in (a mean of per-model means)."""
    return float(np.mean([TABLE2.delta_ck[m] - baseline[m] for m in TABLE2.delta_ck]))


def observation_3(table3) -> Observation:
    """``table3``: :class:`saelib.stats.AgreementTable` of μ vs the lift (or None)."""
    return _tau_observation(3, "After ΔC_k selection, interpretability no longer predicts the "
                               "steering gain (τ_b ≈ 0).", TABLE3, table3,
                            "fewer than two SAEs have a defined lift", "null")


def key_observations(table, table1=None, table3=None, *, n_resamples: int = 9999,
                     seed: int = 0) -> list[Observation]:
    """The three observations (the second for both tier picks), in the book's order."""
    return [observation_1(table1),
            observation_2(table, "paper", n_resamples=n_resamples, seed=seed),
            observation_2(table, "honest", n_resamples=n_resamples, seed=seed),
            observation_3(table3)]


def observations_frame(observations: Sequence[Observation]):
    return pd.DataFrame([o.to_dict() for o in observations])
