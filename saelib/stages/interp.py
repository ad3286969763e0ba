"""Stage ``interp`` (protocol §3): the interpretability μ(θ) of one SAE, and SAEBench's
descriptive metrics beside it.

AutoInterp: the saved SAE encodes the eval split's cached activations (the windows the judge sees
are held-out text); the profile's judge explains and detects; ``autointerp.jsonl`` holds one row
per scored latent (steering reads each latent's explanation and max activation from it) and block
``interp`` of ``result.json`` holds μ and its bookkeeping (:class:`InterpRecord`). The descriptive
metrics (dense fraction, first-letter absorption, k-sparse probing; the paper's Figs. 5–7) are
block ``descriptive`` (:class:`DescriptiveRecord`), from inputs the capture stage made once per
model. One notebook, ``interp.ipynb``, runs both; steering needs only the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer

from ..activations import ActivationStore
from ..data.corpus import load_token_splits, token_frequencies
from ..evals.autointerp import AutoInterpConfig, run_autointerp
from ..evals.descriptive import load_inputs
from ..evals.descriptive import run as run_descriptive_metrics
from ..evals.windows import EncodedCodes
from ..judges.config import JudgeConfig
from ..judges.factory import make_judge
from ..models import resolve_hf_source, special_token_ids
from ..profiles import Profile
from ..results import CorruptFileError, read_json, read_jsonl, write_json, write_jsonl
from ..sae.io import load_sae
from . import train
from .capture import descriptive_settings
from .layout import SAEJob, activations_dir, descriptive_dir, resolve_job, tokens_dir
from .records import BlockRecord, settings_record
from .runner import BlockStage, Context

NAME = "interp"
INTERP_ROWS = "autointerp.jsonl"
DESCRIPTIVE_ROWS = "descriptive.json"


@dataclass(frozen=True)
class InterpRecord(BlockRecord):
    """Block ``interp``: μ(θ) over CONCEPT100, live and rare latents, the judge and its usage."""

    BLOCK = "interp"

    mu: float | None
    mean_score_all: float | None
    width: int
    n_live: int
    n_rare: int
    n_scored: int
    n_concept100: int
    concept100: list[int]
    partial: bool
    reason: str | None
    timings_s: dict[str, float]
    judge: str
    judge_usage: dict[str, Any]
    config: dict[str, Any]
    eval_tokens: int
    rows_file: str
    #: eval positions never centred because they are attention sinks (``config.exclude_sinks``)
    sink_positions: int = 0


@dataclass(frozen=True)
class DescriptiveRecord(BlockRecord):
    """Block ``descriptive``: SAEBench's descriptive metrics, shown beside μ, never in a τ_b."""

    BLOCK = "descriptive"

    dense_fraction: float
    dense_tokens: int
    absorption_fraction: float | None
    full_absorption: float | None
    absorption_letters: int
    absorption_probe_f1: float | None
    absorption_partial: bool
    absorption_reason: str | None
    probing: dict[str, Any]
    probing_sets: int
    not_computed: dict[str, str]
    rows_file: str


def settings(profile: Profile) -> tuple[AutoInterpConfig, JudgeConfig]:
    """The profile's ``(AutoInterpConfig, JudgeConfig)`` (protocol §3)."""
    return profile.section("interp"), profile.section("judge")


def _record_settings(profile: Profile) -> dict[str, Any]:
    config, judge_cfg = settings(profile)
    return settings_record(interp=config, judge=judge_cfg)


def _compute_autointerp(ctx: Context) -> tuple[dict[str, Any], int]:
    """Encode the eval split with the saved SAE, explain and detect (only the tokenizer is
    loaded, never the model)."""
    profile, entry, out, timer = ctx.profile, ctx.entry, ctx.out, ctx.timer
    config, judge_cfg = settings(profile)
    with timer("load"):
        sae = load_sae(out / "sae", device=profile.device)
        store = ActivationStore.open(activations_dir(profile, entry, "eval"))
        tokens_NL = load_token_splits(tokens_dir(profile, entry)).eval_NL
        tok = AutoTokenizer.from_pretrained(resolve_hf_source(entry.name))
    if (store.n_contexts, store.context) != tokens_NL.shape:
        raise ValueError(f"eval activations hold {store.n_contexts} contexts of {store.context} "
                         f"tokens but the eval tokens are {tokens_NL.shape}: rerun capture")
    special = special_token_ids(tok)
    with timer("token_freq"):
        token_freq = token_frequencies(
            tokens_NL, lambda ids: tok.batch_decode([[i] for i in ids]), special)
    judge = make_judge(judge_cfg, token_freq=token_freq)
    codes = EncodedCodes(sae.encode, lambda: (np.array(a) for _, a in store.iter_contexts()),
                         context_len=store.context, width=int(sae.cfg.d_sae), device=profile.device)
    with timer("sinks"):
        sinks_NL = store.sink_mask_NL() if config.exclude_sinks else None
    with timer("autointerp"):
        res = run_autointerp(codes, tokens_NL, lambda t: tok.decode([t]), judge, config,
                             special_ids=special, bos_at_start=True, exclude_NL=sinks_NL)
    write_jsonl(out / INTERP_ROWS, res.to_jsonl_rows())
    return {**res.summary(), "eval_tokens": int(tokens_NL.size), "rows_file": INTERP_ROWS,
            "sink_positions": int(sinks_NL.sum()) if sinks_NL is not None else 0}, config.seed


