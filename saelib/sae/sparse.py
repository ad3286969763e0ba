"""Training SAEs that decode their sparse codes sparsely: TopK, BatchTopK, ReLU and Gated.

Why: a TopK SAE's code has at most k non-zero latents per token and a BatchTopK code k on average
(protocol §2: k = target L0, 50..820 of width 16,384 in the paper). sae-lens 6.54 decodes it
densely (``feature_acts @ W_dec``), so the decoder's forward matmul and its two backward matmuls
(gradients of the code and of ``W_dec``) each spend B·F·D multiply-adds, almost all on zeros: about
F/k times the B·k·D the k active rows need. Of a training step's five large matmuls (encoder
forward and ``W_enc`` gradient, decoder forward and two gradients) three are the decoder's, so
decoding with :func:`saelib.kernels.sparse_decode` (an "embedding bag": the decoder is the table,
each token a bag of k latent ids weighted by their activations) removes most of the decoder's cost.
This is what EleutherAI's sparsify does (its ``TritonDecoder`` decodes straight from the top-k ids
and values, with the scatter-then-matmul ``eager_decode`` only as a fallback), and what sae-lens's
own TopK ``use_sparse_activations`` option attempts with ``torch.sparse.mm`` (documented there as
worthwhile only in float32 without autocast; ``sparse_decode`` works under both).

What changes is only *how* the training forward computes the same numbers: the subclasses keep
sae-lens's configs, parameters, losses, hooks, threshold updates and inference conversion, so the
saved SAE is sae-lens's own ``TopKSAE`` / ``JumpReLUSAE`` and loads with
``sae_lens.SAE.load_from_disk`` as before. ``decode`` takes sae-lens's dense code, compacts it into
the ids and values of its non-zeros (:func:`active_latents`), applies
``rescale_acts_by_decoder_norm`` to those values and gathers the picked decoder rows. The values
are read out of the dense code by indexing, so the gradient flows back into it and on through the
activation to the encoder exactly as in the dense path (entries that are zero in the code get no
gradient through the activation in sae-lens either). TopK's auxiliary (dead-latent) loss decodes
its top ``d_in // 2`` dead latents the same way instead of scattering them into a dense (B, F) code
first.

The same holds for ReLU (``standard``) and Gated codes, whose L0 the L1 penalty brings to the
target (6..102 of 2,048 on the CPU default), and the same gradients result: a latent that is zero
in the code gets no gradient through ReLU (nor through Gated's gate, a Heaviside step), so the
decoder's code gradient is needed at the non-zeros only, and Gated's auxiliary reconstruction
from ReLU(π_gate) decodes the same way. Their tokens hold different counts, so these codes (and
BatchTopK's) are decoded unpadded on the CPU (:func:`saelib.kernels.sparse_decode_ragged`).
Early in training a ReLU code is dense (about half its latents at initialisation), so a code
with more than :data:`DENSE_ABOVE` of its entries non-zero is decoded densely, as sae-lens does.
JumpReLU keeps sae-lens's dense decode: its threshold's straight-through gradient reads the
code's gradient at *inactive* latents within a bandwidth of the threshold, which a decode of the
non-zeros does not produce. On a GPU, ReLU and Gated keep the dense decode too: the bfloat16
matmul runs on tensor cores, and a ragged decode there (a host sync for the count of non-zeros,
an atomic scatter for the decoder's gradient) has not been measured against it.
"""

from __future__ import annotations

from typing import Literal

import torch
from sae_lens.saes import BatchTopKTrainingSAE, TopKTrainingSAE, TrainingSAE
from typing_extensions import override

from saelib.kernels import sparse_decode, sparse_decode_ragged
from saelib.sae.encoder import (CentredEncoderMixin, CentredGatedTrainingSAE,
                                CentredStandardTrainingSAE)

