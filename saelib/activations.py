"""Residual-stream activation cache: one capture per (model, layer), shared by every SAE.

Why: the 30 SAEs of a profile train on the same activations (protocol §2), and capture is the
expensive part on a CPU. We run the model only up to the hooked block (``stop_at_layer``: no layer
after it is computed), write memory-mappable ``.npy`` shards of whole contexts with a manifest of
checksums, and resume an interrupted capture at the first missing shard.

Every position is stored, BOS included, so shard rows stay aligned with the token arrays (AutoInterp
needs positions); the training reader drops BOS rows, because BOS activations are huge outliers
(``offline-data.md``, "Massive activations") and no SAE is asked to reconstruct them.

Attention sinks after BOS. Both packaged models also put a few other tokens far off the rest of
the residual stream (Sun et al., "Massive activations in large language models", 2024; ~1 in
3,000 tokens here). :func:`sink_mask` names them by one rule, SAEBench's training library's
(``max_activation_norm_multiple`` = 10): distance from the mean over
:data:`SINK_NORM_MULTIPLE` times the median distance. They stay in training (the SAEs learn to
reconstruct them, which the language-model metrics need); the held-out metrics also report
explained variance without them (:mod:`saelib.sae.metrics`), and AutoInterp never centres a
window on one (:meth:`ActivationStore.sink_mask_NL`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .results import (CorruptFileError, first_mismatch, read_json, read_npy, sha256_file,
                      write_json, write_npy)

MANIFEST = "manifest.json"

#: A token is an attention sink when its distance from the mean exceeds this multiple of the median
#: distance (SAEBench's training library's ``max_activation_norm_multiple`` default).
SINK_NORM_MULTIPLE = 10.0


def sinks_by_distance(dist_N: torch.Tensor, multiple: float = SINK_NORM_MULTIPLE) -> torch.Tensor:
    """Bool ``[n]``: distances above ``multiple`` times their median; all False for
    ``multiple <= 0``."""
    if multiple <= 0:
        return torch.zeros(dist_N.shape[0], dtype=torch.bool, device=dist_N.device)
    return dist_N > multiple * dist_N.median()


@torch.no_grad()
def sink_mask(acts_ND: torch.Tensor, multiple: float = SINK_NORM_MULTIPLE,
              mean_D: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[n]``: the attention sinks among rows ``acts_ND``, by their distance from
    ``mean_D`` (default: the rows' mean)."""
    x = acts_ND.double()
    return sinks_by_distance((x - (x.mean(0) if mean_D is None else mean_D.double())).norm(dim=-1),
                             multiple)


class ActivationError(RuntimeError):
    """Non-finite activations or an unusable cache."""


def model_dtype_name(tl) -> str:
    """The dtype the model computes in (``float32``, ``bfloat16``), as a capture's manifest
    records it (:func:`manifest_model_dtype`)."""
    return str(next(tl.parameters()).dtype).removeprefix("torch.")


def manifest_model_dtype(manifest: dict) -> str:
    """The dtype of the model a capture's manifest was written by: its ``model_dtype``, which is
    left out for float32 (every manifest written before the key existed is float32)."""
    return manifest.get("model_dtype", "float32")


def residual_at(tl, tokens_BL: torch.Tensor, layer: int) -> torch.Tensor:
    """Residual stream after block ``layer`` (``blocks.{layer}.hook_resid_post``), computing no
    later block: ``stop_at_layer=layer + 1`` returns exactly that tensor."""
    with torch.no_grad():
        return tl(tokens_BL, stop_at_layer=layer + 1)


