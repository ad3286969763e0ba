"""TopK and BatchTopK encodes that return compact codes (ids + values) for ``sparse_decode``.

Why: the TopK activation (protocol §2, k = target L0) keeps the k largest pre-activations of each
token and applies ReLU; BatchTopK keeps the k·B largest over the whole batch. sae-lens scatters
them back into a dense (B, F) code before decoding; these functions keep them as (B, k) ids and
values instead, so the decode can gather k decoder rows (``sparse_decode``). ReLU is applied to
the k kept values only, not to the whole (B, F) pre-activation.

Only a torch implementation: ``torch.topk`` is already a fused radix-select on CUDA, and a Triton
bitonic top-k over F = 16,384 with k up to 820 (the paper's largest L0) would do more work, so
there is nothing a kernel here would pay for (issue item 1: "add others where profiling shows
time goes"). The pre-activation matmul that precedes it dominates the encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseCodes:
    """Codes of B tokens as (B, k) latent ids and activations; padding entries have value 0.

    ``idx_BK`` is int64 in [0, n_latents); ``vals_BK`` is differentiable with respect to the
    pre-activations it was taken from.
    """

    idx_BK: torch.Tensor
    vals_BK: torch.Tensor

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """The dense (B, n_latents) code, for metrics (L0, dead latents) that want one."""
        codes_BF = self.vals_BK.new_zeros((*self.vals_BK.shape[:-1], n_latents))
        return codes_BF.scatter_add(-1, self.idx_BK, self.vals_BK)


def topk_encode(pre_BF: torch.Tensor, k: int) -> SparseCodes:
    """TopK activation as compact codes: the k largest pre-activations per row, then ReLU.

    Matches sae-lens's ``TopK`` (``topk(x, k)`` then ``relu`` on the values). Rows are in no
    particular order of latent. ``pre_BF`` may have leading dimensions (..., F).
    """
    if pre_BF.ndim < 1:
        raise ValueError("pre_BF must have shape (..., n_latents)")
    n_latents = pre_BF.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= n_latents:
        raise ValueError(f"k must be an int in [1, {n_latents}] (the width), got {k!r}")
    vals_BK, idx_BK = torch.topk(pre_BF, k, dim=-1, sorted=False)
    return SparseCodes(idx_BK=idx_BK, vals_BK=torch.relu(vals_BK))


def batch_topk_encode(pre_BF: torch.Tensor, k: float) -> SparseCodes:
    """BatchTopK activation as compact codes: the int(k·B) largest ReLU'd values over the batch.

    Matches sae-lens's ``BatchTopK`` on a (B, F) input. Tokens get different numbers of active
    latents, so rows are padded to the largest count M with (id 0, value 0); the padding adds
    nothing to a decode and passes no gradient back. Entries whose ReLU'd value is 0 are dropped
    (they decode to nothing either way).
    """
    if pre_BF.ndim != 2:
        raise ValueError(f"pre_BF must be 2-D (batch, n_latents), got shape {tuple(pre_BF.shape)}")
    B, n_latents = pre_BF.shape
    if not k > 0 or k > n_latents:
        raise ValueError(f"k must be in (0, {n_latents}] (the width), got {k!r}")
    n_keep = int(k * B)
    flat_vals, flat_pos = torch.topk(torch.relu(pre_BF).flatten(), n_keep, sorted=False)
    keep = flat_vals > 0
    flat_vals, flat_pos = flat_vals[keep], flat_pos[keep]
    rows_E = torch.div(flat_pos, n_latents, rounding_mode="floor")
    rows_E, order_E = torch.sort(rows_E, stable=True)
    flat_vals, flat_pos = flat_vals[order_E], flat_pos[order_E]
    counts_B = torch.bincount(rows_E, minlength=B)
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    slot_E = torch.arange(rows_E.numel(), device=pre_BF.device) - starts_B[rows_E]
    width = int(counts_B.max()) if B > 0 else 0
    idx_BM = torch.zeros((B, width), dtype=torch.int64, device=pre_BF.device)
    idx_BM[rows_E, slot_E] = flat_pos - rows_E * n_latents
    vals_BM = pre_BF.new_zeros((B, width)).index_put((rows_E, slot_E), flat_vals)
    return SparseCodes(idx_BK=idx_BM, vals_BK=vals_BM)