#: Above this share of non-zero entries, a code is decoded densely. On one CPU thread (width
#: 2,048, d 576, batch 512, forward and backward) the unpadded decode was 9.3x the dense matmul at
#: 0.3 % non-zeros, 3.4x at 4.6 %, 1.8x at 10 %, 1.3x at 14 % and 0.4x at 51 %.
DENSE_ABOVE = 0.125


def active_latents(acts_BF: torch.Tensor, k: int | None = None,
                   method: Literal["auto", "nonzero", "topk"] = "auto",
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zeros of a sparse code ``(..., F)``, padded per token: ``(idx_BM, vals_BM)``.

    M is the largest number of non-zeros any token has; shorter rows are padded with latent 0 and
    value 0, which add nothing to a decode. Found with ``nonzero`` (on CPU ~1.2x faster than a
    ``topk`` over the width for TopK, ~2.5x for BatchTopK, whose M is not known in advance). When
    every token is known to hold at most ``k`` non-zeros (TopK) and the code is on a GPU,
    ``topk(k)`` is used instead: it needs no device-to-host copy of M. ``method`` forces one of
    the two ('topk' needs ``k``). ``vals_BM`` is differentiable into ``acts_BF`` either way.
    """
    if method not in ("auto", "nonzero", "topk"):
        raise ValueError(f"method must be 'auto', 'nonzero' or 'topk', got {method!r}")
    if method == "topk" and (k is None or k < 0):
        raise ValueError(f"method='topk' needs k >= 0 (the most non-zeros a token has), got {k!r}")
    if method == "auto":
        method = "topk" if k is not None and acts_BF.is_cuda else "nonzero"
    lead = acts_BF.shape[:-1]
    flat_NF = acts_BF.reshape(-1, acts_BF.shape[-1])
    n_rows = flat_NF.shape[0]
    if method == "topk" and k is not None:
        vals_NM, idx_NM = flat_NF.topk(min(k, flat_NF.shape[-1]), dim=-1, sorted=False)
    else:
        rows_Z, cols_Z = flat_NF.nonzero(as_tuple=True)
        counts_N = torch.bincount(rows_Z, minlength=n_rows)
        n_pick = int(counts_N.max()) if n_rows else 0
        pos_Z = torch.arange(rows_Z.numel(), device=rows_Z.device) \
            - (counts_N.cumsum(0) - counts_N)[rows_Z]
        idx_NM = rows_Z.new_zeros(n_rows, n_pick).index_put((rows_Z, pos_Z), cols_Z)
        vals_NM = flat_NF.new_zeros(n_rows, n_pick).index_put((rows_Z, pos_Z),
                                                               flat_NF[rows_Z, cols_Z])
    n_pick = idx_NM.shape[-1]
    return idx_NM.reshape(*lead, n_pick), vals_NM.reshape(*lead, n_pick)


def _scaled_by_decoder_norm(sae: TrainingSAE, vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``vals / ||W_dec[ids]||`` where the SAE rescales its code by decoder norms, else ``vals``.

    sae-lens's TopK ``act_times_W_dec`` multiplies the dense code by ``1 / ||W_dec[f]||`` when
    ``rescale_acts_by_decoder_norm`` is on; doing it on the picked values only is the same product.
    """
    if not getattr(sae, "rescales_code", False):
        return vals
    # index_select, not ``[ids]``: advanced indexing's backward (an accumulating index_put) sums
    # repeated latents in a thread-dependent order on the CPU, which made TopK training at width
    # 2,048 differ between identical runs; index_select's is fixed.
    inv_F = 1 / sae.W_dec.norm(dim=-1)
    return vals * torch.index_select(inv_F, 0, ids.reshape(-1)).view_as(ids)


def _decode_picked(sae: TrainingSAE, vals_BM: torch.Tensor, idx_BM: torch.Tensor,
                   with_bias: bool) -> torch.Tensor:
    """``Σ_m vals[m] · W_dec[idx[m]]`` (+ b_dec) of padded codes, rescaled as the SAE does."""
    vals_BM = _scaled_by_decoder_norm(sae, vals_BM, idx_BM)
    # the ids are this SAE's own code's (topk / nonzero over its width): no range check, which
    # on a GPU would wait for the device once per decode
    return sparse_decode(idx_BM, vals_BM, sae.W_dec, sae.b_dec if with_bias else None,
                         check_ids=False)


def decode_nonzeros(sae: TrainingSAE, acts_NF: torch.Tensor, with_bias: bool,
                    padded: bool = False, bound: int | None = None) -> torch.Tensor | None:
    """``acts_NF @ W_dec (+ b_dec)`` of a 2-D code through its non-zeros, rescaled as ``sae``
    does, or None where the dense matmul should do it.

    ``padded=False`` (the CPU's form): unpadded (:func:`saelib.kernels.sparse_decode_ragged`),
    None when more than :data:`DENSE_ABOVE` of the entries are non-zero. ``padded=True`` (the
    Triton kernels' form, CUDA): every token padded to the busiest one (:func:`active_latents`,
    with ``bound`` the most non-zeros a token can hold, if known), None when that padded width
    exceeds :data:`DENSE_ABOVE` of the code's. The values are read out of the code by indexing
    at distinct positions, so their gradient lands in the code's non-zeros only, each exactly
    once (no order-dependent sums).
    """
    if padded:
        idx_NM, vals_NM = active_latents(acts_NF, bound)
        if idx_NM.shape[-1] > DENSE_ABOVE * acts_NF.shape[-1]:
            return None
        return _decode_picked(sae, vals_NM, idx_NM, with_bias)
    rows_Z, cols_Z = acts_NF.nonzero(as_tuple=True)
    if rows_Z.numel() > DENSE_ABOVE * acts_NF.numel():
        return None
    counts_N = torch.bincount(rows_Z, minlength=acts_NF.shape[0])
    offsets_N = counts_N.cumsum(0) - counts_N
    vals_Z = _scaled_by_decoder_norm(sae, acts_NF[rows_Z, cols_Z], cols_Z)
    return sparse_decode_ragged(cols_Z, vals_Z, offsets_N, sae.W_dec,
                                sae.b_dec if with_bias else None, check_ids=False)


class ActiveDecodeMixin:
    """``decode`` through the code's non-zeros (module doc): unpadded on the CPU below
    :data:`DENSE_ABOVE`, padded through the Triton kernels on CUDA where ``sparse_on_cuda``,
    sae-lens's dense decode otherwise; same outputs and gradients in every case."""

    #: Whether a CUDA code is decoded sparsely (TopK family) or densely (ReLU, Gated: module doc).
    sparse_on_cuda: bool = False
    #: Whether the decode divides the code by the decoder's row norms (sae-lens's TopK option).
    rescales_code: bool = False

    def max_active_per_token(self) -> int | None:
        """A bound on any token's non-zeros known before the forward (None: no bound)."""
        return None

    def decode_active(self, acts_BF: torch.Tensor, with_bias: bool = True) -> torch.Tensor | None:
        """``acts_BF @ W_dec (+ b_dec)`` through the non-zeros, or None where the dense matmul
        should do it (a sparse-layout or empty code, a dense one, a GPU without ``sparse_on_cuda``)."""
        if acts_BF.is_sparse or acts_BF.numel() == 0 or acts_BF.ndim < 1:
            return None
        lead = acts_BF.shape[:-1]
        flat_NF = acts_BF.reshape(-1, acts_BF.shape[-1])
        if flat_NF.is_cuda and not self.sparse_on_cuda:
            return None
        out_ND = decode_nonzeros(self, flat_NF, with_bias, padded=flat_NF.is_cuda,
                                 bound=self.max_active_per_token())
        return None if out_ND is None else out_ND.reshape(*lead, out_ND.shape[-1])

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Same output and gradients as sae-lens's ``decode``, in Z·D rather than B·F·D work."""
        sae_out_pre = self.decode_active(feature_acts)
        if sae_out_pre is None:
            return super().decode(feature_acts)
        sae_out_pre = self.hook_sae_recons(sae_out_pre)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)


