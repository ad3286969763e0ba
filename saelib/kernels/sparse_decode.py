"""Sparse decode of TopK / BatchTopK codes: x_BD = Σ_k vals_BK[b, k] · W_dec_FD[idx_BK[b, k]] + b_dec_D.

Why: a TopK (or BatchTopK) SAE has at most k non-zero latents per token (protocol §2: k = target
L0, 50..820 of width 16,384 in the paper). The dense decode ``codes_BF @ W_dec_FD`` multiplies
B·F·D numbers, almost all by zero; gathering the k active decoder rows does B·k·D, a factor F/k
less work and memory traffic. This is the "embedding bag" formulation used by EleutherAI's
sparsify and discussed for sae-lens: the decoder is an embedding table, each token a bag of k
latent ids weighted by their activations.

One entry point, ``sparse_decode``: on CUDA it runs the Triton kernels of
``triton_sparse_decode.py``; elsewhere ``torch.nn.functional.embedding_bag`` (mode 'sum' with
per-sample weights), which is differentiable in both the weights and the table. Both give
gradients for ``vals_BK``, ``W_dec_FD`` and ``b_dec_D`` (training needs all three).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from saelib.kernels.backend import Backend, resolve_backend


def _check_inputs(
    idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_dec_FD: torch.Tensor, b_dec_D: torch.Tensor | None,
    check_ids: bool = True,
) -> None:
    if W_dec_FD.ndim != 2:
        raise ValueError(f"W_dec_FD must be 2-D (n_latents, d_model), got shape {tuple(W_dec_FD.shape)}")
    if idx_BK.shape != vals_BK.shape:
        raise ValueError(
            f"idx_BK and vals_BK must have the same shape, got {tuple(idx_BK.shape)} and {tuple(vals_BK.shape)}"
        )
    if idx_BK.ndim < 1:
        raise ValueError("idx_BK must have at least one dimension (..., k)")
    if idx_BK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx_BK must be int32 or int64, got {idx_BK.dtype}")
    if not vals_BK.is_floating_point():
        raise ValueError(f"vals_BK must be a floating-point tensor, got {vals_BK.dtype}")
    n_latents, d_model = W_dec_FD.shape
    if b_dec_D is not None and tuple(b_dec_D.shape) != (d_model,):
        raise ValueError(f"b_dec_D must have shape ({d_model},), got {tuple(b_dec_D.shape)}")
    if check_ids and idx_BK.numel() > 0:
        lo_hi = torch.aminmax(idx_BK)
        lo, hi = int(lo_hi.min), int(lo_hi.max)
        if lo < 0 or hi >= n_latents:
            raise ValueError(
                f"idx_BK values must lie in [0, {n_latents - 1}] (the rows of W_dec_FD), got [{lo}, {hi}]"
            )


def _decode_torch(
    idx_BK: torch.Tensor, vals_BK: torch.Tensor, W_dec_FD: torch.Tensor, b_dec_D: torch.Tensor | None
) -> torch.Tensor:
    # The flat-input-plus-offsets form of embedding_bag, because the 2-D form rejects k = 0
    # (every bag empty), which a BatchTopK batch with no active latent can produce.
    B, K = idx_BK.shape
    offsets_B = torch.arange(B, device=idx_BK.device, dtype=idx_BK.dtype) * K
    x_BD = F.embedding_bag(
        idx_BK.reshape(-1),
        W_dec_FD,
        offsets_B,
        per_sample_weights=vals_BK.reshape(-1).to(W_dec_FD.dtype),
        mode="sum",
    )
    return x_BD if b_dec_D is None else x_BD + b_dec_D


class _TritonSparseDecode(torch.autograd.Function):
    """Autograd wrapper around the three Triton kernels (forward, grad_vals, grad_W_dec)."""

    @staticmethod
    def forward(ctx, idx_BK, vals_BK, W_dec_FD, b_dec_D):  # type: ignore[override]
        from saelib.kernels import triton_sparse_decode as tsd  # Triton exists only with CUDA

        idx_BK = idx_BK.contiguous()
        vals_cast_BK = vals_BK.to(W_dec_FD.dtype).contiguous()
        W_dec_FD = W_dec_FD.contiguous()
        b_dec = b_dec_D.contiguous() if b_dec_D is not None else None
        ctx.save_for_backward(idx_BK, vals_cast_BK, W_dec_FD)
        ctx.vals_dtype = vals_BK.dtype
        ctx.has_bias = b_dec_D is not None
        return tsd.decode_forward(idx_BK, vals_cast_BK, W_dec_FD, b_dec)

    @staticmethod
    def backward(ctx, grad_BD):  # type: ignore[override]
        from saelib.kernels import triton_sparse_decode as tsd  # Triton exists only with CUDA

        idx_BK, vals_BK, W_dec_FD = ctx.saved_tensors
        grad_BD = grad_BD.to(W_dec_FD.dtype).contiguous()
        grad_vals = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_vals = tsd.decode_grad_vals(idx_BK, grad_BD, W_dec_FD).to(ctx.vals_dtype)
        if ctx.needs_input_grad[2]:
            grad_W = tsd.decode_grad_w(idx_BK, vals_BK, grad_BD, W_dec_FD.shape[0])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_BD.sum(dim=0)
        return None, grad_vals, grad_W, grad_b


def sparse_decode(
    idx_BK: torch.Tensor,
    vals_BK: torch.Tensor,
    W_dec_FD: torch.Tensor,
    b_dec_D: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """Decode sparse codes: ``x[..., :] = Σ_k vals[..., k] · W_dec_FD[idx[..., k]] (+ b_dec_D)``.

    Equal, within float32 rounding, to ``codes_BF @ W_dec_FD + b_dec_D`` where ``codes_BF`` is the
    dense code with ``vals`` scattered at ``idx`` (duplicate indices add up). Padding entries
    (e.g. from ``batch_topk_encode``) use any valid index with value 0 and contribute nothing.

    Args:
        idx_BK: latent ids, int32/int64, shape (..., k), each in [0, n_latents).
        vals_BK: their activations, same shape, floating point.
        W_dec_FD: decoder, (n_latents, d_model); rows are the latents' directions (protocol §2).
        b_dec_D: optional decoder bias, (d_model,).
        backend: 'auto' (Triton on CUDA when installed, else torch), 'torch' or 'triton'.
        check_ids: check every id against the decoder's rows (an out-of-range id is a
            ``ValueError``). On a GPU the check reads a result back, a host sync; ``False`` skips
            it for ids the caller built in range (the training SAEs' ``topk`` / ``nonzero`` of
            their own codes, :mod:`saelib.sae.sparse`: 41 syncs per step of the paper's 30 SAEs).

    Returns:
        x of shape (..., d_model) in ``W_dec_FD``'s dtype; differentiable in vals, W_dec, b_dec.
    """
    _check_inputs(idx_BK, vals_BK, W_dec_FD, b_dec_D, check_ids)
    lead_shape = idx_BK.shape[:-1]
    K = idx_BK.shape[-1]
    n_rows = math.prod(lead_shape)
    idx_2d = idx_BK.reshape(n_rows, K)
    vals_2d = vals_BK.reshape(n_rows, K)
    tensors = [idx_2d, vals_2d, W_dec_FD] + ([b_dec_D] if b_dec_D is not None else [])
    if resolve_backend(backend, *tensors) == "triton":
        x_BD = _TritonSparseDecode.apply(idx_2d, vals_2d, W_dec_FD, b_dec_D)
    else:
        x_BD = _decode_torch(idx_2d, vals_2d, W_dec_FD, b_dec_D)
    return x_BD.reshape(*lead_shape, W_dec_FD.shape[1])


def sparse_decode_ragged(
    ids_Z: torch.Tensor,
    vals_Z: torch.Tensor,
    offsets_B: torch.Tensor,
    W_dec_FD: torch.Tensor,
    b_dec_D: torch.Tensor | None = None,
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """Decode codes whose tokens hold different numbers of non-zeros, without padding them.

    Token ``b``'s latents are ``ids_Z[offsets_B[b]:offsets_B[b + 1]]`` (the last token's run to
    the end), weighted by the same slice of ``vals_Z``: ``x[b] = Σ vals · W_dec_FD[ids] (+ b_dec_D)``.
    A ReLU, Gated or BatchTopK code fixes no count per token, and its busiest token can hold
    several times the mean (a ReLU SAE at mean L0 95 of 2,048 had a busiest token of 409 in a
    batch of 512); :func:`sparse_decode`'s (B, k) form pads every token to that count, this one
    does the Z = Σ counts rows the code holds (on one CPU thread at width 2,048, d 576, batch 512,
    forward and backward: 3.4x a dense matmul at mean L0 95 against 1.2x padded). The torch path
    on every device (``embedding_bag`` with offsets): no Triton kernel, since the Triton one takes
    the padded form.

    Args:
        ids_Z: latent ids of every non-zero, int32/int64, 1-D, token by token.
        vals_Z: their activations, same shape, floating point (differentiable).
        offsets_B: where each token's run starts in ``ids_Z``: 1-D, same dtype as ``ids_Z``,
            non-decreasing from 0; an empty run decodes to ``b_dec_D``.
        W_dec_FD: decoder, (n_latents, d_model).
        b_dec_D: optional decoder bias, (d_model,).
        check_ids: check the ids against the decoder's rows and the offsets for order (see
            :func:`sparse_decode`; ``False`` for a caller's own ``nonzero`` of a code).

    Returns:
        x of shape (B, d_model) in ``W_dec_FD``'s dtype; differentiable in vals, W_dec, b_dec.
    """
    if ids_Z.ndim != 1 or offsets_B.ndim != 1:
        raise ValueError(f"ids_Z and offsets_B must be 1-D, got shapes {tuple(ids_Z.shape)} "
                         f"and {tuple(offsets_B.shape)}")
    if offsets_B.dtype != ids_Z.dtype:
        raise ValueError(f"offsets_B must have ids_Z's dtype {ids_Z.dtype}, got {offsets_B.dtype}")
    _check_inputs(ids_Z, vals_Z, W_dec_FD, b_dec_D, check_ids)
    if check_ids and offsets_B.numel() > 0:
        ordered = bool(offsets_B[0] == 0) and bool((offsets_B.diff() >= 0).all()) \
            and int(offsets_B[-1]) <= ids_Z.numel()
        if not ordered:
            raise ValueError(f"offsets_B must rise from 0 to at most len(ids_Z) = {ids_Z.numel()}, "
                             f"got {offsets_B.tolist()[:8]}{'...' if offsets_B.numel() > 8 else ''}")
    x_BD = F.embedding_bag(ids_Z, W_dec_FD, offsets_B,
                           per_sample_weights=vals_Z.to(W_dec_FD.dtype), mode="sum")
    return x_BD if b_dec_D is None else x_BD + b_dec_D
