"""Triton kernels for the sparse decode x_BD = Σ_k vals_BK[b, k] · W_dec_FD[idx_BK[b, k]] + b_dec_D.

Imported lazily by ``saelib.kernels.sparse_decode`` (see ``backend.py`` for why). Three kernels,
the forward and the two halves of the backward, as in the embedding-bag decoders discussed by
EleutherAI's sparsify and sae-lens for TopK SAEs:

* forward: one program per (row b, block of D); gathers the k decoder rows and sums them
  weighted, accumulating in float32. Reads k·D decoder values per row instead of F·D.
* grad_vals[b, k] = <grad_x[b], W_dec[idx[b, k]]>: one program per (row, block of k).
* grad_W_dec[f] = Σ_{(b, k): idx[b, k] = f} vals[b, k] · grad_x[b]: the (b, k) pairs are sorted
  by latent on the host so each program owns one latent and writes its row once. No atomics, so
  the result is deterministic (atomic float adds are not), and latents that never fire get an
  exact zero row, as the dense path gives them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from saelib.kernels.backend import next_power_of_two


@triton.jit
def _decode_fwd_kernel(
    idx_ptr, vals_ptr, w_ptr, bias_ptr, out_ptr,
    K, D,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + row * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        val = tl.load(vals_ptr + row * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None] * D + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * val[:, None], axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _decode_grad_vals_kernel(
    idx_ptr, grad_out_ptr, w_ptr, grad_vals_ptr,
    K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(idx_ptr + row * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(grad_out_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None] * D + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(grad_vals_ptr + row * K + offs_k, acc.to(grad_vals_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _decode_grad_w_kernel(
    seg_start_ptr, sorted_row_ptr, sorted_val_ptr, grad_out_ptr, grad_w_ptr,
    D,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(seg_start_ptr + latent)
    end = tl.load(seg_start_ptr + latent + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        rows = tl.load(sorted_row_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
        vals = tl.load(sorted_val_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        g = tl.load(
            grad_out_ptr + rows[:, None] * D + offs_d[None, :],
            mask=mask_e[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(g * vals[:, None], axis=0)
    tl.store(grad_w_ptr + latent * D + offs_d, acc.to(grad_w_ptr.dtype.element_ty), mask=mask_d)


def _block_d(D: int) -> int:
    return min(128, next_power_of_two(D))


def _block_k(K: int) -> int:
    return max(2, min(32, next_power_of_two(K)))


def decode_forward(
    idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_dec_FD: torch.Tensor, b_dec_D: torch.Tensor | None
) -> torch.Tensor:
    """Launch the forward kernel; inputs are contiguous 2-D, ``vals_BK`` already in W's dtype."""
    B, K = idx_BK.shape
    D = W_dec_FD.shape[1]
    out_BD = torch.empty((B, D), device=W_dec_FD.device, dtype=W_dec_FD.dtype)
    if B == 0 or D == 0:
        return out_BD
    block_d = _block_d(D)
    grid = (B, triton.cdiv(D, block_d))
    bias = b_dec_D if b_dec_D is not None else W_dec_FD  # placeholder pointer, never read
    _decode_fwd_kernel[grid](
        idx_BK, vals_BK, W_dec_FD, bias, out_BD, K, D,
        HAS_BIAS=b_dec_D is not None, BLOCK_K=_block_k(K), BLOCK_D=block_d,
    )
    return out_BD


def decode_grad_vals(idx_BK: torch.Tensor, grad_BD: torch.Tensor, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """grad_vals_BK[b, k] = <grad_BD[b], W_dec_FD[idx_BK[b, k]]>."""
    B, K = idx_BK.shape
    D = W_dec_FD.shape[1]
    grad_vals_BK = torch.empty((B, K), device=W_dec_FD.device, dtype=W_dec_FD.dtype)
    if B == 0 or K == 0:
        return grad_vals_BK
    block_k = _block_k(K)
    grid = (B, triton.cdiv(K, block_k))
    _decode_grad_vals_kernel[grid](
        idx_BK, grad_BD, W_dec_FD, grad_vals_BK, K, D, BLOCK_K=block_k, BLOCK_D=_block_d(D),
    )
    return grad_vals_BK


def decode_grad_w(
    idx_BK: torch.Tensor, vals_BK: torch.Tensor, grad_BD: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """grad_W_FD[f] = Σ over (b, k) with idx_BK[b, k] = f of vals_BK[b, k] · grad_BD[b]."""
    B, K = idx_BK.shape
    D = grad_BD.shape[1]
    grad_W_FD = torch.empty((n_latents, D), device=grad_BD.device, dtype=grad_BD.dtype)
    if n_latents == 0 or D == 0:
        return grad_W_FD
    flat_idx_E = idx_BK.reshape(-1).to(torch.int64)
    sorted_idx_E, order_E = torch.sort(flat_idx_E, stable=True)
    sorted_row_E = torch.div(order_E, max(K, 1), rounding_mode="floor").to(torch.int32)
    sorted_val_E = vals_BK.reshape(-1)[order_E].contiguous()
    counts_F = torch.bincount(sorted_idx_E, minlength=n_latents)
    seg_start_F1 = torch.zeros(n_latents + 1, device=grad_BD.device, dtype=torch.int64)
    torch.cumsum(counts_F, dim=0, out=seg_start_F1[1:])
    block_d = _block_d(D)
    grid = (n_latents, triton.cdiv(D, block_d))
    _decode_grad_w_kernel[grid](
        seg_start_F1, sorted_row_E, sorted_val_E, grad_BD, grad_W_FD, D,
        BLOCK_E=16, BLOCK_D=block_d,
    )
    return grad_W_FD
