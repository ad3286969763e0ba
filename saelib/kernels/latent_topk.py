"""Streaming per-latent top-k over a corpus: the largest activations of every latent and where.

Why: AutoInterp (protocol §3, SAEBench) needs, per latent, its top activating windows (12
non-overlapping peaks) and its maximum activation m_f, which steering also uses (protocol §4:
x ← x + α · m_f · W_dec[f]). The corpus is millions of tokens and the width thousands of
latents, so tokens × width never fits; ``LatentTopK`` takes the activations chunk by chunk and
keeps only a (k, n_latents) table of values and positions. Each update reads its chunk once.

On CUDA the per-chunk selection is the Triton kernel of ``triton_latent_topk.py`` (one pass over
the chunk, no transpose); elsewhere ``torch.topk`` along the token dimension. The merge of the
chunk's (k, F) candidates with the running (k, F) table is a small ``torch.topk`` either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelib.kernels.backend import Backend, resolve_backend


@dataclass(frozen=True)
class LatentTopKResult:
    """Per latent, its k largest activations (descending) and their corpus positions.

    ``vals_KF[j, f]`` is latent f's (j+1)-th largest activation (float32) and ``pos_KF[j, f]``
    the position passed to ``update`` for it. Slots never filled (fewer than k tokens seen) hold
    -inf and -1. ``vals_KF[0]`` is each latent's maximum activation m_f. ``n_tokens`` counts the
    tokens seen. Zero activations are kept like any other value: filter ``vals_KF > 0`` for
    "firing" windows.
    """

    vals_KF: torch.Tensor
    pos_KF: torch.Tensor
    n_tokens: int


class LatentTopK:
    """Keep the k largest activations per latent over a stream of (tokens, latents) chunks.

    ``update(acts_NF, positions_N)`` merges one chunk; ``result()`` returns the table. Memory is
    O(k · n_latents) plus the chunk the caller already holds. Among equal values the Triton path
    keeps the earliest tokens; the torch path keeps earlier chunks' tokens but breaks ties within
    a chunk as ``torch.topk`` does (unspecified). For 12 non-overlapping 21-token windows, keep k = 12 · 21 = 252: each
    greedily chosen peak rules out at most 20 other positions, so 252 candidates always contain
    12 non-overlapping peaks when the corpus has them.
    """

    def __init__(
        self,
        n_latents: int,
        k: int,
        *,
        device: torch.device | str | None = None,
        backend: Backend = "auto",
    ) -> None:
        if not isinstance(n_latents, int) or n_latents < 1:
            raise ValueError(f"n_latents must be a positive int, got {n_latents!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        resolve_backend(backend)  # validates the name now rather than at the first update
        self.n_latents = n_latents
        self.k = k
        self.backend = backend
        self._vals_KF = torch.full((k, n_latents), float("-inf"), device=device)
        self._pos_KF = torch.full((k, n_latents), -1, dtype=torch.int64, device=device)
        self._n_tokens = 0

    def update(self, acts_NF: torch.Tensor, positions_N: torch.Tensor | None = None) -> None:
        """Merge a chunk of activations (N tokens × n_latents) into the running table.

        ``positions_N`` (int, length N) names each token in the caller's coordinates, e.g. a
        flat index into the corpus; when omitted, tokens are numbered in the order seen.
        """
        if acts_NF.ndim != 2 or acts_NF.shape[1] != self.n_latents:
            raise ValueError(
                f"acts_NF must have shape (n_tokens, {self.n_latents}), got {tuple(acts_NF.shape)}"
            )
        if not acts_NF.is_floating_point():
            raise ValueError(f"acts_NF must be floating point, got {acts_NF.dtype}")
        n_chunk = acts_NF.shape[0]
        device = self._vals_KF.device
        if positions_N is None:
            positions_N = torch.arange(self._n_tokens, self._n_tokens + n_chunk, device=device)
        elif positions_N.shape != (n_chunk,) or positions_N.is_floating_point():
            raise ValueError(
                f"positions_N must be an integer tensor of shape ({n_chunk},), got "
                f"{positions_N.dtype} {tuple(positions_N.shape)}"
            )
        self._n_tokens += n_chunk
        if n_chunk == 0:
            return
        acts_NF = acts_NF.to(device)
        positions_N = positions_N.to(device=device, dtype=torch.int64)
        kk = min(self.k, n_chunk)
        if resolve_backend(self.backend, acts_NF) == "triton" and self.k <= _triton_max_k():
            from saelib.kernels.triton_latent_topk import chunk_topk  # Triton exists only with CUDA

            cand_vals_KF, rows_KF = chunk_topk(acts_NF, kk)
            rows_KF = rows_KF.to(torch.int64)
        else:
            cand_vals_KF, rows_KF = torch.topk(acts_NF.float(), kk, dim=0, sorted=False)
        cand_pos_KF = positions_N[rows_KF.clamp_min(0)]
        vals_2KF = torch.cat([self._vals_KF, cand_vals_KF], dim=0)
        pos_2KF = torch.cat([self._pos_KF, cand_pos_KF], dim=0)
        _, take_KF = torch.topk(_tie_break_keys(vals_2KF), self.k, dim=0)
        self._vals_KF = torch.gather(vals_2KF, 0, take_KF)
        self._pos_KF = torch.gather(pos_2KF, 0, take_KF)

    def result(self) -> LatentTopKResult:
        """The current table, sorted descending per latent (copies; updating later is safe)."""
        return LatentTopKResult(
            vals_KF=self._vals_KF.clone(), pos_KF=self._pos_KF.clone(), n_tokens=self._n_tokens
        )


def _tie_break_keys(vals_RF: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like ``vals_RF`` (float32) along dim 0, equal values by earlier row first.

    The float bits, mapped to an order-preserving int32, fill the high word and (2**31 - 1 - row)
    the low word: the same packing as the Triton kernel, so both paths prefer earlier tokens.
    Cheaper than a stable sort of the (2k, F) merge table on CPU.
    """
    bits_RF = vals_RF.contiguous().view(torch.int32)
    ordered_RF = torch.where(bits_RF >= 0, bits_RF, bits_RF ^ 0x7FFFFFFF).to(torch.int64)
    rank_R1 = (2**31 - 1 - torch.arange(vals_RF.shape[0], device=vals_RF.device))[:, None]
    return (ordered_RF << 32) | rank_R1


def _triton_max_k() -> int:
    from saelib.kernels.triton_latent_topk import MAX_KP  # Triton exists only with CUDA

    return MAX_KP
