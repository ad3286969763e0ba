"""A lean decoder for steered generation over a HookedTransformer's own weights (protocol §4).

Why not TransformerLens's forward with its key/value cache (the reference loop in
:mod:`saelib.steering.generate`): per new token, TransformerLens concatenates every layer's cache
(``torch.cat``, a copy of all past keys and values), re-rotates *all* cached keys (its cache stores
them unrotated), repeats grouped key/value heads for every query head and rebuilds the causal
mask; profiled on SmolLM2-135M (batch 36, 32 new tokens) those took about half of the time beside
the linear layers. This decoder keeps what TransformerLens does well and replaces only the
attention core:

* the norms, the Q/K/V projections (with their q/k norms), the MLPs, the embedding, the final
  norm and the unembedding are TransformerLens's own modules, called as they are, so any model
  TransformerLens converts computes the same functions;
* keys are rotated once, when they enter a key/value cache preallocated for the whole generation
  (one write per step, no copy), and attention is ``torch.nn.functional.scaled_dot_product_attention``
  with grouped heads broadcast, an explicit mask (left padding, causal, local windows) and the
  model's attention scale; an attention soft-cap (Gemma 2) takes the explicit softmax path;
* rows that share a prompt share its pass through the blocks up to the first steered layer: the
  steering adds at that layer's output (``hook_resid_post``), so those blocks see identical
  inputs for every factor and concept of one instruction (:meth:`LeanDecoder.prefill`).

With ``dtype=torch.bfloat16`` the blocks run on a bfloat16 copy of the model's weights (the
dtype the paper's GPU runs use; on a CPU with AVX-512 BF16 its linear layers, about 70 % of
float32 decoding time, run at up to twice float32's rate). The rotary tables, the norms'
statistics (TransformerLens computes them in float32), the key/value cache and attention (torch's
bfloat16 CPU attention runs at under half its float32 rate), the steering additions and the final
norm stay float32; the unembedding proposes candidates in bfloat16 and scores them in float32
(:meth:`LeanDecoder.logits`), so greedy picks are not decided by bfloat16 logit ties. This is not
the reference's function: ``bench/steer.py`` states its greedy agreement with float32.

Only ``blocks.{l}.hook_resid_post`` hooks are supported (the steering site); configurations this
decoder does not model (e.g. absolute positions, parallel attention/MLP, post-norm blocks) are
named by :func:`unsupported_reason`, and :func:`saelib.steering.generate.generate` then uses the
reference loop. Float32 outputs agree with the reference to round-off (different summation order
in attention), so greedy text is identical but for exact near-ties (``tests/test_engine.py``).
"""

from __future__ import annotations

import copy
import re
import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformer_lens.utilities.activation_functions import apply_softcap

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")

#: Flags of TransformerLens's config that change the block in ways this decoder does not model.
_UNSUPPORTED_FLAGS = ("use_attn_in", "use_split_qkv_input", "parallel_attn_mlp", "attn_only",
                      "use_attn_result", "load_in_4bit", "use_logn_attn", "use_dynamic_ntk_rope",
                      "use_attention_sinks", "ungroup_grouped_query_attention", "use_hook_mlp_in")


def unsupported_reason(cfg) -> str | None:
    """Why this decoder cannot run a model of TransformerLens config ``cfg``, or None."""
    if cfg.positional_embedding_type != "rotary":
        return f"positional embedding {cfg.positional_embedding_type!r} (only rotary)"
    for flag in _UNSUPPORTED_FLAGS:
        if getattr(cfg, flag, False):
            return f"config flag {flag}"
    if getattr(cfg, "clip_qkv", None) is not None:
        return "clip_qkv"
    if (cfg.attention_dir or "causal") != "causal":
        return f"attention direction {cfg.attention_dir!r}"
    arch = str(getattr(cfg, "original_architecture", "") or "")
    if arch.startswith(("Olmo", "Bert", "T5")):
        return f"architecture {arch}"
    if cfg.normalization_type not in ("RMS", "RMSPre", "LN", "LNPre"):
        return f"normalization {cfg.normalization_type!r}"
    if cfg.use_attn_scale is False:
        return "no attention scale"
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        return "attention scaled by layer index"
    return None


