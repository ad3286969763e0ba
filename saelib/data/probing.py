"""Labelled binary text sets for k-sparse probing (protocol §3, SAEBench's sparse probing).

SAEBench probes on Bias-in-Bios, Amazon reviews, AG News, Europarl and GitHub code from the hub.
Offline, the PyPI package ``sae-probes`` ships 113 binary probing sets built from the same kinds of
sources (``cleaned_data/<id>_<name>.csv.zst``: a ``prompt`` text and a 0/1 ``target``), among them
AG News one-vs-rest, Amazon five-star, GitHub code language and movie sentiment: the closest to
SAEBench's own data available here (``offline-data.md``). A CSV on disk with the same two columns
works too (``path/to/file.csv``), so users with other data need no code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .corpus import CorpusError

#: The package's folder of cleaned binary sets.
SAE_PROBES_DIR = "data/cleaned_data"


@dataclass(frozen=True)
class ProbeSplit:
    """A balanced train/test draw of one binary set: texts and 0/1 labels."""

    name: str
    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray


def sae_probes_dir() -> Path:
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("data package 'sae-probes' is not installed (see requirements-data.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / SAE_PROBES_DIR


def available_sets() -> list[str]:
    """Names of the binary sets shipped in ``sae-probes`` (without the ``.csv.zst`` suffix)."""
    return sorted(p.name[: -len(".csv.zst")] for p in sae_probes_dir().glob("*.csv.zst"))


def _resolve(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix in (".csv", ".zst") and path.exists():
        return path
    candidate = sae_probes_dir() / f"{name}.csv.zst"
    if candidate.exists():
        return candidate
    close = [s for s in available_sets() if name.lower() in s.lower()][:8]
    raise CorpusError(f"probing set {name!r} is neither a CSV file nor one of sae-probes' sets"
                      + (f"; did you mean {', '.join(close)}?" if close else
                         "; list them with saelib.data.probing.available_sets()"))


def load_probe_set(name: str) -> tuple[list[str], np.ndarray]:
    """Texts and 0/1 labels of one binary set (``prompt`` and ``target`` columns)."""
    path = _resolve(name)
    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many types for a bad file; name the file once
        raise CorpusError(f"{path}: unreadable probing set ({type(e).__name__}: {e})") from e
    if not {"prompt", "target"} <= set(df.columns):
        raise CorpusError(f"{path}: needs 'prompt' and 'target' columns, has {list(df.columns)}")
    df = df.dropna(subset=["prompt", "target"])
    values = sorted(df["target"].unique().tolist(), key=str)
    if len(values) != 2:
        raise CorpusError(f"{path}: a binary set needs exactly two target values, found {values[:6]}")
    labels = (df["target"] == values[1]).to_numpy(dtype=np.int64)
    return df["prompt"].astype(str).tolist(), labels


def balanced_split(name: str, texts: list[str], labels: np.ndarray, n_train: int, n_test: int,
                   seed: int) -> ProbeSplit:
    """Seeded draw of ``n_train`` + ``n_test`` texts, half of each class in both halves (as
    SAEBench balances its probing sets); disjoint by construction."""
    rng = np.random.default_rng(seed)
    per_train, per_test = n_train // 2, n_test // 2
    train_idx, test_idx = [], []
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < per_train + per_test:
            raise CorpusError(f"probing set {name!r}: class {cls} has {len(idx)} texts, "
                              f"{per_train + per_test} needed (lower n_train/n_test)")
        idx = rng.permutation(idx)
        train_idx.extend(idx[:per_train])
        test_idx.extend(idx[per_train:per_train + per_test])
    train_idx, test_idx = rng.permutation(train_idx), rng.permutation(test_idx)
    return ProbeSplit(name, tuple(texts[i] for i in train_idx), labels[train_idx],
                      tuple(texts[i] for i in test_idx), labels[test_idx])
