"""Per-feature selection scores: top-k token confidence, ΔC_k, and Arad et al.'s output score.

Why: protocol §6 selects steering features by how much amplifying a feature changes the model's
next-token distribution on a neutral prefix ("From my experience,"). This module holds only the
pure maths on next-token logits; running the model with the amplified feature (and computing the
logit lens) happens elsewhere, which keeps these formulas testable on hand-made distributions.

All functions are batched: the last dimension is the vocabulary ``V``; any leading dimensions
(typically one row per candidate feature ``F``) are kept.

Conventions (documented because the paper states the formulas but not these details):

* ``C_k(p) = -(1/k) Σ_{j in top-k} log p_j`` (protocol §6) is a *surprisal*: it is small when the
  model is confident (a one-hot-ish ``p`` gives ``C_k ≈ 0`` for ``k = 1``) and large when ``p`` is
  flat (a uniform ``p`` over ``V`` tokens gives ``log V`` for every ``k``).
* ``ΔC_k = C_k(p_intervened) - C_k(p_base)``. So ``ΔC_k > 0`` means the amplified feature made the
  model *less* confident about its top-k tokens, and ``ΔC_k < 0`` means it made the model *more*
  confident (it concentrates mass, e.g. on the feature's tokens). Tier selection
  (:mod:`saelib.selection.tiers`) looks at both directions.
* Output score (Arad et al. 2025, Eq. 9–10):
  ``S_out = (1 - r_min / |V|) × max_{t in lens} p_t``, where ``r_min`` is the best (smallest) rank
  of the feature's logit-lens tokens in the intervened distribution. Ranks are **0-based, rank 0 =
  the most probable token**, as in Arad et al.'s code (position in a descending argsort), so a
  feature whose lens token becomes the argmax gets ``S_out = max p``. A token's rank is the number
  of vocabulary entries with *strictly* larger probability, so tied tokens share the better rank
  (Arad et al.'s argsort breaks exact ties arbitrarily; for float logits exact ties are rare).
"""

from __future__ import annotations

import torch

__all__ = ["topk_confidence", "delta_topk_confidence", "output_score"]


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got shape "
                         f"{tuple(logits.shape)}")
    if not torch.is_floating_point(logits):
        raise ValueError(f"{name} must be a floating-point tensor of logits, got {logits.dtype}")
    if torch.isnan(logits).any():
        raise ValueError(f"{name} contains NaN logits")


def topk_confidence(logits_BV: torch.Tensor, k: int = 1) -> torch.Tensor:
    """``C_k(p)`` of ``p = softmax(logits)`` along the last dimension (protocol §6).

    Computed from ``log_softmax`` (never ``log(softmax)``), so a near-one-hot distribution gives
    finite values. The top-k are the k largest log-probabilities; which of several tied tokens is
    counted does not matter because tied tokens have the same log-probability.

    Args:
        logits_BV: next-token logits, shape ``(..., V)``, any float dtype (computed in float32 or
            higher).
        k: how many top tokens to average over, ``1 <= k <= V``. The paper uses ``k = 1``.

    Returns:
        ``C_k`` with shape ``(...)`` (the vocabulary dimension removed), dtype float32 or the
        input's dtype if wider.
    """
    _check_logits("logits_BV", logits_BV)
    vocab = logits_BV.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, {vocab}] (the vocabulary size), got {k!r}")
    work_dtype = torch.promote_types(logits_BV.dtype, torch.float32)
    logp_BV = torch.log_softmax(logits_BV.to(work_dtype), dim=-1)
    top_logp_BK = torch.topk(logp_BV, k, dim=-1).values
    return -top_logp_BK.mean(dim=-1)