def hooked_layers(fwd_hooks: Sequence[tuple[str, Callable]]) -> dict[int, list[Callable]]:
    """``{layer: [hook, ...]}`` for ``blocks.{layer}.hook_resid_post`` hooks; ValueError otherwise."""
    out: dict[int, list[Callable]] = {}
    for name, fn in fwd_hooks:
        m = _HOOK.match(name)
        if m is None:
            raise ValueError(f"the lean decoder applies hooks at blocks.<l>.hook_resid_post only, "
                             f"got {name!r}")
        out.setdefault(int(m.group(1)), []).append(fn)
    return out


#: Weight dtypes the lean decoder runs its blocks in (:class:`LeanDecoder`).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: Logit candidates a bfloat16 unembedding proposes per row; their float32 logits are exact.
CANDIDATES = 16

#: Logits computed at once when scoring tokens (:meth:`LeanDecoder.token_logprobs`), 128 MB in
#: float32, so a 262k-token vocabulary (Gemma) scores a batch in slices instead of gigabytes.
SCORE_CHUNK = 1 << 25

#: Largest logits per position that a bfloat16 scoring pass recomputes in float32
#: (:meth:`LeanDecoder.token_logprobs`): they carry nearly all of the log-sum-exp.
SCORE_CANDIDATES = 64
#: Whether bfloat16 blocks also score with a bfloat16 unembedding (False: float32 head, as before
#: 2026-12-07; ``bench/rule_judge.py`` times both).
BF16_SCORING_HEAD = True

#: Per model (kept while it lives): what the decoder derives from its weights once, not per batch.
#: Generation never changes weights; a caller that edits a model's weights in place after its
#: first generation must generate from a new model object.
_DERIVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _derived(tl, key, make):
    store = _DERIVED.setdefault(tl, {})
    if key not in store:
        store[key] = make()
    return store[key]


def blocks_in(tl, dtype: torch.dtype):
    """``tl`` itself when its weights are ``dtype``, else a copy in ``dtype`` made once per model
    with ``tl``'s float32 rotary tables."""
    if next(tl.parameters()).dtype == dtype:
        return tl

    def lowered():
        low = copy.deepcopy(tl).to(dtype)
        for blk, ref in zip(low.blocks, tl.blocks):
            if hasattr(ref.attn, "rotary_cos"):
                blk.attn.rotary_cos = ref.attn.rotary_cos
                blk.attn.rotary_sin = ref.attn.rotary_sin
        return low

    return _derived(tl, ("blocks", dtype), lowered)


def exact_logits(W_VD: torch.Tensor, b_V: torch.Tensor, x_BD: torch.Tensor,
                 idx_BK: torch.Tensor) -> torch.Tensor:
    """The logits ``(B, K)`` of the listed tokens per row in the head's own dtype (before any
    soft-cap): where a bfloat16 unembedding proposed them, the exact values that decide."""
    return (W_VD[idx_BK] * x_BD[:, None, :]).sum(-1) + b_V[idx_BK]


def unembed_rows(tl) -> torch.Tensor:
    """The unembedding as ``[V, D]`` rows, contiguous, made once per model: TransformerLens's
    ``Unembed`` makes this copy of the whole vocabulary matrix on every call (113 MB for
    SmolLM2, 671 MB for Gemma 3), i.e. on every new token."""
    return _derived(tl, "W_U_VD", lambda: tl.unembed.W_U.T.contiguous())


class KVCache:
    """Rotated keys and values of every layer, ``[B, n_kv_heads, T_max, d_head]``, written in
    place; ``length`` positions are filled."""

    def __init__(self, n_layers: int, batch: int, n_kv: int, t_max: int, d_head: int,
                 dtype: torch.dtype, device):
        shape = (batch, n_kv, t_max, d_head)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0


