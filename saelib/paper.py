"""The paper's reported numbers, as typed constants, so the book can put "ours beside theirs".

Source: Wang, Hu, Wang, Zou, "Does higher interpretability imply better utility? A Pairwise
Analysis on Sparse Autoencoders", ICLR 2026 (arXiv 2510.03659), as transcribed in the project's
specification (``shared/protocol.md``; section numbers below are the protocol's, the table and
figure numbers the paper's). Nothing here is measured by this project: these are the values to
compare against, never inputs to our pipeline.

Versions: the numbers are arXiv v1's unless a table's ``other_versions`` says otherwise; where
versions differ, both are kept with their source (Table 3's pooled τ_b and Ψ), and the book shows
both. The τ the paper prints as a formula, (concordant − discordant) / (n(n−1)/2), is Kendall's
τ_a, while its numbers are scipy's ``kendalltau`` default, τ_b (ties corrected): this project
computes τ_b (:data:`TAU_NOTE`).

Also here: :func:`improvement_over_output_score`, the two readings of "how much better than the
output score" that Table 2 supports (the abstract's 52.52 % is one of them), computed from any
three-method steering table, the paper's or ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "MODELS", "HUB_NAMES", "ARCHITECTURES", "PaperTauTable", "PaperSteeringTable", "ImprovementFigures",
    "TABLE1", "TABLE2", "TABLE3", "TAU_NOTE", "ABSTRACT_POOLED_TAU", "ABSTRACT_IMPROVEMENT_PCT",
    "LAYERS", "WIDTH", "TRAINING_TOKENS", "TARGET_L0", "RELU_L1", "GATED_L1",
    "TRAINING_HOURS", "TRAINING_GPU", "SAES_PER_MODEL", "SAEBENCH_HOURS_PER_SAE",
    "AXBENCH_STEERING_HOURS_PER_SAE", "JUDGE_FEES_USD_PER_SAE", "improvement_over_output_score",
]

#: The three LLMs, in the paper's column order (protocol §2; Tables 1–2).
MODELS: tuple[str, ...] = ("Gemma-2-2B", "Qwen-2.5-3B", "Gemma-2-9B")
#: The three LLMs' hub ids (their shapes: ``saelib.plan.MODEL_SHAPES``).
HUB_NAMES: Mapping[str, str] = MappingProxyType({
    "Gemma-2-2B": "google/gemma-2-2b", "Qwen-2.5-3B": "Qwen/Qwen2.5-3B",
    "Gemma-2-9B": "google/gemma-2-9b"})
#: The five SAE architectures (protocol §2).
ARCHITECTURES: tuple[str, ...] = ("ReLU", "Gated", "JumpReLU", "TopK", "BatchTopK")


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class PaperTauTable:
    """A τ_b table of the paper: pooled τ_b with its BCa CI, Ψ by axis, and per-model τ_b where
    the paper gives them (empty mapping where it does not). ``source``: the paper version these
    numbers come from; ``other_versions``: source → {"pooled", "psi", ...} where another version
    of the paper reports different values."""

    pooled: float
    pooled_ci: tuple[float, float]
    psi_a: float
    psi_b: float
    psi_c: float
    psi: float
    per_model: Mapping[str, float]
    source: str = "arXiv v1"
    other_versions: Mapping[str, Mapping[str, float]] = field(
        default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class PaperSteeringTable:
    """Table 2: mean steering score per model for each selection method, and the reported lifts
    of ΔC_k over no selection (percent)."""

    no_selection: Mapping[str, float]
    output_score: Mapping[str, float]
    delta_ck: Mapping[str, float]
    lift_delta_ck_pct: Mapping[str, float]


# Table 1: τ_b between interpretability μ and steering score g (protocol §5).
TABLE1 = PaperTauTable(
    pooled=0.2979, pooled_ci=(0.1590, 0.4191),
    psi_a=0.2575, psi_b=0.1651, psi_c=0.3272, psi=0.2499,
    per_model=_frozen({"Gemma-2-2B": 0.2184, "Qwen-2.5-3B": 0.4575, "Gemma-2-9B": 0.3057}),
)

# Table 3: τ_b between μ and the steering gain L after ΔC_k selection (protocol §5). The ICLR
# version reports a different pooled τ_b and Ψ (sign flipped); no CI or per-axis values for it.
TABLE3 = PaperTauTable(
    pooled=-0.0692, pooled_ci=(-0.2019, 0.0666),
    psi_a=-0.0719, psi_b=0.0127, psi_c=-0.1111, psi=-0.0568,
    per_model=_frozen({}),
    other_versions=_frozen({"ICLR 2026": _frozen({"pooled": 0.0823, "psi": 0.0681})}),
)

#: Why the τ formula printed in the paper and the numbers it reports differ (module doc).
TAU_NOTE: str = ("The paper prints Kendall's τ as (concordant − discordant) / (n(n−1)/2), which is "
                 "τ_a; its reported numbers are scipy.stats.kendalltau's default, τ_b, which "
                 "corrects for ties. This book computes τ_b throughout.")

# Table 2: steering score by selection method, and ΔC_k's lift over no selection (protocol §6).
TABLE2 = PaperSteeringTable(
    no_selection=_frozen({"Gemma-2-2B": 0.133, "Qwen-2.5-3B": 0.171, "Gemma-2-9B": 0.142}),
    output_score=_frozen({"Gemma-2-2B": 0.233, "Qwen-2.5-3B": 0.292, "Gemma-2-9B": 0.255}),
    delta_ck=_frozen({"Gemma-2-2B": 0.328, "Qwen-2.5-3B": 0.399, "Gemma-2-9B": 0.289}),
    lift_delta_ck_pct=_frozen({"Gemma-2-2B": 146.6, "Qwen-2.5-3B": 133.3, "Gemma-2-9B": 103.5}),
)

#: Abstract: "τ_b ≈ 0.298" (the pooled τ_b of Table 1, rounded).
ABSTRACT_POOLED_TAU: float = 0.298
#: Abstract: ΔC_k "improves the steering performance of three LLMs by 52.52 %" over the output
#: score; Table 2 shows this is the difference of mean lifts in percentage points (protocol §6).
ABSTRACT_IMPROVEMENT_PCT: float = 52.52

# SAE setup (protocol §2).
#: Hooked layer (residual stream, block output) per model.
LAYERS: Mapping[str, int] = _frozen({"Gemma-2-2B": 12, "Qwen-2.5-3B": 17, "Gemma-2-9B": 20})
#: SAE width (latents).
WIDTH: int = 16_384
#: Training tokens per SAE (approximate, The Common Pile v0.1).
TRAINING_TOKENS: float = 5e8
#: Target L0 of the six sparsity levels (TopK/BatchTopK k; JumpReLU L0 target).
TARGET_L0: tuple[int, ...] = (50, 80, 160, 320, 520, 820)
#: L1 coefficients of the six ReLU SAEs.
RELU_L1: tuple[float, ...] = (0.012, 0.015, 0.02, 0.03, 0.04, 0.06)
#: L1 coefficients of the six Gated SAEs.
GATED_L1: tuple[float, ...] = (0.012, 0.018, 0.024, 0.04, 0.06, 0.08)

# Costs (protocol §7, appendix tables; the book shows ours measured beside these).
#: GPU of every cost figure below.
TRAINING_GPU: str = "NVIDIA A800"
#: SAEs trained per model (5 architectures × 6 sparsities).
SAES_PER_MODEL: int = 30
#: Wall-clock hours to train all 30 SAEs of a model.
TRAINING_HOURS: Mapping[str, float] = _frozen({"Gemma-2-2B": 17.0, "Qwen-2.5-3B": 37.0,
                                               "Gemma-2-9B": 60.0})
#: SAEBench evaluation, hours per SAE (≈).
SAEBENCH_HOURS_PER_SAE: float = 1.0
#: AxBench steering evaluation, hours per SAE (range reported, ≈).
AXBENCH_STEERING_HOURS_PER_SAE: tuple[float, float] = (15.0, 23.0)
#: LLM-judge fees (gpt-4o-mini) per SAE, US dollars (≈).
JUDGE_FEES_USD_PER_SAE: float = 5.0


@dataclass(frozen=True)
class ImprovementFigures:
    """Both readings of "ΔC_k improves on the output score" (protocol §6), per model and mean.

    * ``relative_gain_pct``: (g_ΔC − g_out) / g_out × 100, the ordinary relative improvement of
      ΔC_k's steering score over the output score's (Table 2 gives ≈ 30.3 % on average).
    * ``mean_lift_difference_pp``: mean lift of ΔC_k over no selection minus mean lift of the
      output score over no selection, in percentage points; this is what the abstract's 52.52 %
      matches (Table 2's rounded scores give ≈ 52.65).
    """

    lift_delta_ck_pct: Mapping[str, float]
    lift_output_score_pct: Mapping[str, float]
    relative_gain_pct: Mapping[str, float]
    mean_relative_gain_pct: float
    mean_lift_delta_ck_pct: float
    mean_lift_output_score_pct: float
    mean_lift_difference_pp: float


def improvement_over_output_score(no_selection: Mapping[str, float],
                                  output_score: Mapping[str, float],
                                  delta_ck: Mapping[str, float]) -> ImprovementFigures:
    """Lifts and improvements from a steering table with three methods (Table 2's layout).

    Lift of a method = (g_method − g_none) / g_none × 100 (protocol §6's L, on the model means).
    Means are unweighted over models. Pass ``TABLE2.no_selection, TABLE2.output_score,
    TABLE2.delta_ck`` for the paper's figures, or our measured per-model means.
    """
    models = list(no_selection)
    if not models:
        raise ValueError("no models given")
    for name, table in (("output_score", output_score), ("delta_ck", delta_ck)):
        if set(table) != set(models):
            raise ValueError(f"{name} must have the same models as no_selection {models}, got "
                             f"{list(table)}")
    for name, table in (("no_selection", no_selection), ("output_score", output_score)):
        bad = [m for m in models if not float(table[m]) > 0]
        if bad:
            raise ValueError(f"{name} scores must be > 0 to divide by, not for {bad}")

    def lift(method: Mapping[str, float]) -> dict[str, float]:
        return {m: (float(method[m]) - float(no_selection[m])) / float(no_selection[m]) * 100.0
                for m in models}

    lift_dc, lift_out = lift(delta_ck), lift(output_score)
    rel = {m: (float(delta_ck[m]) - float(output_score[m])) / float(output_score[m]) * 100.0
           for m in models}
    mean_dc = sum(lift_dc.values()) / len(models)
    mean_out = sum(lift_out.values()) / len(models)
    return ImprovementFigures(
        lift_delta_ck_pct=_frozen(lift_dc), lift_output_score_pct=_frozen(lift_out),
        relative_gain_pct=_frozen(rel), mean_relative_gain_pct=sum(rel.values()) / len(models),
        mean_lift_delta_ck_pct=mean_dc, mean_lift_output_score_pct=mean_out,
        mean_lift_difference_pp=mean_dc - mean_out,
    )
