"""The model's next-token logits on the neutral prefix with one SAE feature amplified (protocol §6).

ΔC_k and the output score both need, for every feature f of an SAE, the next-token distribution
at the last position of the prefix ("From my experience,") when f is amplified in the SAE
reconstruction at the SAE's layer L, at that last position only. Three variants of "amplify"
(``selection.variant``; the paper leaves it open):

* ``arad`` (the default, as Arad et al.'s code): f's code += α × the largest code at that
  position, the other codes and the SAE's error term kept:
  ``x ← x + α · max_g a_g(x) · W_dec[f]``;
* ``scale``: f's code multiplied by α, the rest kept: ``x ← x + (α − 1) · a_f(x) · W_dec[f]``
  (a feature silent at that position leaves the model unchanged);
* ``decode``: the residual replaced by the SAE's decoding of α·e_f alone:
  ``x ← decode(α · e_f) = α · W_dec[f] + b_dec``.

(The SAE decoder is affine, so "change one code inside the reconstruction and keep the error
term" is exactly adding the code's change times its decoder row.)

Two ways to compute the logits:

* :func:`amplified_logits_naive`, the reference: one full forward of the prefix per feature,
  with a hook at ``blocks.L.hook_resid_post`` changing the last position;
* :func:`amplified_logits_fast`: the intervention changes only the last position at layer L, so
  the prefix goes through the model once, its keys and values are kept, and for a batch of
  features only the last position is recomputed, from block L + 1 up, against the shared
  (frozen) cache. Same numbers to float32 rounding (tests/test_selection_amplify.py, ≤ 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

VARIANTS: tuple[str, ...] = ("arad", "scale", "decode")


@dataclass(frozen=True)
class PrefixState:
    """What every feature's forward shares: the prefix tokens, the unamplified residual at the
    last position after block L, the SAE codes there, the base next-token logits, and the keys and
    values of every block for all prefix positions but the last (frozen; the fast path reuses them
    for every batch of features)."""

    tokens_L: torch.Tensor
    layer: int
    resid_D: torch.Tensor
    codes_F: torch.Tensor
    base_logits_V: torch.Tensor
    cache: Any


def amplify_resid(variant: str, resid_D: torch.Tensor, codes_F: torch.Tensor, W_dec_FD: torch.Tensor,
                  b_dec_D: torch.Tensor, features_B: torch.Tensor, alpha: float) -> torch.Tensor:
    """The amplified residual at the last position, one row per feature: ``(B, D)``."""
    rows_BD = W_dec_FD[features_B]
    if variant == "arad":
        return resid_D + alpha * codes_F.max() * rows_BD
    if variant == "scale":
        return resid_D + ((alpha - 1.0) * codes_F[features_B])[:, None] * rows_BD
    if variant == "decode":
        return alpha * rows_BD + b_dec_D
    raise ValueError(f"unknown amplification variant {variant!r}; valid: {', '.join(VARIANTS)}")


@torch.inference_mode()
def prefix_state(tl, encode: Callable[[torch.Tensor], torch.Tensor], tokens_L: Sequence[int],
                 layer: int) -> PrefixState:
    """Run the prefix once: its residual after block ``layer`` at the last position, the SAE's
    codes there, the unamplified next-token logits and the frozen key/value cache."""
    hook = f"blocks.{layer}.hook_resid_post"
    tokens_1L = torch.as_tensor([list(tokens_L)], dtype=torch.long, device=tl.cfg.device)
    logits, cache = tl.run_with_cache(tokens_1L, names_filter=hook)
    resid_D = cache[hook][0, -1]
    return PrefixState(tokens_1L[0], layer, resid_D, encode(resid_D[None])[0], logits[0, -1],
                       _frozen_cache(tl, tokens_1L[0]))


@torch.inference_mode()
def amplified_logits_naive(tl, state: PrefixState, W_dec_FD: torch.Tensor, b_dec_D: torch.Tensor,
                           features: Sequence[int], alpha: float, variant: str = "arad") -> torch.Tensor:
    """Reference: a full forward of the prefix per feature; next-token logits ``(len(features), V)``."""
    hook = f"blocks.{state.layer}.hook_resid_post"
    out = []
    for f in features:
        new_D = amplify_resid(variant, state.resid_D, state.codes_F, W_dec_FD, b_dec_D,
                              torch.tensor([f], device=W_dec_FD.device), alpha)[0]

        def patch(resid_BLD, hook=None, new_D=new_D):
            resid_BLD = resid_BLD.clone()
            resid_BLD[:, -1] = new_D.to(resid_BLD.dtype)
            return resid_BLD

        with tl.hooks(fwd_hooks=[(hook, patch)]):
            out.append(tl(state.tokens_L[None])[0, -1])
    return torch.stack(out)


def _frozen_cache(tl, tokens_L: torch.Tensor):
    """Keys/values of every block for all prefix positions but the last, frozen (reused, never
    extended, by every batch of features)."""
    cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, 1)
    if len(tokens_L) > 1:
        prefix_1L = tokens_L[None, :-1]
        tl(prefix_1L, past_kv_cache=cache, attention_mask=torch.ones_like(prefix_1L), return_type=None)
    cache.freeze()
    return cache


def _expanded(cache, batch: int):
    entries = [TransformerLensKeyValueCacheEntry(e.past_keys.expand(batch, -1, -1, -1),
                                                 e.past_values.expand(batch, -1, -1, -1), frozen=True)
               for e in cache.entries]
    mask = cache.previous_attention_mask.expand(batch, -1)
    return TransformerLensKeyValueCache(entries, mask, frozen=True)


@torch.inference_mode()
def amplified_logits_fast(tl, state: PrefixState, W_dec_FD: torch.Tensor, b_dec_D: torch.Tensor,
                          features: Sequence[int], alpha: float, variant: str = "arad",
                          batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """The same logits as :func:`amplified_logits_naive`, recomputing only the last position from
    block ``layer + 1`` up, ``batch_size`` features at a time against the prefix's frozen cache
    (built once, in :func:`prefix_state`)."""
    feats = torch.as_tensor(list(features), dtype=torch.long, device=W_dec_FD.device)
    out = []
    for s in tqdm(range(0, len(feats), batch_size), desc="ΔC_k features", unit="batch",
                  disable=not progress):
        f_B = feats[s:s + batch_size]
        new_B1D = amplify_resid(variant, state.resid_D, state.codes_F, W_dec_FD, b_dec_D, f_B,
                                alpha)[:, None, :].to(state.resid_D.dtype)
        logits_B1V = tl(new_B1D, start_at_layer=state.layer + 1,
                        past_kv_cache=_expanded(state.cache, len(f_B)))
        out.append(logits_B1V[:, -1])
    if not out:
        return torch.empty((0, state.base_logits_V.shape[-1]))
    return torch.cat(out)


@torch.inference_mode()
def logit_lens_tokens(tl, W_dec_FD: torch.Tensor, top: int = 20, batch_size: int = 256) -> torch.Tensor:
    """Arad et al.'s logit lens: the ``top`` token ids of softmax(unembed(final_norm(W_dec[f])))
    per feature, ``(F, top)`` (softmax keeps the order, so these are the top logits)."""
    out = []
    for s in range(0, W_dec_FD.shape[0], batch_size):
        x_B1D = W_dec_FD[s:s + batch_size, None, :].to(tl.cfg.dtype)
        if tl.cfg.normalization_type is not None:
            x_B1D = tl.ln_final(x_B1D)
        out.append(torch.topk(tl.unembed(x_B1D)[:, 0], top, dim=-1).indices)
    return torch.cat(out)


def describe(variant: str) -> str:
    """The variant as the book prints it."""
    return {"arad": "f's code += α × max code at the position (other codes and error kept)",
            "scale": "f's code × α (other codes and error kept)",
            "decode": "residual ← decode(α · e_f)"}[variant]
