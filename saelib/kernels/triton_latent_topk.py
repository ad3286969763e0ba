"""Triton kernel: the k largest activations of each latent in one chunk of tokens, with their rows.

Imported lazily by ``saelib.kernels.latent_topk`` (see ``backend.py`` for why). One program owns
a block of latents and streams the chunk's rows through in tiles, so the chunk is read once,
column blocks in parallel, and nothing of size tokens × width is written.

Each (activation, row) pair is packed into one int64 key whose order is the float order of the
activation: the float32 bits mapped to an order-preserving int32 (flip the magnitude bits of
negatives) in the high word, (2**31 - 1 - row) in the low word, so that among equal activations
the earliest row wins. Sorting keys then carries the rows along.
A running top-KP list per latent is kept sorted descending; each tile's top-KP (``tl.topk``) is
merged into it with one bitonic step: max(running, reversed(tile)) holds exactly the KP largest
of the union and is bitonic, so ``tl.sort`` restores the order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from saelib.kernels.backend import next_power_of_two

EMPTY_KEY = -(2**63)  # below every packed key: the slot holds no activation yet
MAX_KP = 1024  # largest per-latent list the kernel keeps in registers


@triton.jit
def _chunk_topk_kernel(
    acts_ptr, vals_out_ptr, rows_out_ptr,
    N, F, stride_n, stride_f,
    EMPTY: tl.constexpr, EMPTY_HI: tl.constexpr, ROW_MAX: tl.constexpr,
    KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    running = tl.full([BLOCK_F, KP], EMPTY, tl.int64)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = mask_f[:, None] & (offs_n[None, :] < N)
        a = tl.load(
            acts_ptr + offs_n[None, :] * stride_n + offs_f[:, None] * stride_f, mask=mask, other=0.0
        ).to(tl.float32)
        bits = a.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        # Skip the sort when no activation in the tile beats its latent's current k-th value:
        # the common case once the table fills, since SAE codes are mostly zeros.
        kth_hi = (tl.min(running, axis=1) >> 32).to(tl.int32)
        better = mask & ((ordered > kth_hi[:, None]) | (kth_hi[:, None] == EMPTY_HI))
        if tl.max(better.to(tl.int32)) > 0:
            key = (ordered.to(tl.int64) << 32) | (ROW_MAX - offs_n[None, :]).to(tl.int64)
            key = tl.where(mask, key, tl.full([BLOCK_F, BLOCK_N], EMPTY, tl.int64))
            tile_top = tl.topk(key, KP)
            running = tl.sort(tl.maximum(running, tl.flip(tile_top, 1)), dim=1, descending=True)
    empty = running == EMPTY
    hi = (running >> 32).to(tl.int32)
    vbits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    vals = tl.where(empty, float("-inf"), vbits.to(tl.float32, bitcast=True))
    rows = tl.where(empty, -1, ROW_MAX - running.to(tl.int32))  # low word holds ROW_MAX - row
    offs_k = tl.arange(0, KP)
    out_off = offs_k[None, :] * F + offs_f[:, None]
    tl.store(vals_out_ptr + out_off, vals, mask=mask_f[:, None])
    tl.store(rows_out_ptr + out_off, rows, mask=mask_f[:, None])


def chunk_topk(acts_NF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent, the k largest activations of ``acts_NF`` (float32, descending) and their rows.

    Returns ``(vals_KF, rows_KF)`` with K = k; slots beyond N hold (-inf, -1).
    """
    N, F = acts_NF.shape
    kp = max(2, next_power_of_two(k))
    if kp > MAX_KP:
        raise ValueError(f"the Triton per-latent top-k keeps at most {MAX_KP} values, got k={k}")
    if N >= 2**31:
        raise ValueError(f"a chunk may hold at most 2**31 - 1 tokens, got {N}")
    block_n = max(kp, min(32, next_power_of_two(N)))
    block_f = max(1, min(64, 4096 // block_n, next_power_of_two(F)))
    vals_KF = torch.empty((kp, F), device=acts_NF.device, dtype=torch.float32)
    rows_KF = torch.empty((kp, F), device=acts_NF.device, dtype=torch.int32)
    if F > 0:
        grid = (triton.cdiv(F, block_f),)
        _chunk_topk_kernel[grid](
            acts_NF, vals_KF, rows_KF, N, F, acts_NF.stride(0), acts_NF.stride(1),
            EMPTY=EMPTY_KEY, EMPTY_HI=-(2**31), ROW_MAX=2**31 - 1, KP=kp, BLOCK_N=block_n, BLOCK_F=block_f,
        )
    return vals_KF[:k], rows_KF[:k]