def delta_topk_confidence(logits_intervened_FV: torch.Tensor, logits_base_V: torch.Tensor,
                          k: int = 1) -> torch.Tensor:
    """``ΔC_k = C_k(p_intervened) - C_k(p_base)`` per feature (protocol §6).

    Args:
        logits_intervened_FV: next-token logits with each feature amplified, shape ``(F, V)`` (or
            any ``(..., V)``).
        logits_base_V: the unamplified next-token logits on the same prefix, shape ``(V,)`` (one
            base shared by all features: broadcast) or the same shape as the intervened logits.
        k: top-k size, ``1 <= k <= V``.

    Returns:
        ``ΔC_k`` with shape ``(F,)`` (the intervened logits' shape less the vocabulary dimension).
        Positive: the amplification made the model less confident; negative: more confident.
    """
    _check_logits("logits_intervened_FV", logits_intervened_FV)
    _check_logits("logits_base_V", logits_base_V)
    vocab = logits_intervened_FV.shape[-1]
    if logits_base_V.shape[-1] != vocab:
        raise ValueError(f"vocabulary sizes differ: intervened logits have {vocab}, base logits "
                         f"have {logits_base_V.shape[-1]}")
    if logits_base_V.dim() != 1 and logits_base_V.shape != logits_intervened_FV.shape:
        raise ValueError(f"logits_base_V must have shape ({vocab},) or the intervened shape "
                         f"{tuple(logits_intervened_FV.shape)}, got {tuple(logits_base_V.shape)}")
    c_int_F = topk_confidence(logits_intervened_FV, k)
    c_base = topk_confidence(logits_base_V, k)
    return c_int_F - c_base


def output_score(logits_intervened_FV: torch.Tensor, lens_token_ids_FT: torch.Tensor) -> torch.Tensor:
    """Arad et al.'s output score per feature: ``(1 - r_min/|V|) × max_{t in lens} p_t``.

    The smallest rank among the lens tokens belongs to the lens token with the largest probability,
    so ``r_min`` is the number of vocabulary entries whose probability is strictly larger than
    ``max_{t in lens} p_t`` (0-based; rank 0 = most probable). Memory is ``O(F × V)``; callers
    batch features as they batch the intervened forward passes.

    Args:
        logits_intervened_FV: next-token logits with feature f amplified, shape ``(F, V)``.
        lens_token_ids_FT: each feature's logit-lens top-T token ids (T = 20 in the paper), shape
            ``(F, T)``, integer ids in ``[0, V)``.

    Returns:
        ``S_out`` with shape ``(F,)``, in ``[0, 1]``.
    """
    _check_logits("logits_intervened_FV", logits_intervened_FV)
    if logits_intervened_FV.dim() != 2:
        raise ValueError(f"logits_intervened_FV must have shape (F, V), got "
                         f"{tuple(logits_intervened_FV.shape)}")
    if not isinstance(lens_token_ids_FT, torch.Tensor) or lens_token_ids_FT.dim() != 2:
        raise ValueError("lens_token_ids_FT must be a 2-D integer tensor of shape (F, T)")
    if torch.is_floating_point(lens_token_ids_FT) or lens_token_ids_FT.dtype == torch.bool:
        raise ValueError(f"lens_token_ids_FT must hold integer token ids, got {lens_token_ids_FT.dtype}")
    n_feat, vocab = logits_intervened_FV.shape
    if lens_token_ids_FT.shape[0] != n_feat or lens_token_ids_FT.shape[1] < 1:
        raise ValueError(f"lens_token_ids_FT must have shape ({n_feat}, T) with T >= 1, got "
                         f"{tuple(lens_token_ids_FT.shape)}")
    if lens_token_ids_FT.numel() and (lens_token_ids_FT.min() < 0 or lens_token_ids_FT.max() >= vocab):
        raise ValueError(f"lens token ids must lie in [0, {vocab}), got range "
                         f"[{int(lens_token_ids_FT.min())}, {int(lens_token_ids_FT.max())}]")
    work_dtype = torch.promote_types(logits_intervened_FV.dtype, torch.float32)
    probs_FV = torch.softmax(logits_intervened_FV.to(work_dtype), dim=-1)
    lens_ids_FT = lens_token_ids_FT.to(device=probs_FV.device, dtype=torch.long)
    lens_probs_FT = torch.gather(probs_FV, 1, lens_ids_FT)
    max_prob_F = lens_probs_FT.max(dim=1).values
    min_rank_F = (probs_FV > max_prob_F[:, None]).sum(dim=1).to(work_dtype)
    return (1.0 - min_rank_F / vocab) * max_prob_F