class LeanDecoder:
    """Prefill and one-token steps of a HookedTransformer with steering hooks at residual outputs.

    Positions follow TransformerLens's left-padding convention (a row's first real token is
    position 0; pads are masked as keys), and local-attention windows are counted in cache slots
    as TransformerLens counts them, so the two compute the same function.
    """

    def __init__(self, tl, dtype: torch.dtype | None = None):
        reason = unsupported_reason(tl.cfg)
        if reason is not None:
            raise NotImplementedError(f"the lean decoder does not support this model: {reason}")
        self.head = tl  # final norm and unembedding, in the model's own dtype
        self.tl = tl if dtype is None else blocks_in(tl, dtype)
        self.dtype = next(self.tl.parameters()).dtype
        self.cache_dtype = next(tl.parameters()).dtype
        self.cfg = self.tl.cfg
        self.n_kv = int(tl.cfg.n_key_value_heads or tl.cfg.n_heads)
        self.W_O = [blk.attn.W_O.permute(2, 0, 1).reshape(tl.cfg.d_model, -1)
                    for blk in self.tl.blocks]

    # -- pieces ---------------------------------------------------------------------------------

    def _rope(self, attn, x_BPHd: torch.Tensor, pos_BP: torch.Tensor) -> torch.Tensor:
        rd = self.cfg.rotary_dim
        need = int(pos_BP.max()) + 1
        if need > attn.rotary_cos.shape[0]:
            attn._extend_rotary_embeddings(min(self.cfg.n_ctx, max(need, 2 * attn.rotary_cos.shape[0])))
        cos = attn.rotary_cos[pos_BP][:, :, None, :]
        sin = attn.rotary_sin[pos_BP][:, :, None, :]
        x_rot, x_pass = x_BPHd[..., :rd], x_BPHd[..., rd:]
        if self.cfg.rotary_adjacent_pairs:
            flip = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
        else:
            half = rd // 2
            flip = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        rotated = (x_rot * cos + flip * sin).to(x_BPHd.dtype)
        return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), dim=-1)

    def _mask(self, attn, key_valid_BT: torch.Tensor, start: int, n_new: int) -> torch.Tensor:
        """``[B, 1, P, T]`` bool: key valid, causal, inside a local window; a pad query may see
        itself so that its (unused) output stays finite."""
        t = key_valid_BT.shape[1]
        q_slot = torch.arange(start, start + n_new, device=key_valid_BT.device)
        k_slot = torch.arange(t, device=key_valid_BT.device)
        allowed = k_slot[None, :] <= q_slot[:, None]
        if getattr(attn, "attn_type", "global") == "local":
            allowed = allowed & (k_slot[None, :] > q_slot[:, None] - int(self.cfg.window_size))
        mask = allowed[None, None] & key_valid_BT[:, None, None, :]
        self_slot = (k_slot[None, :] == q_slot[:, None])[None, None]
        pad_query = ~key_valid_BT[:, start:start + n_new][:, None, :, None]
        return mask | (self_slot & pad_query)

    def _qkv(self, attn, x_BPD, pos_BP):
        """Rotated queries and keys, and values, ``[B, P, H, d]``, in the cache's dtype (float32)."""
        q, k, v = attn.calculate_qkv_matrices(x_BPD, x_BPD, x_BPD)
        q = self._rope(attn, q.to(self.cache_dtype), pos_BP)
        k = self._rope(attn, k.to(self.cache_dtype), pos_BP)
        return q, k, v.to(self.cache_dtype)

    def _attend(self, attn, q_BHPd, keys, values, mask) -> torch.Tensor:
        """Masked attention of ``[B, H, P, d]`` queries over grouped keys and values; an attention
        soft-cap (Gemma 2) takes the explicit path, anything else SDPA."""
        softcap = self.cfg.attn_scores_soft_cap
        if softcap is not None and softcap > 0:
            group = self.cfg.n_heads // self.n_kv
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
            scores = apply_softcap(q_BHPd @ keys.transpose(-1, -2) / attn.attn_scale, softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            return torch.softmax(scores, dim=-1) @ values
        return F.scaled_dot_product_attention(q_BHPd, keys, values, attn_mask=mask,
                                              scale=1.0 / float(attn.attn_scale),
                                              enable_gqa=self.n_kv != self.cfg.n_heads)

    def _attention(self, layer: int, x_BPD, pos_BP, key_valid_BT, cache: KVCache, start: int):
        attn = self.tl.blocks[layer].attn
        q, k, v = self._qkv(attn, x_BPD, pos_BP)
        n_new = x_BPD.shape[1]
        end = start + n_new
        cache.k[layer][:, :, start:end] = k.transpose(1, 2)
        cache.v[layer][:, :, start:end] = v.transpose(1, 2)
        keys, values = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        mask = self._mask(attn, key_valid_BT[:, :end], start, n_new)
        z = self._attend(attn, q.transpose(1, 2), keys, values, mask)
        z = z.transpose(1, 2).reshape(x_BPD.shape[0], n_new, -1).to(self.dtype)
        return F.linear(z, self.W_O[layer], attn.b_O)

    def _block(self, layer: int, resid_BPD, pos_BP, key_valid_BT, cache, start):
        blk = self.tl.blocks[layer]
        out = self._attention(layer, blk.ln1(resid_BPD), pos_BP, key_valid_BT, cache, start)
        if self.cfg.use_normalization_before_and_after:
            out = blk.ln1_post(out)
        resid_BPD = resid_BPD + out
        return resid_BPD + blk.apply_mlp(blk.ln2(resid_BPD))

    def run_blocks(self, resid_BPD, layers: range, pos_BP, key_valid_BT, cache: KVCache,
                   start: int, hooks: dict[int, list[Callable]]) -> torch.Tensor:
        """Blocks ``layers`` on ``resid_BPD`` (new positions from cache slot ``start``), each
        followed by its ``hook_resid_post`` hooks."""
        for layer in layers:
            resid_BPD = self._block(layer, resid_BPD, pos_BP, key_valid_BT, cache, start)
            resid_BPD = self._hooked(hooks.get(layer, ()), resid_BPD)
        return resid_BPD

    def _hooked(self, fns, resid):
        """``resid`` through steering hooks ``fns``; their (float32) additions rounded back to
        the blocks' dtype."""
        for fn in fns:
            resid = fn(resid).to(self.dtype)
        return resid

    def logits(self, resid_BD: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, V)`` from the last residual (final norm, unembed, soft-cap),
        TransformerLens's computation in the model's dtype.

        With bfloat16 blocks the unembedding (a fifth of SmolLM2's and two thirds of Gemma 3's
        decoding FLOPs) runs in bfloat16 and proposes :data:`CANDIDATES` tokens per row whose
        logits are then computed in float32: greedy picks the float32 argmax unless it lies outside
        the bfloat16 top 16 (bfloat16's round-off is ~0.4 %), and sampling sees the other logits
        at bfloat16 precision."""
        head = self.head
        x_B1D = resid_BD[:, None].to(self.cache_dtype)
        if head.cfg.normalization_type is not None:
            x_B1D = head.ln_final(x_B1D)
        x_BD = x_B1D[:, 0]
        W_VD, b_V = unembed_rows(head), head.unembed.b_U
        if self.tl is head:
            out_BV = F.linear(x_BD, W_VD, b_V)
        else:
            out_BV = F.linear(x_BD.to(self.dtype), unembed_rows(self.tl),
                              self.tl.unembed.b_U).to(self.cache_dtype)
            top_BC = out_BV.topk(min(CANDIDATES, out_BV.shape[-1]), dim=-1).indices
            out_BV = out_BV.scatter(-1, top_BC, exact_logits(W_VD, b_V, x_BD, top_BC))
        return apply_softcap(out_BV, head.cfg.output_logits_soft_cap)

    # -- generation steps -----------------------------------------------------------------------

    def new_cache(self, batch: int, t_max: int) -> KVCache:
        p = next(self.tl.parameters())
        return KVCache(self.cfg.n_layers, batch, self.n_kv, t_max, self.cfg.d_head,
                       self.cache_dtype, p.device)

    def _packed_block(self, layer: int, resid_ND, rows_N, slots_N, pos_N, key_valid_BL,
                      cache: KVCache) -> torch.Tensor:
        """One block on the real prompt tokens only, packed as ``[N, D]``: the position-wise parts
        (norms, projections, MLP) see no padding; attention scatters the queries into the padded
        ``[B, L]`` layout of the cache and gathers the outputs back."""
        blk = self.tl.blocks[layer]
        attn = blk.attn
        n_rows, length = key_valid_BL.shape
        x = blk.ln1(resid_ND[None])
        q, k, v = self._qkv(attn, x, pos_N[None])
        q, k = q[0], k[0]
        cache.k[layer][rows_N, :, slots_N] = k
        cache.v[layer][rows_N, :, slots_N] = v[0]
        q_BLHd = q.new_zeros((n_rows, length) + tuple(q.shape[1:]))
        q_BLHd[rows_N, slots_N] = q
        mask = self._mask(attn, key_valid_BL, 0, length)
        keys, values = cache.k[layer][:, :, :length], cache.v[layer][:, :, :length]
        z = self._attend(attn, q_BLHd.transpose(1, 2), keys, values, mask)
        z_ND = z.transpose(1, 2)[rows_N, slots_N].reshape(len(rows_N), -1).to(self.dtype)
        out = F.linear(z_ND, self.W_O[layer], attn.b_O)
        if self.cfg.use_normalization_before_and_after:
            out = blk.ln1_post(out)
        resid_ND = resid_ND + out
        return resid_ND + blk.apply_mlp(blk.ln2(resid_ND[None]))[0]

    def _packed_blocks(self, resid_ND, layers: range, mask_BL, cache: KVCache,
                       hooks: dict[int, list[Callable]]) -> torch.Tensor:
        """Blocks ``layers`` over the packed real tokens of left-padded prompts (cache slots
        from 0), each followed by its hooks (applied in the padded ``[B, L, D]`` layout)."""
        rows_N, slots_N = torch.nonzero(mask_BL, as_tuple=True)
        pos_N = (mask_BL.cumsum(dim=1) - 1)[rows_N, slots_N]
        key_valid = mask_BL.bool()
        for layer in layers:
            resid_ND = self._packed_block(layer, resid_ND, rows_N, slots_N, pos_N, key_valid, cache)
            if hooks.get(layer):
                padded = resid_ND.new_zeros(tuple(mask_BL.shape) + (resid_ND.shape[-1],))
                padded[rows_N, slots_N] = resid_ND
                padded = self._hooked(hooks[layer], padded)
                resid_ND = padded[rows_N, slots_N]
        return resid_ND

    def prefill(self, tokens_BL: torch.Tensor, mask_BL: torch.Tensor, cache: KVCache,
                hooks: dict[int, list[Callable]]) -> torch.Tensor:
        """Run left-padded prompts into ``cache`` (from slot 0); the last position's logits.

        Only real tokens go through the blocks (packed; a batch's prompts differ in length by up
        to 2x). Rows with identical tokens and mask share the blocks before the first hooked
        layer's output: those run on the distinct prompts once, and their keys, values and
        output are copied to every row."""
        n, length = tokens_BL.shape
        first = min(hooks) if hooks else self.cfg.n_layers - 1
        uniq, inverse = torch.unique(torch.cat((tokens_BL, mask_BL), dim=1), dim=0,
                                     return_inverse=True)
        u_tokens, u_mask = uniq[:, :length], uniq[:, length:]
        shared = KVCache(first + 1, len(uniq), self.n_kv, length, self.cfg.d_head,
                         cache.k[0].dtype, cache.k[0].device)
        u_rows, u_slots = torch.nonzero(u_mask, as_tuple=True)
        resid = self._packed_blocks(self.tl.embed(u_tokens)[u_rows, u_slots], range(first + 1),
                                    u_mask, shared, {})
        for layer in range(first + 1):
            cache.k[layer][:, :, :length] = shared.k[layer][inverse]
            cache.v[layer][:, :, :length] = shared.v[layer][inverse]
        padded = resid.new_zeros((len(uniq), length, resid.shape[-1]))
        padded[u_rows, u_slots] = resid
        padded = padded[inverse]
        padded = self._hooked(hooks.get(first, ()), padded)
        rows_N, slots_N = torch.nonzero(mask_BL, as_tuple=True)
        resid = self._packed_blocks(padded[rows_N, slots_N], range(first + 1, self.cfg.n_layers),
                                    mask_BL, cache, hooks)
        cache.length = length
        last = torch.zeros(n, dtype=torch.long, device=resid.device).scatter_reduce(
            0, rows_N, torch.arange(len(rows_N), device=resid.device), reduce="amax")
        return self.logits(resid[last])

    def step(self, tokens_B: torch.Tensor, pos_B: torch.Tensor, key_valid_BT: torch.Tensor,
             cache: KVCache, hooks: dict[int, list[Callable]]) -> torch.Tensor:
        """One new token per row at cache slot ``cache.length``; its logits ``(B, V)``."""
        start = cache.length
        resid = self.tl.embed(tokens_B[:, None])
        resid = self.run_blocks(resid, range(self.cfg.n_layers), pos_B[:, None], key_valid_BT,
                                cache, start, hooks)
        cache.length = start + 1
        return self.logits(resid[:, -1])

    # -- scoring ---------------------------------------------------------------------------------

    def token_logprobs(self, tokens_BL: torch.Tensor, mask_BL: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-probability of every real token after its row's first, given its prefix, with
        no hook: ``(logprob_N, row_N)``, flat over the batch.

        Why here (the offline judge's fluency signal, :func:`saelib.steering.generate.mean_logprob`):
        TransformerLens's forward would run the pads and materialise the full ``[B, L, V]`` logits
        and their log-softmax (~0.6 GB for a 90-row batch of SmolLM2). The blocks run packed on
        real tokens (any padding side, real tokens contiguous per row), in the decoder's dtype;
        the final norm runs in float32 and the unembedding on :data:`SCORE_CHUNK` elements at a
        time. With float32 blocks every logit is float32. With bfloat16 blocks the unembedding
        runs in bfloat16 (on this CPU ~3x float32's rate for the matmul, whose float32 weights of a
        262k vocabulary stream from memory), and then the scored token's logit and each position's
        :data:`SCORE_CANDIDATES` largest are recomputed in float32, so a bfloat16 logit enters the
        log-sum-exp only in the tail of the distribution (``bench/rule_judge.py`` states the
        agreement)."""
        n, length = tokens_BL.shape
        rows_N, slots_N = torch.nonzero(mask_BL, as_tuple=True)
        resid_ND = self._packed_blocks(self.tl.embed(tokens_BL)[rows_N, slots_N],
                                       range(self.cfg.n_layers), mask_BL,
                                       self.new_cache(n, length), {})
        has_next = rows_N[1:] == rows_N[:-1]
        x_ND = resid_ND[:-1][has_next].to(self.cache_dtype)
        target_N = tokens_BL[rows_N, slots_N][1:][has_next]
        head = self.head
        if head.cfg.normalization_type is not None:
            x_ND = head.ln_final(x_ND[None])[0]
        W_VD, b_V = unembed_rows(head), head.unembed.b_U
        cap = head.cfg.output_logits_soft_cap
        low = self.tl is not head and BF16_SCORING_HEAD  # a bfloat16 unembedding proposes

        def exact(x_CD, idx_CK):
            return apply_softcap(exact_logits(W_VD, b_V, x_CD, idx_CK), cap)

        step = max(1, SCORE_CHUNK // W_VD.shape[0])
        out = []
        for s in range(0, len(target_N), step):
            x_CD, t_C = x_ND[s:s + step], target_N[s:s + step]
            if low:
                logits_CV = apply_softcap(F.linear(x_CD.to(self.dtype), unembed_rows(self.tl),
                                                   self.tl.unembed.b_U).float(), cap)
                top_CK = logits_CV.topk(min(SCORE_CANDIDATES, logits_CV.shape[-1]), dim=-1).indices
                logits_CV.scatter_(1, top_CK, exact(x_CD, top_CK))
                target_C = exact(x_CD, t_C[:, None])[:, 0]
                logits_CV.scatter_(1, t_C[:, None], target_C[:, None])
            else:
                logits_CV = apply_softcap(F.linear(x_CD, W_VD, b_V), cap)
                target_C = logits_CV.gather(1, t_C[:, None])[:, 0]
            out.append(target_C - torch.logsumexp(logits_CV, dim=-1))
        empty = x_ND.new_zeros(0)
        return (torch.cat(out) if out else empty), rows_N[:-1][has_next]
