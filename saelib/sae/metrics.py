"""Core reconstruction metrics of an SAE on held-out activations (protocol §3, SAEBench "core").

The metrics that need only activations live here: L0, MSE, explained variance and the dead
fraction. Those that need the language model (CE loss recovered, KL) are computed by the lead with
a hook that replaces the residual stream by :func:`reconstruct`, the same reconstruction used
here, so both agree on what "the SAE's reconstruction" is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes import SAE


@dataclass(frozen=True)
class ReconstructionMetrics:
    """Metrics over a held-out set of ``n_tokens`` activations.

    l0: mean number of non-zero codes per token.
    mse: mean over tokens and dimensions of (x - x_hat)^2 (raw units, per element).
    explained_variance: 1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean||^2, the mean being
        over the held-out set (sae-lens's ``metrics/explained_variance``; SAEBench's per-token
        average of ratios is *not* used, because tokens with tiny variance dominate that one).
    dead_fraction: fraction of latents never active on the held-out set (SAEBench excludes
        these from AutoInterp, protocol §3).
    """

    l0: float
    mse: float
    explained_variance: float
    dead_fraction: float
    n_tokens: int


def reconstruct(sae: SAE[Any], acts: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction of raw activations ``[..., d_in]``, in the input's dtype/device.

    For a forward hook: ``lambda acts, hook: reconstruct(sae, acts)``.
    """
    with torch.no_grad():
        out = sae.decode(sae.encode(acts.to(sae.W_dec.device)))
    return out.to(device=acts.device, dtype=acts.dtype)


@torch.no_grad()
def reconstruction_metrics(sae: SAE[Any], acts_ND: torch.Tensor,
                           batch_size: int = 4096) -> ReconstructionMetrics:
    """L0, MSE, explained variance and dead fraction of ``sae`` on ``acts_ND`` (raw activations).

    Sums are accumulated in float64 and the mean is taken first (two passes), so the massive
    constant offsets of residual streams do not cancel catastrophically.
    """
    if acts_ND.ndim != 2 or acts_ND.shape[1] != sae.cfg.d_in:
        raise ValueError(f"acts_ND must have shape [n, d_in={sae.cfg.d_in}], "
                         f"got {tuple(acts_ND.shape)}")
    n = acts_ND.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 held-out activations, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = sae.W_dec.device
    mean_D = torch.zeros(acts_ND.shape[1], dtype=torch.float64, device=device)
    for i in range(0, n, batch_size):
        mean_D += acts_ND[i:i + batch_size].to(device, torch.float64).sum(0)
    mean_D /= n
    fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    l0_sum = sse = total = 0.0
    for i in range(0, n, batch_size):
        x_BD = acts_ND[i:i + batch_size].to(device)
        codes_BF = sae.encode(x_BD)
        x_hat_BD = sae.decode(codes_BF)
        active_BF = codes_BF != 0
        fired_F |= active_BF.any(0)
        l0_sum += float(active_BF.sum())
        x64_BD = x_BD.double()
        sse += float((x_hat_BD.double() - x64_BD).pow(2).sum())
        total += float((x64_BD - mean_D).pow(2).sum())
    ev = 1.0 - sse / total if total > 0 else float("nan")
    return ReconstructionMetrics(l0=l0_sum / n, mse=sse / (n * acts_ND.shape[1]),
                                 explained_variance=ev,
                                 dead_fraction=1.0 - float(fired_F.float().mean()), n_tokens=n)
