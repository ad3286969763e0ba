"""Batched generation with a key/value cache and per-row steering hooks (protocol §4).

Why not ``HookedTransformer.generate``: the steering grid puts rows of different concepts and
factors in one batch, each with its own hook state, and needs left padding whose mask is explicit
(the pad id may be a real token), a seeded sampler, and per-row stopping. This loop does exactly
that over TransformerLens's own forward and key/value cache, so the hooks act on the true residual
stream at every position, prompt and generated.

Only the last position's logits are computed (the blocks run with ``stop_at_layer``, then the final
norm and unembedding see one position): with a 262k-token vocabulary (Gemma) the full logits of a
prompt would cost more than the blocks.

Layout: prompts are left-padded to the batch's longest (an explicit attention mask hides the pads;
TransformerLens derives rotary positions from the mask), the prompt goes through once, then one
token per step reuses the cache. A row stops at its first stop token (not kept in the output) or
after ``max_new_tokens``; finished rows are fed a pad until the whole batch is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.utilities.activation_functions import apply_softcap


@dataclass(frozen=True)
class GenerationConfig:
    """``temperature`` 0 means greedy decoding; above 0, sampling from softmax(logits / T) with a
    ``torch.Generator`` seeded by ``seed`` (one per batch, so sampled text depends on the batch's
    composition; greedy text does not)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 32

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    tokens_BL = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(prompts), length), dtype=torch.long)
    for b, p in enumerate(prompts):
        if len(p):
            tokens_BL[b, length - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask_BL[b, length - len(p):] = 1
    return tokens_BL.to(device), mask_BL.to(device)


def last_logits(tl, tokens_BL: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Next-token logits at the last position, ``(B, V)``: TransformerLens's forward up to the last
    block, then its own final norm, unembedding and logit soft-cap on that position alone."""
    resid_B1D = tl(tokens_BL, stop_at_layer=tl.cfg.n_layers, **forward_kwargs)[:, -1:]
    if tl.cfg.normalization_type is not None:
        resid_B1D = tl.ln_final(resid_B1D)
    return apply_softcap(tl.unembed(resid_B1D), tl.cfg.output_logits_soft_cap)[:, -1]


@torch.inference_mode()
def generate_batch(tl, prompts: Sequence[Sequence[int]], config: GenerationConfig, *,
                   fwd_hooks: Sequence[tuple[str, Callable]] = (), stop_ids: Sequence[int] = (),
                   pad_id: int = 0) -> list[list[int]]:
    """New token ids for each prompt (token-id lists, BOS included where wanted), generated in one
    batch with ``fwd_hooks`` active on every forward pass (prompt and each new token)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = tl.cfg.device
    tokens_BL, mask_BL = _left_pad(prompts, pad_id, device)
    n = len(prompts)
    cache = TransformerLensKeyValueCache.init_cache(tl.cfg, device, n)
    gen = torch.Generator(device=device).manual_seed(config.seed) if config.temperature > 0 else None
    stops = torch.as_tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    finished_B = torch.zeros(n, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(n)]
    ones_B1 = torch.ones((n, 1), dtype=torch.long, device=device)
    with tl.hooks(fwd_hooks=list(fwd_hooks)):
        last_BV = last_logits(tl, tokens_BL, attention_mask=mask_BL, past_kv_cache=cache).float()
        for step in range(config.max_new_tokens):
            if gen is None:
                next_B = last_BV.argmax(dim=-1)
            else:
                probs_BV = torch.softmax(last_BV / config.temperature, dim=-1)
                next_B = torch.multinomial(probs_BV, 1, generator=gen)[:, 0]
            stopping_B = torch.isin(next_B, stops) & ~finished_B
            for b in torch.nonzero(~finished_B & ~stopping_B).flatten().tolist():
                out[b].append(int(next_B[b]))
            finished_B |= stopping_B
            if bool(finished_B.all()) or step == config.max_new_tokens - 1:
                break
            feed_B = torch.where(finished_B, torch.full_like(next_B, pad_id), next_B)
            last_BV = last_logits(tl, feed_B[:, None], attention_mask=ones_B1,
                                  past_kv_cache=cache).float()
    return out


def generate(tl, prompts: Sequence[Sequence[int]], config: GenerationConfig, *,
             hooks_for: Callable[[Sequence[int]], Sequence[tuple[str, Callable]]] | None = None,
             stop_ids: Sequence[int] = (), pad_id: int = 0, progress: bool = False,
             desc: str = "generate") -> list[list[int]]:
    """Generate for many prompts in batches of ``config.batch_size``.

    Rows are grouped by prompt length (less padding), and ``hooks_for(row_indices)`` returns the
    hooks for one batch given the indices of its rows in ``prompts`` (None: no hook). The result
    is in the order of ``prompts``.
    """
    config.validate()
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[list[int]] = [[] for _ in prompts]
    batches = [order[s:s + config.batch_size] for s in range(0, len(order), config.batch_size)]
    for rows in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        hooks = hooks_for(rows) if hooks_for is not None else ()
        for i, ids in zip(rows, generate_batch(tl, [prompts[i] for i in rows], config,
                                               fwd_hooks=hooks, stop_ids=stop_ids, pad_id=pad_id)):
            out[i] = ids
    return out


@torch.inference_mode()
def mean_logprob(tl, texts_ids: Sequence[Sequence[int]], bos_id: int | None, batch_size: int = 16,
                 pad_id: int = 0) -> list[float]:
    """Mean per-token log-probability of each token sequence under the (unhooked) model, each
    scored after a BOS where the tokenizer has one (without one, the first token has no prefix and
    is not scored): the offline judge's fluency signal (its module doc). Nothing to score gives
    ``-inf``."""
    out: list[float] = []
    for s in range(0, len(texts_ids), batch_size):
        chunk = [([bos_id] if bos_id is not None else []) + list(t) for t in texts_ids[s:s + batch_size]]
        length = max(len(c) for c in chunk)
        tokens_BL = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(chunk), length), dtype=torch.long)
        for b, c in enumerate(chunk):
            tokens_BL[b, :len(c)] = torch.as_tensor(c, dtype=torch.long)
            mask_BL[b, :len(c)] = 1
        tokens_BL, mask_BL = tokens_BL.to(tl.cfg.device), mask_BL.to(tl.cfg.device)
        logp_BLV = torch.log_softmax(tl(tokens_BL, attention_mask=mask_BL).float(), dim=-1)
        tok_logp_BL = torch.gather(logp_BLV[:, :-1], 2, tokens_BL[:, 1:, None])[..., 0]
        for b, c in enumerate(chunk):
            span = tok_logp_BL[b, :len(c) - 1]  # every token after the first, from its prefix
            out.append(float(span.mean()) if span.numel() else float("-inf"))
    return out
