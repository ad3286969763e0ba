"""Hot paths of the SAE pipeline: functions that run Triton on CUDA and torch elsewhere.

Public surface (issue "Kernels: the hot paths in Triton on CUDA, the same functions on CPU"):

* ``sparse_decode(idx_BK, vals_BK, W_dec_FD, b_dec_D=None)`` — decode TopK/BatchTopK codes by
  gathering k decoder rows per token (embedding bag), differentiable in vals, W_dec and b_dec.
  Use it where codes have k ≪ width non-zeros (TopK, BatchTopK; on a GPU, padded to the busiest
  token); JumpReLU, and ReLU and Gated on a GPU, keep the dense matmul (saelib.sae.sparse).
* ``sparse_decode_ragged(ids_Z, vals_Z, offsets_B, W_dec_FD, b_dec_D=None)`` — the same decode
  for codes whose tokens hold different counts (ReLU, Gated, BatchTopK), unpadded; torch only.
* ``topk_encode(pre_BF, k)`` / ``batch_topk_encode(pre_BF, k)`` — the TopK / BatchTopK
  activation returned as compact ``SparseCodes`` (ids, values) instead of a dense (B, F) code;
  torch only (no ``backend``): the sparse decode is the Triton side of the TopK path.
* ``LatentTopK(n_latents, k)`` with ``.update(acts_NF, positions_N)`` and ``.result()`` — the
  streaming per-latent top-k activations and positions that AutoInterp needs (protocol §3),
  without holding tokens × width.

``sparse_decode`` and ``LatentTopK`` take ``backend='auto'|'torch'|'triton'``; 'auto' picks
Triton for CUDA tensors when the optional ``triton`` package is installed. Results agree within float32
rounding. Triton kernels live in ``triton_*.py`` and are imported only on first use, so this
package imports without Triton, and ``TRITON_INTERPRET=1`` set before that first use runs them
on CPU tensors under Triton's interpreter (how the tests check them without a GPU).
"""

from saelib.kernels.backend import Backend, triton_available
from saelib.kernels.latent_topk import LatentTopK, LatentTopKResult
from saelib.kernels.sparse_decode import sparse_decode, sparse_decode_ragged
from saelib.kernels.topk_encode import SparseCodes, batch_topk_encode, topk_encode

__all__ = [
    "Backend",
    "LatentTopK",
    "LatentTopKResult",
    "SparseCodes",
    "batch_topk_encode",
    "sparse_decode",
    "sparse_decode_ragged",
    "topk_encode",
    "triton_available",
]
