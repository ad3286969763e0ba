"""Core metrics that need the language model: CE-loss recovered and the KL score (protocol §3).

CE-loss recovered = (H_zero-abl − H_sae) / (H_zero-abl − H_clean), and
KL score = (KL_zero-abl − KL_sae) / KL_zero-abl, with KL(p_clean ‖ p_patched) per token, as SAEBench's
``core`` eval defines them. The patched runs replace the residual stream after block L with the SAE
reconstruction (or zeros) at every position but BOS, which no SAE is trained on.

Why we start at layer L+1 instead of running the whole model three times: the eval activations after
block L are already in the activation cache, so each run only computes blocks L+1… and the
unembedding (``start_at_layer``), which roughly halves the cost of the most expensive per-SAE metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CoreConfig:
    """Sizes of the held-out evaluation (profile section ``core``).

    ``eval_tokens``: held-out activations for L0 / MSE / explained variance / dead fraction;
    ``lm_contexts``: eval contexts run through the model for CE-loss recovered and KL score.
    """

    eval_tokens: int = 4096
    lm_contexts: int = 16

    def validate(self) -> "CoreConfig":
        if self.eval_tokens < 2:
            raise ValueError(f"eval_tokens must be >= 2, got {self.eval_tokens}")
        if self.lm_contexts < 1:
            raise ValueError(f"lm_contexts must be >= 1, got {self.lm_contexts}")
        return self


@dataclass(frozen=True)
class CoreLMMetrics:
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_loss_recovered: float
    kl_sae: float
    kl_zero: float
    kl_score: float
    n_tokens: int


def _next_token_stats(logits_BLV: torch.Tensor, tokens_BL: torch.Tensor,
                      ref_logp_BLV: torch.Tensor | None):
    logp = F.log_softmax(logits_BLV[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, tokens_BL[:, 1:, None].long()).squeeze(-1)
    kl = None
    if ref_logp_BLV is not None:
        kl = (ref_logp_BLV.exp() * (ref_logp_BLV - logp)).sum(-1)
    return logp, ce, kl


@torch.no_grad()
def lm_metrics(tl, reconstruct, acts_NLD: np.ndarray, tokens_NL: np.ndarray, layer: int,
               batch_size: int = 4) -> CoreLMMetrics:
    """CE-loss recovered and KL score of ``reconstruct`` (raw → raw) on cached eval activations.

    ``acts_NLD`` must be the residual after block ``layer`` for ``tokens_NL`` (same contexts).
    """
    if acts_NLD.shape[:2] != tokens_NL.shape:
        raise ValueError(f"activations {acts_NLD.shape[:2]} and tokens {tokens_NL.shape} do not align")
    device = next(tl.parameters()).device
    sums = dict(ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl_sae=0.0, kl_zero=0.0)
    n = 0
    for b in range(0, len(tokens_NL), batch_size):
        toks = torch.as_tensor(tokens_NL[b:b + batch_size], device=device).long()
        clean = torch.as_tensor(np.asarray(acts_NLD[b:b + batch_size]), device=device).float()
        recon = reconstruct(clean)
        recon[:, 0] = clean[:, 0]
        zero = torch.zeros_like(clean)
        zero[:, 0] = clean[:, 0]
        run = lambda resid: tl(resid, start_at_layer=layer + 1, tokens=toks)  # noqa: E731
        ref_logp, ce_clean, _ = _next_token_stats(run(clean), toks, None)
        _, ce_sae, kl_sae = _next_token_stats(run(recon), toks, ref_logp)
        _, ce_zero, kl_zero = _next_token_stats(run(zero), toks, ref_logp)
        for name, v in (("ce_clean", ce_clean), ("ce_sae", ce_sae), ("ce_zero", ce_zero),
                        ("kl_sae", kl_sae), ("kl_zero", kl_zero)):
            sums[name] += float(v.sum())
        n += ce_clean.numel()
    m = {k: v / max(n, 1) for k, v in sums.items()}
    denom = m["ce_zero"] - m["ce_clean"]
    ce_rec = (m["ce_zero"] - m["ce_sae"]) / denom if abs(denom) > 1e-12 else float("nan")
    kl_score = (m["kl_zero"] - m["kl_sae"]) / m["kl_zero"] if m["kl_zero"] > 1e-12 else float("nan")
    return CoreLMMetrics(m["ce_clean"], m["ce_sae"], m["ce_zero"], ce_rec, m["kl_sae"], m["kl_zero"],
                         kl_score, n)
