"""Stage ``capture`` (protocol §2): a model's residual activations, once per model and layer.

``prepare`` first dequantises packaged models into the cache and tokenises the corpus; the capture
then runs the model up to the SAEs' layer over both splits (resumable shard by shard) and computes
the inputs of the descriptive metrics that every SAE of the model shares. Notebook
``capture.ipynb``; record ``capture.json`` beside the activations.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import AutoTokenizer

from ..activations import (ActivationError, ActivationStore, array_sha, capture,
                           manifest_model_dtype, residual_at)
from ..data.corpus import build_token_splits, load_token_splits
from ..evals.descriptive import DescriptiveConfig, capture_inputs, inputs_current
from ..models import PACKAGED, load_model, prepare_packaged, resolve_hf_source
from ..profiles import ModelEntry, Profile, ProfileError
from ..results import CorruptFileError, Timer, provenance, read_json, write_json
from . import streaming
from .layout import CAPTURE, activations_dir, as_profile, descriptive_dir, model_dir, tokens_dir
from .records import Record, StaleRecord

NAME = "capture"


@dataclass(frozen=True)
class CaptureRecord(Record):
    """``capture.json``: contexts and shards per split, capture speed, model load time."""

    model: str
    layer: int
    splits: dict[str, Any]
    threads: int
    tokens_per_s: float
    load_seconds: float
    provenance: dict[str, Any]


def descriptive_settings(profile: Profile) -> DescriptiveConfig:
    """The profile's :class:`~saelib.evals.descriptive.DescriptiveConfig`: its model-level inputs
    are made here, its per-SAE metrics in the interp stage."""
    return profile.section("descriptive")


def prepare(profile: Profile | str, progress: bool = True) -> dict[str, Any]:
    """Dequantise packaged models into the cache and tokenise the corpus for every model."""
    profile = as_profile(profile)
    out: dict[str, Any] = {}
    for entry in profile.models:
        t0 = time.perf_counter()
        if entry.name in PACKAGED:
            prepare_packaged(entry.name)
        tok = AutoTokenizer.from_pretrained(resolve_hf_source(entry.name))
        c = profile.corpus
        splits = build_token_splits(tokens_dir(profile, entry), tok, source=c.source,
                                    text_field=c.text_field, context=c.context,
                                    train_tokens=c.train_tokens, eval_tokens=c.eval_tokens,
                                    seed=profile.seed, max_documents=c.max_documents,
                                    tokenizer_name=entry.name)
        out[entry.display] = {"train": splits.train_NL.shape, "eval": splits.eval_NL.shape,
                              "seconds": time.perf_counter() - t0}
    return out


def done(profile: Profile, entry: ModelEntry) -> bool:
    """Complete shards for both splits, captured from the current token arrays (a re-tokenised
    corpus, e.g. after the profile's sizes changed, makes the capture stale) by a model in the
    profile's ``capture.dtype``, and the descriptive metrics' inputs for the profile's current
    settings."""
    if not inputs_current(descriptive_dir(profile, entry), descriptive_settings(profile), entry.layer):
        return False
    try:
        splits = load_token_splits(tokens_dir(profile, entry))
    except (OSError, KeyError, ValueError, RuntimeError):
        return False
    for split, arr in captured_splits(profile, splits):
        m = activations_dir(profile, entry, split) / "manifest.json"
        if not m.exists():
            return False
        manifest = read_json(m)
        if not manifest.get("complete") or manifest.get("tokens_sha256") != array_sha(arr):
            return False
        if manifest_model_dtype(manifest) != profile.capture.dtype:
            return False
        try:  # every shard against its checksum: a corrupt one is recaptured, never trained on
            ActivationStore.open(activations_dir(profile, entry, split), verify=True)
        except (ActivationError, CorruptFileError) as e:
            print(f"warning: {e}; the capture stage will recompute it", file=sys.stderr)
            return False
    return streaming.done(profile, entry.name)


def captured_splits(profile: Profile, splits) -> tuple[tuple[str, Any], ...]:
    """The splits written to disk: both, or in streaming mode the eval split only (the training
    split's activations go from the model straight to the SAEs, :mod:`saelib.stages.streaming`)."""
    if streaming.streaming(profile):
        return (("eval", splits.eval_NL),)
    return (("train", splits.train_NL), ("eval", splits.eval_NL))


def run(profile: Profile | str, model: str, progress: bool = True,
        threads: int | None = None) -> CaptureRecord:
    """Capture train and eval residual activations for one model (protocol §2: one pass per
    model/layer, shared by all its SAEs), and the inputs of its SAEs' descriptive metrics.
    Resumes an interrupted capture.

    ``threads``: torch threads for this call (restored after). The grid passes all its cores
    here: a model's capture is the root of its part of the DAG, so it usually runs alone while
    the kernel's share of the cores (``grid.share_cores``) would leave the others idle."""
    with torch_threads(threads):
        return _capture(as_profile(profile), model, progress)


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` inside the block and restored after (None or
    0: unchanged)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _capture(profile: Profile, model: str, progress: bool) -> CaptureRecord:
    """:func:`run`'s work, on the threads it set."""
    entry = profile.model(model)
    timer = Timer()
    with timer("load_model"):
        lm = load_model(entry.name, device=profile.device,
                        dtype=getattr(torch, profile.capture.dtype))
    if entry.layer >= lm.n_layers:
        raise ProfileError(f"model {entry.name!r} has {lm.n_layers} layers; layer {entry.layer} is out of range")
    splits = load_token_splits(tokens_dir(profile, entry))
    summary = {}
    for split, arr in captured_splits(profile, splits):
        with timer(f"capture_{split}"):
            man = capture(lm.tl, arr, entry.layer, activations_dir(profile, entry, split),
                          batch_size=profile.capture.batch_size,
                          shard_tokens=profile.capture.shard_tokens,
                          meta={"model": entry.name, "split": split}, progress=progress)
        summary[split] = {"contexts": man["n_contexts"], "shards": len(man["shards"])}
    desc_cfg = descriptive_settings(profile)
    if not inputs_current(descriptive_dir(profile, entry), desc_cfg, entry.layer):
        with timer("descriptive_inputs"):
            capture_inputs(lambda toks: residual_at(lm.tl, toks.to(profile.device),
                                                    entry.layer).float(),
                           lm.tokenizer, entry.layer, desc_cfg, descriptive_dir(profile, entry),
                           progress=progress)
    if streaming.streaming(profile):
        with timer("stream_train"):
            summary["train"] = {"contexts": int(splits.train_NL.shape[0]), "shards": 0,
                                **streaming.run(profile, entry.name, lm.tl, progress=progress)}
    n_tok = sum(a.size for _, a in captured_splits(profile, splits))
    seconds = sum(timer.timings[f"capture_{split}"] for split, _ in captured_splits(profile, splits))
    record = CaptureRecord(model=entry.name, layer=entry.layer, splits=summary,
                           threads=torch.get_num_threads(), tokens_per_s=n_tok / max(1e-9, seconds),
                           load_seconds=lm.load_seconds,
                           provenance=provenance(asdict(profile.corpus), profile.seed,
                                                 timer.timings, profile=profile.name))
    write_json(model_dir(profile, entry) / CAPTURE, record.to_json())
    return record


def read(profile: Profile | str, model: str) -> CaptureRecord | None:
    """The model's ``capture.json``, or None when it is missing or stale."""
    profile = as_profile(profile)
    path = model_dir(profile, profile.model(model)) / CAPTURE
    if not path.exists():
        return None
    try:
        return CaptureRecord.from_json(read_json(path))
    except (StaleRecord, CorruptFileError):
        return None


def mean_store(profile: Profile | str, model: str) -> ActivationStore:
    """The captured activations whose per-dimension mean centres the model's SAEs (the notebook's
    figure): the training split's, or in streaming mode the eval split's (the only one stored)."""
    profile = as_profile(profile)
    split = "eval" if streaming.streaming(profile) else "train"
    return ActivationStore.open(activations_dir(profile, profile.model(model), split), verify=False)