#: AutoInterp μ(θ) of one SAE (protocol §3).
AUTOINTERP = BlockStage(InterpRecord, _record_settings, "train", train.done, _compute_autointerp)


def _compute_descriptive(ctx: Context) -> tuple[dict[str, Any], int]:
    """Dense fraction, absorption and probing from the model's shared inputs (protocol §3)."""
    profile, entry, out, timer = ctx.profile, ctx.entry, ctx.out, ctx.timer
    config = descriptive_settings(profile)
    with timer("load"):
        sae = load_sae(out / "sae", device=profile.device)
        try:
            inputs = load_inputs(descriptive_dir(profile, entry))
        except (FileNotFoundError, CorruptFileError) as e:
            raise FileNotFoundError(f"descriptive inputs of {entry.name} are missing or corrupt ({e}); "
                                    "rerun the capture stage (the grid does this by itself)") from e
        store = ActivationStore.open(activations_dir(profile, entry, "eval"))
    W_dec_FD = sae.W_dec.detach().float().cpu().numpy()

    def encode(x: torch.Tensor) -> torch.Tensor:
        return sae.encode(x.to(profile.device)).float().cpu()

    with timer("metrics"):
        summary, detail = run_descriptive_metrics(
            encode, W_dec_FD, inputs, (a for _, a in store.iter_contexts()), config,
            progress=ctx.progress)
    write_json(out / DESCRIPTIVE_ROWS, detail)
    return {**summary, "rows_file": DESCRIPTIVE_ROWS}, config.probing.seed


#: SAEBench's descriptive metrics of one SAE (the paper's Figs. 5–7).
DESCRIPTIVE = BlockStage(DescriptiveRecord,
                         lambda p: settings_record(descriptive=descriptive_settings(p)),
                         "train", train.done, _compute_descriptive)


def autointerp_done(profile: Profile, job: SAEJob) -> bool:
    """AutoInterp ran for this SAE as saved now, with the profile's interp/judge settings."""
    return AUTOINTERP.done(profile, job)


def descriptive_done(profile: Profile, job: SAEJob) -> bool:
    """The descriptive metrics were computed for the SAE as saved now with the current settings."""
    return DESCRIPTIVE.done(profile, job)


def done(profile: Profile, job: SAEJob) -> bool:
    """The stage (its notebook) is done: AutoInterp and the descriptive metrics are current."""
    return autointerp_done(profile, job) and descriptive_done(profile, job)


def run(profile: Profile | str, model: str, arch: str, level: int,
        progress: bool = True) -> InterpRecord:
    """(Or, when done, return the recorded) AutoInterp μ(θ) of one SAE (protocol §3)."""
    return AUTOINTERP.run(profile, model, arch, level, progress)


def run_descriptive(profile: Profile | str, model: str, arch: str, level: int,
                    progress: bool = True) -> DescriptiveRecord:
    """(Or, when done, return the recorded) descriptive metrics of one SAE (protocol §3)."""
    return DESCRIPTIVE.run(profile, model, arch, level, progress)


def rows(profile: Profile | str, model: str, arch: str, level: int) -> pd.DataFrame:
    """``autointerp.jsonl`` of one SAE: one row per scored latent."""
    *_, out = resolve_job(profile, model, arch, level)
    return pd.DataFrame(read_jsonl(out / INTERP_ROWS))


def explanations(profile: Profile | str, model: str, arch: str, level: int) -> dict[int, str]:
    """Each scored latent's explanation ({} when AutoInterp has not run for the SAE)."""
    *_, out = resolve_job(profile, model, arch, level)
    path = out / INTERP_ROWS
    return {int(r["latent"]): r["explanation"] for r in read_jsonl(path)} if path.exists() else {}


def descriptive_detail(profile: Profile | str, model: str, arch: str, level: int) -> dict[str, Any]:
    """``descriptive.json`` of one SAE: per-letter absorption and per-set probing."""
    *_, out = resolve_job(profile, model, arch, level)
    return read_json(out / DESCRIPTIVE_ROWS)
