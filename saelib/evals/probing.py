"""k-sparse probing (protocol §3, descriptive; SAEBench's ``sparse_probing``).

Why: the paper's Figs. 5–7 show SAEBench's metrics across L0 beside AutoInterp, and sparse
probing asks whether a handful of SAE latents carry a labelled concept as well as the residual
stream does. As SAEBench defines it, per binary set:

* each text is run to the SAE's layer (context cut to ``context`` tokens, BOS first); the residual
  stream and the SAE code are **mean-pooled** over the text's tokens, BOS excluded;
* the ``k`` latents (or residual dimensions, for the baseline) with the largest absolute
  difference of class means on the training half are kept (SAEBench's ``get_top_k_mean_diff_mask``);
* a logistic-regression probe is fit on them and scored by accuracy on the held-out half;
* also reported: the probe on all latents and on the whole residual stream (the LLM baseline).

The residual activations are computed once per model (``saelib.evals.descriptive``) and shared by
its SAEs; each SAE only encodes them. sklearn's ``LogisticRegression`` is the probe, as in SAEBench;
inputs are standardised on the training half so lbfgs converges at the default iteration budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class ProbingConfig:
    """Sparse-probing parameters (profile section ``descriptive.probing``).

    ``datasets``: sae-probes set names (or CSV paths); ``n_train``/``n_test`` texts per set,
    balanced; ``context``: tokens per text including BOS; ``ks``: probe sizes (SAEBench 1, 2, 5).
    """

    datasets: tuple[str, ...] = ("161_agnews_0", "157_amazon_5star", "159_code_Python",
                                 "113_movie_sent", "5_hist_fig_ismale")
    n_train: int = 200
    n_test: int = 100
    context: int = 64
    ks: tuple[int, ...] = (1, 2, 5)
    seed: int = 0

    def validate(self) -> "ProbingConfig":
        if not self.datasets:
            raise ValueError("probing.datasets is empty; name at least one set")
        if self.n_train < 4 or self.n_test < 2:
            raise ValueError(f"probing needs n_train >= 4 and n_test >= 2, got {self.n_train}, {self.n_test}")
        if self.context < 2:
            raise ValueError(f"probing.context must be >= 2 (BOS + one token), got {self.context}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"probing.ks must be positive integers, got {self.ks}")
        return self


def top_k_mean_diff(X_NF: np.ndarray, y_N: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` columns with the largest |mean(class 1) − mean(class 0)|, ties broken
    by the lower index (stable), so the pick is deterministic."""
    diff = np.abs(X_NF[y_N == 1].mean(0) - X_NF[y_N == 0].mean(0))
    order = np.argsort(-diff, kind="stable")
    return np.sort(order[: min(k, X_NF.shape[1])])


def probe_accuracy(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray,
                   y_test: np.ndarray, seed: int = 0) -> float:
    """Test accuracy of a logistic-regression probe fit on standardised training features."""
    if len(np.unique(y_train)) < 2:
        raise ValueError("a probe needs both classes in its training half")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    probe.fit(X_train, y_train)
    return float((probe.predict(X_test) == y_test).mean())


def mean_pool(acts_NLD: np.ndarray, lengths_N: np.ndarray,
              encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
              chunk_tokens: int = 8192) -> np.ndarray:
    """Mean over positions 1..length−1 (BOS excluded) of each text's residual, or of its SAE code
    when ``encode`` is given; padding never enters a mean."""
    N, L, _ = acts_NLD.shape
    if (lengths_N < 2).any():
        raise ValueError("every text needs at least one token after BOS")
    rows = []
    per = max(1, chunk_tokens // L)
    for lo in range(0, N, per):
        block = torch.as_tensor(np.asarray(acts_NLD[lo:lo + per], dtype=np.float32))
        lens = torch.as_tensor(lengths_N[lo:lo + per])
        mask = (torch.arange(L)[None, :] < lens[:, None]) & (torch.arange(L)[None, :] > 0)
        with torch.no_grad():
            feats = encode(block[mask]) if encode is not None else block[mask]
        sums = torch.zeros(len(block), feats.shape[-1], dtype=torch.float64)
        owner = torch.nonzero(mask)[:, 0]
        sums.index_add_(0, owner, feats.double())
        rows.append((sums / (lens[:, None] - 1).double()).numpy())
    return np.concatenate(rows).astype(np.float32)


@dataclass(frozen=True)
class ProbeSetResult:
    """Accuracies on one binary set: LLM baseline and SAE, all features and top-k."""

    name: str
    llm: float
    sae: float
    llm_top_k: dict[int, float]
    sae_top_k: dict[int, float]


def probe_set(res_train: np.ndarray, res_test: np.ndarray, sae_train: np.ndarray,
              sae_test: np.ndarray, y_train: np.ndarray, y_test: np.ndarray, ks: tuple[int, ...],
              name: str = "", seed: int = 0) -> ProbeSetResult:
    """All probes of one set from mean-pooled residuals (``res_*``) and SAE codes (``sae_*``)."""
    def top_k(X_tr, X_te):
        out = {}
        for k in ks:
            cols = top_k_mean_diff(X_tr, y_train, k)
            out[int(k)] = probe_accuracy(X_tr[:, cols], y_train, X_te[:, cols], y_test, seed)
        return out

    return ProbeSetResult(name=name,
                          llm=probe_accuracy(res_train, y_train, res_test, y_test, seed),
                          sae=probe_accuracy(sae_train, y_train, sae_test, y_test, seed),
                          llm_top_k=top_k(res_train, res_test), sae_top_k=top_k(sae_train, sae_test))


def summarise(sets: list[ProbeSetResult], ks: tuple[int, ...]) -> dict[str, float]:
    """Means over sets, keyed as SAEBench's output (``sae_top_1_test_accuracy`` …)."""
    out = {"llm_test_accuracy": float(np.mean([s.llm for s in sets])),
           "sae_test_accuracy": float(np.mean([s.sae for s in sets]))}
    for k in ks:
        out[f"llm_top_{k}_test_accuracy"] = float(np.mean([s.llm_top_k[int(k)] for s in sets]))
        out[f"sae_top_{k}_test_accuracy"] = float(np.mean([s.sae_top_k[int(k)] for s in sets]))
    return out
