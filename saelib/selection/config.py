"""The profile's ``selection`` section (protocol §6): how features are amplified and scored."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .amplify import VARIANTS


@dataclass(frozen=True)
class SelectionConfig:
    """ΔC_k and output-score parameters.

    ``prefix``: the neutral prompt whose next-token distribution is read (the paper's "From my
    experience,"; the model's BOS is put first, as in every captured context). ``k``: top-k size of
    C_k (paper: 1). ``alpha``: amplification (paper: 10). ``variant``: ``arad`` (default),
    ``scale`` or ``decode`` (:mod:`saelib.selection.amplify`). ``lens_top``: logit-lens tokens per
    feature for the output score (Arad et al.: 20). ``batch_size``: features per forward pass.

    Tiers (:mod:`saelib.selection.tiers`): ``top_ks`` and ``quantiles`` over the candidate pool
    (the SAE's scored latents that have an explanation), in both ΔC_k directions; the paper uses
    K ∈ {1..5} and q ∈ {0.99, 0.95, 0.90, 0.80}. A quantile tier of a 1,000-latent pool holds
    10–200 features, each steered like a concept, so CPU profiles keep ``quantiles`` empty.
    ``steer_tiers`` false computes the scores only.
    """

    prefix: str = "From my experience,"
    k: int = 1
    alpha: float = 10.0
    variant: str = "arad"
    lens_top: int = 20
    batch_size: int = 256
    top_ks: tuple[int, ...] = (1, 2, 3, 4, 5)
    quantiles: tuple[float, ...] = ()
    steer_tiers: bool = True

    def validate(self) -> None:
        if not self.prefix.strip():
            raise ValueError("prefix is empty")
        if self.k < 1 or self.lens_top < 1 or self.batch_size < 1:
            raise ValueError("k, lens_top and batch_size must be >= 1")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got {self.alpha}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; valid: {', '.join(VARIANTS)}")
        if any(k < 1 for k in self.top_ks) or any(not 0 < q < 1 for q in self.quantiles):
            raise ValueError(f"top_ks must be >= 1 and quantiles in (0, 1), got {list(self.top_ks)} "
                             f"and {list(self.quantiles)}")
        if self.steer_tiers and not (self.top_ks or self.quantiles):
            raise ValueError("steer_tiers needs at least one tier: give top_ks or quantiles")
