"""The profile's ``selection`` section (protocol §6): how features are amplified and scored."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..models import opened_with
from .amplify import VARIANTS

#: The valid values of ``SelectionConfig.prefix_bos``.
PREFIX_BOS = ("as_captured", "bos", "none")


@dataclass(frozen=True)
class SelectionConfig:
    """ΔC_k and output-score parameters.

    ``prefix``: the neutral prompt whose next-token distribution is read (the paper's "From my
    experience,"). ``prefix_bos``: what opens it: ``as_captured`` (default: the token that opened
    every captured context, so the SAE sees the prefix as it saw its training data; for SmolLM2
    that is ``<|im_start|>``, which its tokenizer does not add by itself), ``bos`` (the
    tokenizer's BOS, if it has one) or ``none`` (the prefix's own tokens only; the paper does not
    say, and on a random SAE the choice moves ΔC_k by up to 0.96). ``k``: top-k size of
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
    prefix_bos: str = "as_captured"
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
        if self.prefix_bos not in PREFIX_BOS:
            raise ValueError(f"prefix_bos {self.prefix_bos!r} is unknown; valid: "
                             f"{', '.join(PREFIX_BOS)}")
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

    def prefix_ids(self, tokenizer, captured_bos: int | None) -> list[int]:
        """The prefix's token ids, opened as ``prefix_bos`` says; ``captured_bos`` is the token
        that opened every captured context (the corpus manifest's ``bos_id``). A first token that
        already is the opening one is not doubled."""
        first = {"as_captured": captured_bos, "bos": tokenizer.bos_token_id,
                 "none": None}[self.prefix_bos]
        return opened_with(tokenizer(self.prefix, add_special_tokens=False)["input_ids"], first)