def capture(tl, tokens_NL: np.ndarray, layer: int, out_dir: str | Path, *, batch_size: int = 8,
            shard_tokens: int = 65_536, meta: dict | None = None, progress: bool = True) -> dict:
    """Capture ``[N, L, D]`` residual activations into shards under ``out_dir``; resumable.

    A shard is written (temp file + rename), then its checksum is appended to the manifest; a rerun
    verifies the shards the manifest lists and continues after the last good one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_ctx, ctx_len = tokens_NL.shape
    per_shard = max(1, shard_tokens // ctx_len)
    n_shards = math.ceil(n_ctx / per_shard)
    tokens_sha = array_sha(tokens_NL)
    manifest_path = out_dir / MANIFEST
    manifest = read_json(manifest_path) if manifest_path.exists() else None
    model_dtype = model_dtype_name(tl)
    header = {"layer": layer, "hook": f"blocks.{layer}.hook_resid_post", "n_contexts": n_ctx,
              "context": ctx_len, "d_model": int(tl.cfg.d_model), "contexts_per_shard": per_shard,
              "tokens_sha256": tokens_sha, "dtype": "float32", **(meta or {})}
    if model_dtype != "float32":  # a float32 capture's manifest predates the key
        header["model_dtype"] = model_dtype
    if (manifest is None or {k: manifest.get(k) for k in header} != header
            or manifest_model_dtype(manifest) != model_dtype):
        manifest = {**header, "shards": [], "complete": False}
    good = []
    for entry in manifest["shards"]:
        path = out_dir / entry["file"]
        if path.exists() and sha256_file(path) == entry["sha256"]:
            good.append(entry)
        else:
            break
    manifest["shards"] = good
    manifest["complete"] = len(good) == n_shards
    write_json(manifest_path, manifest)
    device = next(tl.parameters()).device
    bar = tqdm(total=n_ctx, initial=len(good) * per_shard, unit="ctx", desc=f"capture L{layer}",
               disable=not progress)
    for shard in range(len(good), n_shards):
        lo, hi = shard * per_shard, min(n_ctx, (shard + 1) * per_shard)
        acts = np.empty((hi - lo, ctx_len, header["d_model"]), dtype=np.float32)
        for b in range(lo, hi, batch_size):
            e = min(hi, b + batch_size)
            toks = torch.as_tensor(tokens_NL[b:e], dtype=torch.long, device=device)
            acts[b - lo:e - lo] = residual_at(tl, toks, layer).float().cpu().numpy()
            bar.update(e - b)
        name = f"shard_{shard:05d}.npy"
        if not np.isfinite(acts).all():
            bad = int((~np.isfinite(acts)).sum())
            raise ActivationError(f"{out_dir / name}: {bad} non-finite activation values "
                                  f"(contexts {lo}..{hi - 1}); the model or its dtype is unstable")
        manifest["shards"].append({"file": name, "contexts": [lo, hi],
                                   "sha256": write_npy(out_dir / name, acts)})
        manifest["complete"] = len(manifest["shards"]) == n_shards
        write_json(manifest_path, manifest)
    bar.close()
    return manifest


def array_sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def shuffled_batches(n_shards: int, shard_rows: Callable[[int], int],
                     load_rows: Callable[[int], np.ndarray], batch_size: int, *, seed: int = 0,
                     total: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
    """Training batches ``[batch_size, D]`` over shards of rows, shuffled, until ``total`` rows.

    Shuffling: a fresh shard order per epoch and a row permutation within each shard; enough mixing
    for SAE training on whole-document contexts. The order is drawn from the shards' row counts
    alone (``shard_rows``), and a shard's rows are loaded (``load_rows``: read from the cache, or
    computed by the model) only when a batch takes rows from it, so ``start_batch`` batches are
    skipped without loading a shard they alone use: a resumed run reads (or recomputes) at most the
    shards its next batch spans. The cached and the streamed activations share this function, so
    both modes serve the same batches from the same activations.
    """
    rng = np.random.default_rng(seed)
    served = 0
    skip_rows = start_batch * batch_size
    pending: list[tuple[int, np.ndarray]] = []
    n_pending = 0
    loaded: dict[int, np.ndarray] = {}
    while served < total:
        for i in rng.permutation(n_shards):
            pending.append((int(i), rng.permutation(shard_rows(int(i)))))
            n_pending += len(pending[-1][1])
            while n_pending >= batch_size:
                if served >= total:
                    return
                take, need = [], batch_size
                while need:
                    shard, idx = pending[0]
                    if len(idx) <= need:
                        take.append(pending.pop(0))
                        need -= len(idx)
                    else:
                        take.append((shard, idx[:need]))
                        pending[0] = (shard, idx[need:])
                        need = 0
                n_pending -= batch_size
                if served >= skip_rows:
                    for shard, _ in take:
                        if shard not in loaded:
                            loaded[shard] = load_rows(shard)
                    yield torch.from_numpy(np.concatenate([loaded[s][idx] for s, idx in take]))
                    keep = {s for s, _ in pending}
                    loaded = {s: rows for s, rows in loaded.items() if s in keep}
                served += batch_size


class ModelStream:
    """The activations a capture would write, computed by the model when a batch needs them.

    Streaming training (profile ``training.mode: streaming``): the model runs over the training
    contexts once per epoch, in the cache's shards and forward batches, and its activations go
    straight into :func:`shuffled_batches` (the shard in hand is the shuffling buffer). Nothing
    is written to disk. Same interface as :class:`ActivationStore` for training, and the same
    numbers: a shard's contexts are run in the capture's batches of ``batch_size`` contexts, so a
    row's activation is the one the cache would hold. ``forward_contexts`` counts the contexts run.
    """

    def __init__(self, tl, tokens_NL: np.ndarray, layer: int, *, batch_size: int = 8,
                 shard_tokens: int = 65_536):
        self.tl, self.tokens_NL, self.layer = tl, tokens_NL, layer
        self.batch_size = batch_size
        n_ctx, ctx_len = tokens_NL.shape
        self.per_shard = max(1, shard_tokens // ctx_len)
        self.n_shards = math.ceil(n_ctx / self.per_shard)
        self.forward_contexts = 0

    @property
    def d_model(self) -> int:
        return int(self.tl.cfg.d_model)

    @property
    def context(self) -> int:
        return int(self.tokens_NL.shape[1])

    @property
    def n_contexts(self) -> int:
        return int(self.tokens_NL.shape[0])

    def n_tokens(self, drop_bos: bool = True) -> int:
        return self.n_contexts * (self.context - int(drop_bos))

    def _bounds(self, i: int) -> tuple[int, int]:
        return i * self.per_shard, min(self.n_contexts, (i + 1) * self.per_shard)

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i``'s activations ``[n, L, D]`` (float32), computed now."""
        lo, hi = self._bounds(i)
        device = next(self.tl.parameters()).device
        acts = np.empty((hi - lo, self.context, self.d_model), dtype=np.float32)
        for b in range(lo, hi, self.batch_size):
            e = min(hi, b + self.batch_size)
            toks = torch.as_tensor(self.tokens_NL[b:e], dtype=torch.long, device=device)
            acts[b - lo:e - lo] = residual_at(self.tl, toks, self.layer).float().cpu().numpy()
        self.forward_contexts += hi - lo
        if not np.isfinite(acts).all():
            raise ActivationError(f"non-finite activations in contexts {lo}..{hi - 1}; the model "
                                  "or its dtype is unstable")
        return acts

    def iter_batches(self, batch_size: int, *, seed: int = 0, drop_bos: bool = True,
                     max_tokens: int | None = None, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """As :meth:`ActivationStore.iter_batches`, the model computing each shard when needed."""
        start = int(drop_bos)

        def rows(i: int) -> int:
            lo, hi = self._bounds(i)
            return (hi - lo) * (self.context - start)

        return shuffled_batches(
            self.n_shards, rows, lambda i: self.shard(i)[:, start:, :].reshape(-1, self.d_model),
            batch_size, seed=seed,
            total=max_tokens if max_tokens is not None else self.n_tokens(drop_bos),
            start_batch=start_batch)


@dataclass
class ActivationStore:
    """Reader over a finished capture: memory-mapped shards, verified against the manifest."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> "ActivationStore":
        root = Path(root)
        if not (root / MANIFEST).exists():
            raise ActivationError(f"{root}: no activation cache here (missing {MANIFEST}); run capture")
        manifest = read_json(root / MANIFEST)
        if not manifest.get("complete"):
            raise ActivationError(f"{root}: capture is incomplete ({len(manifest['shards'])} shards); "
                                  f"rerun capture to resume it")
        if verify:
            bad = first_mismatch(root, {e["file"]: e["sha256"] for e in manifest["shards"]})
            if bad is not None:
                raise CorruptFileError(f"{bad}: missing or checksum differs from {root / MANIFEST}")
        return cls(root, manifest)

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def context(self) -> int:
        return int(self.manifest["context"])

    @property
    def n_contexts(self) -> int:
        return int(self.manifest["n_contexts"])

    def n_tokens(self, drop_bos: bool = True) -> int:
        return self.n_contexts * (self.context - int(drop_bos))

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` as a read-only memory map ``[n, L, D]`` (no pickle: ``allow_pickle=False``)."""
        return read_npy(self.root / self.manifest["shards"][i]["file"], mmap=True)

    def iter_contexts(self, batch_contexts: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_context_index, acts_BLD)`` in corpus order (for evaluation)."""
        for i, entry in enumerate(self.manifest["shards"]):
            arr = self.shard(i)
            lo = entry["contexts"][0]
            for b in range(0, len(arr), batch_contexts):
                yield lo + b, np.asarray(arr[b:b + batch_contexts])

    def iter_batches(self, batch_size: int, *, seed: int = 0, drop_bos: bool = True,
                     max_tokens: int | None = None, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Shuffled training batches ``[B, D]`` (float32), cycling over epochs until ``max_tokens``
        (:func:`shuffled_batches`; ``start_batch`` skips that many batches without reading them)."""
        start = int(drop_bos)
        return shuffled_batches(
            len(self.manifest["shards"]),
            lambda i: (self.manifest["shards"][i]["contexts"][1]
                       - self.manifest["shards"][i]["contexts"][0]) * (self.context - start),
            lambda i: np.asarray(self.shard(i)[:, start:, :]).reshape(-1, self.d_model),
            batch_size, seed=seed,
            total=max_tokens if max_tokens is not None else self.n_tokens(drop_bos),
            start_batch=start_batch)

    def mean(self, drop_bos: bool = True) -> torch.Tensor:
        """Per-dimension mean (float64 accumulation), used to initialise/centre ``b_dec``."""
        total = np.zeros(self.d_model, dtype=np.float64)
        count = 0
        for _, acts_BLD in self.iter_contexts():
            rows = acts_BLD[:, int(drop_bos):, :].reshape(-1, self.d_model)
            total += rows.sum(axis=0, dtype=np.float64)
            count += len(rows)
        return torch.from_numpy((total / max(count, 1)).astype(np.float32))

    def sample(self, n_tokens: int, *, seed: int = 0, drop_bos: bool = True) -> torch.Tensor:
        """A deterministic sample of ``n_tokens`` rows ``[n, D]`` for held-out metrics."""
        rows = []
        got = 0
        for _, acts_BLD in self.iter_contexts():
            r = acts_BLD[:, int(drop_bos):, :].reshape(-1, self.d_model)
            rows.append(r)
            got += len(r)
            if got >= n_tokens:
                break
        allrows = np.concatenate(rows)
        idx = np.random.default_rng(seed).permutation(len(allrows))[:n_tokens]
        return torch.from_numpy(np.ascontiguousarray(allrows[np.sort(idx)]))

    def sink_mask_NL(self, multiple: float = SINK_NORM_MULTIPLE) -> np.ndarray:
        """Bool ``[contexts, positions]``: the attention sinks of the whole split, by distance
        from its mean (BOS dropped) against the median over its tokens after BOS; position 0
        (BOS) is never flagged, being excluded wherever this mask is used."""
        mean_D = self.mean().double()
        dist_NL = torch.cat([(torch.from_numpy(np.array(a, dtype=np.float64)) - mean_D).norm(dim=-1)
                             for _, a in self.iter_contexts()])
        out_NL = torch.zeros(dist_NL.shape, dtype=torch.bool)
        out_NL[:, 1:] = sinks_by_distance(dist_NL[:, 1:].reshape(-1), multiple).reshape(
            dist_NL.shape[0], -1)
        return out_NL.numpy()