class SparseStandardTrainingSAE(ActiveDecodeMixin, CentredStandardTrainingSAE):
    """sae-lens's ReLU (``standard``) training SAE with the centred encoder
    (:mod:`saelib.sae.encoder`) and the decode of the non-zeros on the CPU (module doc)."""


class SparseGatedTrainingSAE(ActiveDecodeMixin, CentredGatedTrainingSAE):
    """sae-lens's Gated training SAE with the centred encoder and the decode of the non-zeros on
    the CPU, for the code and for the auxiliary reconstruction from ReLU(π_gate) (module doc)."""

    @override
    def gate_reconstruction(self, pi_gate_act: torch.Tensor) -> torch.Tensor:
        out = self.decode_active(pi_gate_act)
        return super().gate_reconstruction(pi_gate_act) if out is None else out


class SparseTopKTrainingSAE(ActiveDecodeMixin, CentredEncoderMixin, TopKTrainingSAE):
    """sae-lens's ``TopKTrainingSAE`` with the decode and aux-loss decode done by embedding bag,
    and the encoder's backward without the input gradient (:mod:`saelib.sae.encoder`)."""

    sparse_on_cuda = True

    @property
    def rescales_code(self) -> bool:  # type: ignore[override]
        return bool(self.cfg.rescale_acts_by_decoder_norm)

    @override
    def max_active_per_token(self) -> int | None:
        """TopK keeps at most k non-zeros per token."""
        return int(self.cfg.k)

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sae-lens 6.54's TopK encode (pre-activations scaled by decoder norms when
        ``rescale_acts_by_decoder_norm``), from :meth:`CentredEncoderMixin.encoder_pre`."""
        hidden_pre = self.encoder_pre(x)
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

    @override
    def calculate_topk_aux_loss(self, sae_in: torch.Tensor, sae_out: torch.Tensor,
                                hidden_pre: torch.Tensor,
                                dead_neuron_mask: torch.Tensor | None) -> torch.Tensor:
        """sae-lens 6.54's TopK auxiliary loss, decoding the k_aux dead latents by embedding bag.

        Same steps as ``TopKTrainingSAE.calculate_topk_aux_loss`` (Gao et al. 2024, App. A.2/B.1:
        the top ``d_in // 2`` dead latents reconstruct the detached residual, no bias, the loss
        scaled down when fewer latents are dead), without the dense (B, F) scatter and matmul.
        """
        if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                "TopK auxiliary loss does not support activation normalization "
                f"(normalize_activations={self.cfg.normalize_activations!r}): the aux "
                "reconstruction would be in normalized space while the residual is not")
        residual = (sae_in - sae_out).detach()
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        auxk_latents = torch.where(dead_neuron_mask[None], hidden_pre, -torch.inf)
        vals_BK, idx_BK = auxk_latents.topk(k_aux, sorted=False)
        recons = _decode_picked(self, vals_BK, idx_BK, with_bias=False)
        recons = self.reshape_fn_out(recons, self.d_head)
        auxk_loss = (recons - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * auxk_loss


class SparseBatchTopKTrainingSAE(SparseTopKTrainingSAE, BatchTopKTrainingSAE):
    """sae-lens's ``BatchTopKTrainingSAE`` (saved as JumpReLU) with the sparse decode above.

    BatchTopK keeps k·B non-zeros over the whole batch, so a token may hold more or fewer than k;
    ``decode`` gathers each token's own count on the CPU, and on CUDA as many per token as the
    busiest token has (padding the rest, the Triton kernels' form). The MRO
    puts the sparse ``decode`` / aux loss before sae-lens's BatchTopK, which inherits the dense
    ones from ``TopKTrainingSAE``.
    """

    @override
    def max_active_per_token(self) -> int | None:
        """None: BatchTopK fixes only the batch's mean count per token (k), not each token's."""
        return None
