"""AxBench's steering protocol: factor selection, held-out scores and g(θ) (protocol §4).

For each concept (a CONCEPT100 latent, its AutoInterp explanation as the concept text), 10
instructions are drawn; the first ``n_select`` choose the factor, the rest are held out. Each
selection instruction is steered at every factor, each held-out one at α* only (protocol §4: the
held-out score is read at α*; :func:`saelib.steering.run.steer_concepts` generates in that
order). Every generation is rated 0–2 on concept, instruction and fluency, and

* HM = 0 if any rating is 0, else 3 / (1/C + 1/I + 1/F)  (:func:`harmonic_mean`);
* α* = argmax over factors of the mean HM on the selection instructions (ties: the smaller
  factor, the gentler intervention);
* the concept's score = mean HM on the held-out instructions at α*;
* g(θ) = mean over concepts.

Only selection rows enter α*: :func:`concept_scores` never reads a held-out rating before α* is
fixed (tests/test_steering.py checks it by giving the held-out rows a different argmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..judges.base import Ratings
from .intervene import MODES

#: AxBench's factor grid (list it as a profile's ``steering.factors`` to use it).
AXBENCH_FACTORS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0,
                                      4.0, 5.0)


@dataclass(frozen=True)
class SteeringConfig:
    """The profile's ``steering`` section (protocol §4).

    ``n_concepts``: how many CONCEPT100 latents are steered (all 100 in the paper; CPU profiles
    steer fewer, the first ones of the seeded CONCEPT100 order). ``n_instructions`` per concept,
    of which the first ``n_select`` select the factor. ``factors``: the α grid (6 values by
    default; the paper leaves them open). ``mode``: ``add`` (the paper's x + α·m_f·W_dec[f]) or
    ``clamp`` (f's code set to α·m_f inside the reconstruction). Generation: ``max_new_tokens``,
    ``temperature`` (0 = greedy), ``seed``, ``batch_size`` rows per forward pass.
    ``instruction_source`` / ``instruction_field``: see :mod:`saelib.data.instructions`.
    ``n_examples``: concepts shown on the book's example page. ``engine``: the generator
    (:data:`saelib.steering.generate.ENGINES`; ``lean`` computes the reference's function at a
    fraction of its cost, ``bench/steer.py``); ``dtype``: the weights its blocks run in (``float32``
    or ``bfloat16``, :class:`saelib.steering.generate.GenerationConfig`).
    ``calibration_instructions`` × ``calibration_concepts``: the fixed seeded set the offline
    judge calibrates on, once per model (:func:`saelib.steering.run.judge_calibration`).
    """

    n_concepts: int = 100
    n_instructions: int = 10
    n_select: int = 5
    factors: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    mode: str = "add"
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 32
    instruction_source: str = "packaged"
    instruction_field: str = "instruction"
    n_examples: int = 3
    calibration_instructions: int = 24
    calibration_concepts: int = 24
    engine: str = "lean"
    dtype: str = "float32"

    def answers_per_sae(self, n_concepts: int | None = None) -> int:
        """Steered generations of one SAE under this section (:func:`steered_answers`), for
        ``n_concepts`` concepts (default: the section's)."""
        return steered_answers(self.n_concepts if n_concepts is None else n_concepts,
                               self.n_select, self.n_instructions - self.n_select,
                               len(self.factors))

    def validate(self) -> None:
        if self.n_concepts < 1:
            raise ValueError(f"n_concepts must be >= 1, got {self.n_concepts}")
        if not 1 <= self.n_select < self.n_instructions:
            raise ValueError(f"need 1 <= n_select < n_instructions (some instructions select, the "
                             f"rest are held out), got n_select={self.n_select}, "
                             f"n_instructions={self.n_instructions}")
        if not self.factors:
            raise ValueError("factors is empty: give at least one steering factor")
        if any(not math.isfinite(a) or a < 0 for a in self.factors):
            raise ValueError(f"factors must be finite and >= 0, got {list(self.factors)}")
        if len(set(self.factors)) != len(self.factors):
            raise ValueError(f"factors lists a value twice: {list(self.factors)}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is unknown; valid: {', '.join(MODES)}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.n_examples < 0:
            raise ValueError("max_new_tokens and batch_size must be >= 1, n_examples >= 0")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        from .generate import ENGINES, GenerationConfig  # here: importing it loads TransformerLens

        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is unknown; valid: {', '.join(ENGINES)}")
        GenerationConfig(engine=self.engine, dtype=self.dtype).validate()
        if self.calibration_instructions < 2 or self.calibration_concepts < 1:
            raise ValueError("calibration_instructions must be >= 2 and calibration_concepts >= 1, "
                             f"got {self.calibration_instructions}, {self.calibration_concepts}")


def harmonic_mean(r: Ratings) -> float:
    """AxBench's aggregate: 0 if any rating is 0, else the harmonic mean of the three."""
    vals = (r.concept, r.instruction, r.fluency)
    if any(v <= 0 for v in vals):
        return 0.0
    return 3.0 / sum(1.0 / v for v in vals)


def steered_answers(n_concepts: int, n_select: int, n_heldout: int, n_factors: int) -> int:
    """Steered generations of one SAE: each concept's selection instructions at every factor,
    its held-out ones at α* only (:func:`saelib.steering.run.steer_concepts`)."""
    return n_concepts * (n_select * n_factors + n_heldout)


def split_of(index: int, n_select: int) -> str:
    """``select`` for the first ``n_select`` instructions of a concept, ``heldout`` after."""
    return "select" if index < n_select else "heldout"


@dataclass(frozen=True)
class ConceptScore:
    """One concept's factor choice and held-out score."""

    latent: int
    alpha_star: float
    select_hm: dict[float, float]
    heldout_hm: dict[float, float]
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"latent": self.latent, "alpha_star": self.alpha_star, "score": self.score,
                "select_hm": {str(a): v for a, v in self.select_hm.items()},
                "heldout_hm": {str(a): v for a, v in self.heldout_hm.items()}}


def _mean_by_alpha(rows: Iterable[Mapping[str, Any]]) -> dict[float, float]:
    acc: dict[float, list[float]] = {}
    for r in rows:
        acc.setdefault(float(r["alpha"]), []).append(float(r["hm"]))
    return {a: float(np.mean(v)) for a, v in sorted(acc.items())}


def _best_alpha(select_hm: Mapping[float, float]) -> float:
    """The factor with the best mean selection HM (ties: the smaller factor)."""
    best = max(select_hm.values())
    return min(a for a, v in select_hm.items() if v == best)


def alpha_stars(rows: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """α* per concept from its ``select`` rows only (ties: the smaller factor)."""
    by_latent: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["split"] == "select":
            by_latent.setdefault(int(r["latent"]), []).append(r)
    return {latent: _best_alpha(_mean_by_alpha(rs)) for latent, rs in by_latent.items()}


def heldout_at_star(rows: Sequence[Mapping[str, Any]],
                    star: Mapping[int, float] | None = None) -> list[Mapping[str, Any]]:
    """The held-out rows at each concept's α*: the generations g(θ) averages (protocol §4).
    ``star``: α* per latent as recorded; default :func:`alpha_stars` of ``rows``."""
    star = alpha_stars(rows) if star is None else star
    return [r for r in rows if r["split"] == "heldout"
            and float(r["alpha"]) == star.get(int(r["latent"]))]


def concept_scores(rows: Sequence[Mapping[str, Any]]) -> list[ConceptScore]:
    """Per concept: α* from the ``select`` rows only, then the mean HM of the ``heldout`` rows at
    α*. ``rows`` are steered generations with keys ``latent``, ``split``, ``alpha``, ``hm``."""
    by_latent: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_latent.setdefault(int(r["latent"]), []).append(r)
    out = []
    for latent, rs in by_latent.items():
        select = _mean_by_alpha(r for r in rs if r["split"] == "select")
        if not select:
            raise ValueError(f"concept {latent} has no selection rows: α* cannot be chosen")
        alpha_star = _best_alpha(select)
        heldout = _mean_by_alpha(r for r in rs if r["split"] == "heldout")
        if alpha_star not in heldout:
            raise ValueError(f"concept {latent} has no held-out rows at α* = {alpha_star}")
        out.append(ConceptScore(latent, alpha_star, select, heldout, heldout[alpha_star]))
    return out


def steering_score(scores: Sequence[ConceptScore]) -> float | None:
    """g(θ) = mean held-out score over concepts (None with no concept)."""
    return float(np.mean([s.score for s in scores])) if scores else None
