"""Core metrics that need the language model: CE-loss recovered and the KL score (protocol §3).

CE-loss recovered = (H_zero-abl − H_sae) / (H_zero-abl − H_clean), and
KL score = (KL_zero-abl − KL_sae) / KL_zero-abl, with KL(p_clean ‖ p_patched) per token, as SAEBench's
``core`` eval defines them. The patched runs replace the residual stream after block L with the SAE
reconstruction (or zeros) at every position but BOS, which no SAE is trained on.

Why we start at layer L+1 instead of running the whole model three times: the eval activations after
block L are already in the activation cache, so each run only computes blocks L+1… and the
unembedding (``start_at_layer``), which roughly halves the cost of the most expensive per-SAE metric.

Why a zero-ablation cache: of the three runs (clean, SAE-patched, zero-ablated) only the patched one
depends on the SAE, and the clean one is needed again for KL(p_clean ‖ p_sae), but the zero-ablated
run's two sums (CE and KL) are the same for every SAE of a model: ``zero_cache`` keeps them in one
small JSON file, keyed by the inputs' checksums, so the 30 SAEs of a model pay for that run once
(~7 s of the ~24 s this metric took per SAE in the default profile). The cached sums are the very
floats an uncached run accumulates, so results do not change.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..results import CorruptFileError, read_json, write_json


@dataclass(frozen=True)
class CoreConfig:
    """Sizes of the held-out evaluation (profile section ``core``).

    ``eval_tokens``: held-out activations for L0 / MSE / explained variance / dead fraction;
    ``lm_contexts``: eval contexts run through the model for CE-loss recovered and KL score.
    """

    eval_tokens: int = 4096
    lm_contexts: int = 16

    def validate(self) -> "CoreConfig":
        if self.eval_tokens < 2:
            raise ValueError(f"eval_tokens must be >= 2, got {self.eval_tokens}")
        if self.lm_contexts < 1:
            raise ValueError(f"lm_contexts must be >= 1, got {self.lm_contexts}")
        return self


@dataclass(frozen=True)
class CoreLMMetrics:
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_loss_recovered: float
    kl_sae: float
    kl_zero: float
    kl_score: float
    n_tokens: int


#: Positions per slice of the [positions, vocabulary] work in :func:`_next_token_stats`: a few
#: MB per temporary, so the elementwise passes run from cache rather than memory (Gemma 3's 262k
#: vocabulary makes each full [4, 127, V] temporary 0.5 GB).
ROWS_PER_SLICE = 8


def _next_token_stats(logits_BLV: torch.Tensor, tokens_BL: torch.Tensor,
                      ref_logp_BLV: torch.Tensor | None):
    """Next-token log-probs (in place of ``logits_BLV``, float32), the sum of CE over positions
    and, against ``ref_logp_BLV``, the sum of KL(ref ‖ these): ``(logp, ce_sum, kl_sum)``, each
    position's values as ``log_softmax`` gives them, worked through in slices of
    :data:`ROWS_PER_SLICE` positions. The last position predicts nothing and is dropped."""
    logp = logits_BLV[:, :-1]
    if logp.dtype != torch.float32:
        logp = logp.float()
    targets = tokens_BL[:, 1:].long()
    ce_sum, kl_sum = 0.0, (None if ref_logp_BLV is None else 0.0)
    for b in range(logp.shape[0]):
        for s in range(0, logp.shape[1], ROWS_PER_SLICE):
            x = logp[b, s:s + ROWS_PER_SLICE]
            x.copy_(F.log_softmax(x, dim=-1))
            ce_sum -= float(x.gather(-1, targets[b, s:s + ROWS_PER_SLICE, None]).sum())
            if ref_logp_BLV is not None:
                ref = ref_logp_BLV[b, s:s + ROWS_PER_SLICE]
                kl_sum += float((ref.exp() * (ref - x)).sum())
    return logp, ce_sum, kl_sum


def zero_ablation_key(tl, acts_NLD: np.ndarray, tokens_NL: np.ndarray, layer: int,
                      batch_size: int) -> str:
    """What the zero-ablated run's sums depend on: the model, the layer, the batching (the sums
    accumulate batch by batch) and the exact tokens and activations."""
    h = hashlib.sha256()
    h.update(repr((getattr(tl.cfg, "model_name", None), tl.cfg.n_layers, tl.cfg.d_vocab, int(layer),
                   int(batch_size), tuple(acts_NLD.shape))).encode())
    h.update(np.ascontiguousarray(tokens_NL, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(acts_NLD, dtype=np.float32).tobytes())
    return h.hexdigest()


def _read_zero_cache(path: Path | None, key: str) -> dict[str, float] | None:
    if path is None or not path.exists():
        return None
    try:
        record = read_json(path)
        if record.get("key") == key:
            return {k: float(record[k]) for k in ("ce_zero", "kl_zero")}
    except (CorruptFileError, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"warning: {path} is unreadable ({e}); the zero-ablated run is recomputed",
              file=sys.stderr)
    return None


@torch.no_grad()
def lm_metrics(tl, reconstruct, acts_NLD: np.ndarray, tokens_NL: np.ndarray, layer: int,
               batch_size: int = 4, zero_cache: str | Path | None = None) -> CoreLMMetrics:
    """CE-loss recovered and KL score of ``reconstruct`` (raw → raw) on cached eval activations.

    ``acts_NLD`` must be the residual after block ``layer`` for ``tokens_NL`` (same contexts).
    ``zero_cache``: a JSON file for the SAE-independent zero-ablation sums (module doc), read when
    its key matches these inputs, else computed and written.
    """
    if acts_NLD.shape[:2] != tokens_NL.shape:
        raise ValueError(f"activations {acts_NLD.shape[:2]} and tokens {tokens_NL.shape} do not align")
    device = next(tl.parameters()).device
    cache = Path(zero_cache) if zero_cache is not None else None
    key = zero_ablation_key(tl, acts_NLD, tokens_NL, layer, batch_size) if cache else ""
    cached = _read_zero_cache(cache, key)
    sums = dict(ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl_sae=0.0, kl_zero=0.0)
    n = 0
    for b in range(0, len(tokens_NL), batch_size):
        toks = torch.as_tensor(tokens_NL[b:b + batch_size], device=device).long()
        clean = torch.as_tensor(np.asarray(acts_NLD[b:b + batch_size]), device=device).float()
        recon = reconstruct(clean)
        recon[:, 0] = clean[:, 0]
        run = lambda resid: tl(resid, start_at_layer=layer + 1, tokens=toks)  # noqa: E731
        ref_logp, ce_clean, _ = _next_token_stats(run(clean), toks, None)
        _, ce_sae, kl_sae = _next_token_stats(run(recon), toks, ref_logp)
        parts = [("ce_clean", ce_clean), ("ce_sae", ce_sae), ("kl_sae", kl_sae)]
        if cached is None:
            zero = torch.zeros_like(clean)
            zero[:, 0] = clean[:, 0]
            _, ce_zero, kl_zero = _next_token_stats(run(zero), toks, ref_logp)
            parts += [("ce_zero", ce_zero), ("kl_zero", kl_zero)]
        for name, v in parts:
            sums[name] += v
        n += toks[:, 1:].numel()
    if cached is not None:
        sums.update(cached)
    elif cache is not None:
        write_json(cache, {"key": key, "ce_zero": sums["ce_zero"], "kl_zero": sums["kl_zero"],
                           "n_tokens": n})
    m = {k: v / max(n, 1) for k, v in sums.items()}
    denom = m["ce_zero"] - m["ce_clean"]
    ce_rec = (m["ce_zero"] - m["ce_sae"]) / denom if abs(denom) > 1e-12 else float("nan")
    kl_score = (m["kl_zero"] - m["kl_sae"]) / m["kl_zero"] if m["kl_zero"] > 1e-12 else float("nan")
    return CoreLMMetrics(m["ce_clean"], m["ce_sae"], m["ce_zero"], ce_rec, m["kl_sae"], m["kl_zero"],
                         kl_score, n)
