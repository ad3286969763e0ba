"""The stages of the paper as functions of (profile, job): what each notebook calls.

Each stage reads its inputs from, and writes its outputs to, the run folder
(``runs/<profile>/<model>/L<layer>/…``, see README "Artefacts"), records provenance, and is a no-op
when its outputs already exist and verify (``is_done``), which is what makes the grid resumable.
Notebooks stay thin: a ``parameters`` cell, one call here, then tables and figures.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_lens.constants import SAE_WEIGHTS_FILENAME as SAE_WEIGHTS

from .profiles import ModelEntry, Profile, load_profile
from .results import Timer, provenance, read_json, write_json

RESULT = "result.json"
#: The zero-ablated run's CE and KL sums, shared by a model's SAEs (:func:`saelib.evals.core.lm_metrics`).
ZERO_ABLATION = "zero_ablation.json"


@dataclass(frozen=True)
class SAEJob:
    """One SAE of the grid: (model, architecture, sparsity level)."""

    model: str
    arch: str
    level: int

    @property
    def name(self) -> str:
        return f"{self.arch}-s{self.level}"


def as_profile(profile: Profile | str) -> Profile:
    return profile if isinstance(profile, Profile) else load_profile(profile)


def model_dir(profile: Profile, entry: ModelEntry) -> Path:
    from .models import model_slug

    return profile.run_root() / model_slug(entry.name) / f"L{entry.layer}"


def tokens_dir(profile: Profile, entry: ModelEntry) -> Path:
    return model_dir(profile, entry) / "tokens"


def activations_dir(profile: Profile, entry: ModelEntry, split: str) -> Path:
    return model_dir(profile, entry) / "activations" / split


def descriptive_dir(profile: Profile, entry: ModelEntry) -> Path:
    """The model's inputs of the descriptive metrics (absorption prompts, probing texts), shared
    by all its SAEs (:func:`saelib.evals.descriptive.capture_inputs`)."""
    return model_dir(profile, entry) / "descriptive"


def sae_dir(profile: Profile, job: SAEJob) -> Path:
    return model_dir(profile, profile.model(job.model)) / job.name


def sae_jobs(profile: Profile) -> list[SAEJob]:
    """Every SAE of the profile, in a stable order (model, level, architecture)."""
    return [SAEJob(m.name, arch, level) for m in profile.models
            for level in range(len(profile.grid.targets)) for arch in profile.grid.architectures]


def resolve_job(profile: Profile | str, model: str, arch: str, level: int
                ) -> tuple[Profile, ModelEntry, SAEJob, Path]:
    """The validated profile, model entry, job and SAE folder of one grid cell (every per-SAE
    stage starts here): an unknown model or a level outside the grid is a ``ProfileError``."""
    from .profiles import ProfileError

    profile = as_profile(profile)
    entry = profile.model(model)
    if not 0 <= level < len(profile.grid.targets):
        raise ProfileError(f"level {level} out of range 0..{len(profile.grid.targets) - 1}")
    job = SAEJob(entry.name, arch, level)
    return profile, entry, job, sae_dir(profile, job)


def settings_record(**configs: Any) -> dict[str, Any]:
    """Stage settings as they read back from JSON (tuples become lists), so a stored record and
    the profile's current settings compare equal exactly when nothing changed."""
    return json.loads(json.dumps({name: asdict(cfg) for name, cfg in configs.items()}))


def block_is_current(profile: Profile, job: SAEJob, block: str, settings: dict[str, Any],
                     rows_file: str) -> bool:
    """A later stage's ``result.json`` block was computed from the SAE as saved now
    (weights checksum) with ``settings``, and its rows file exists with the checksum the block
    recorded for it (a JSONL log cut at a line boundary still parses: only the checksum tells)."""
    out = sae_dir(profile, job)
    if not train_done(profile, job) or not (out / rows_file).exists():
        return False
    record = read_json(out / RESULT).get(block)
    if not (bool(record) and record.get("sae_sha256") == _sae_weights_sha(profile, job)
            and record.get("settings") == settings):
        return False
    from .results import files_match

    return files_match(out, record.get("files_sha256") or {}, out / RESULT,
                       "its stage will be recomputed")


def finish_block(profile: Profile, job: SAEJob, block: str, record: dict[str, Any],
                 settings: dict[str, Any], seed: int, timings: dict[str, float]) -> dict[str, Any]:
    """Complete a later stage's record (weights checksum, its rows/scores files' checksums,
    settings, seconds, provenance) and write it as ``block`` of the SAE's ``result.json``, keeping
    every other key; return it."""
    from .results import sha256_file

    out = sae_dir(profile, job)
    files = [record[k] for k in ("rows_file", "scores_file") if record.get(k)]
    record = {**record, "sae_sha256": _sae_weights_sha(profile, job), "settings": settings,
              "files_sha256": {name: sha256_file(out / name) for name in files},
              "seconds": sum(timings.values()),
              "provenance": provenance(None, seed, timings, profile=profile.name,
                                       peak_rss_mb=peak_rss_mb())}
    write_json(out / RESULT, {**read_json(out / RESULT), block: record})
    return record


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# Stage 0: prepare (model files and token arrays)


def prepare(profile: Profile | str, progress: bool = True) -> dict[str, Any]:
    """Dequantise packaged models into the cache and tokenise the corpus for every model."""
    from .data.corpus import build_token_splits
    from transformers import AutoTokenizer

    from .models import PACKAGED, prepare_packaged, resolve_hf_source

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


# ---------------------------------------------------------------------------------------------
# Stage 1: capture


def capture_done(profile: Profile, entry: ModelEntry) -> bool:
    """Complete shards for both splits, captured from the current token arrays (a re-tokenised
    corpus, e.g. after the profile's sizes changed, makes the capture stale), and the descriptive
    metrics' inputs for the profile's current settings."""
    from .activations import ActivationError, ActivationStore, array_sha
    from .data.corpus import load_token_splits
    from .evals.descriptive import inputs_current
    from .results import CorruptFileError

    if not inputs_current(descriptive_dir(profile, entry), descriptive_settings(profile), entry.layer):
        return False
    try:
        splits = load_token_splits(tokens_dir(profile, entry))
    except (OSError, KeyError, ValueError, RuntimeError):
        return False
    for split, arr in (("train", splits.train_NL), ("eval", splits.eval_NL)):
        m = activations_dir(profile, entry, split) / "manifest.json"
        if not m.exists():
            return False
        manifest = read_json(m)
        if not manifest.get("complete") or manifest.get("tokens_sha256") != array_sha(arr):
            return False
        try:  # every shard against its checksum: a corrupt one is recaptured, never trained on
            ActivationStore.open(activations_dir(profile, entry, split), verify=True)
        except (ActivationError, CorruptFileError) as e:
            print(f"warning: {e}; the capture stage will recompute it", file=sys.stderr)
            return False
    return True


def run_capture(profile: Profile | str, model: str, progress: bool = True,
                threads: int | None = None) -> dict[str, Any]:
    """Capture train and eval residual activations for one model (protocol §2: one pass per
    model/layer, shared by all its SAEs), and the inputs of its SAEs' descriptive metrics.
    Resumes an interrupted capture.

    ``threads``: torch threads for this call (restored after). The grid passes all its cores
    here: a model's capture is the root of its part of the DAG, so it usually runs alone while
    the kernel's share of the cores (``grid.share_cores``) would leave the others idle."""
    with torch_threads(threads):
        return _capture(profile, model, progress)


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to ``threads`` inside the block and restored after (None or
    0: unchanged)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _capture(profile: Profile | str, model: str, progress: bool) -> dict[str, Any]:
    """:func:`run_capture`'s work, on the threads it set."""
    import torch

    from .activations import capture, residual_at
    from .evals.descriptive import capture_inputs, inputs_current
    from .data.corpus import load_token_splits
    from .models import load_model

    profile = as_profile(profile)
    entry = profile.model(model)
    timer = Timer()
    with timer("load_model"):
        lm = load_model(entry.name, device=profile.device)
    if entry.layer >= lm.n_layers:
        from .profiles import ProfileError

        raise ProfileError(f"model {entry.name!r} has {lm.n_layers} layers; layer {entry.layer} is out of range")
    splits = load_token_splits(tokens_dir(profile, entry))
    summary = {}
    for split, arr in (("train", splits.train_NL), ("eval", splits.eval_NL)):
        with timer(f"capture_{split}"):
            man = capture(lm.tl, arr, entry.layer, activations_dir(profile, entry, split),
                          batch_size=profile.capture.batch_size,
                          shard_tokens=profile.capture.shard_tokens,
                          meta={"model": entry.name, "split": split}, progress=progress)
        summary[split] = {"contexts": man["n_contexts"], "shards": len(man["shards"])}
    desc_cfg = descriptive_settings(profile)
    if not inputs_current(descriptive_dir(profile, entry), desc_cfg, entry.layer):
        with timer("descriptive_inputs"):
            capture_inputs(lambda toks: residual_at(lm.tl, toks.to(profile.device), entry.layer),
                           lm.tokenizer, entry.layer, desc_cfg, descriptive_dir(profile, entry),
                           progress=progress)
    n_tok = sum(a.size for a in (splits.train_NL, splits.eval_NL))
    record = {"model": entry.name, "layer": entry.layer, "splits": summary,
              "threads": torch.get_num_threads(),
              "tokens_per_s": n_tok / max(1e-9, timer.timings["capture_train"] + timer.timings["capture_eval"]),
              "load_seconds": lm.load_seconds,
              "provenance": provenance(asdict(profile.corpus), profile.seed, timer.timings,
                                       profile=profile.name)}
    write_json(model_dir(profile, entry) / "capture.json", record)
    return record


# ---------------------------------------------------------------------------------------------
# Stage 2: train one SAE


def read_result(path: Path) -> dict[str, Any] | None:
    """An SAE's ``result.json``, or None when it is missing or unreadable (truncated, corrupt):
    then every stage of that SAE counts as not done and is recomputed, and the file is named on
    stderr so the user sees why."""
    from .results import CorruptFileError

    if not path.exists():
        return None
    try:
        record = read_json(path)
    except CorruptFileError as e:
        print(f"warning: {e}; its SAE's stages will be recomputed", file=sys.stderr)
        return None
    return record if isinstance(record, dict) else None


def train_done(profile: Profile, job: SAEJob) -> bool:
    """The SAE is saved with its training record, and its sparsity knob was chosen the way the
    profile now asks (an SAE trained uncalibrated before calibration was switched on, or before
    JumpReLU was calibrated, is trained again)."""
    path = sae_dir(profile, job) / RESULT
    if not (sae_dir(profile, job) / "sae").is_dir():
        return False
    record = read_result(path)
    if record is None or "train" not in record:
        return False
    method = (record.get("sparsity_method") or {}).get("method")
    if method != _sparsity_method(profile, job):
        return False
    if not _trained_as_profile_asks(profile, record):
        return False
    saved = record["train"].get("sae_sha256")
    weights = sae_dir(profile, job) / "sae" / SAE_WEIGHTS
    if not weights.exists() or (saved is not None and _sae_weights_sha(profile, job) != saved):
        print(f"warning: {weights} is missing or differs from the checksum in {path}; "
              "the SAE will be trained again", file=sys.stderr)
        return False
    return True


def _trained_as_profile_asks(profile: Profile, record: dict[str, Any]) -> bool:
    """The SAE's recorded training settings are the ones the profile and this version ask for
    (e.g. an SAE trained before JumpReLU's training changed is trained again)."""
    from .profiles import section_config
    from .sae.train import TrainConfig, trajectory_settings

    saved = ((record.get("provenance") or {}).get("config") or {}).get("training")
    if saved is None:
        return False
    now = section_config(TrainConfig, profile, "training", progress=False, device=profile.device)
    return trajectory_settings(saved) == json.loads(json.dumps(trajectory_settings(now)))


def _sparsity_method(profile: Profile, job: SAEJob) -> str:
    """How this SAE's knob is chosen under the profile's settings: the one decision that
    :func:`sparsity_value` acts on and :func:`train_done` checks a saved SAE against."""
    from .sae.registry import get_arch

    knob = get_arch(job.arch).sparsity_knob
    if knob == "k":
        return "k"
    if profile.grid.calibrate:
        return "calibrated"
    return "profile l1 (uncalibrated)" if knob == "l1" else knob


def sparsity_value(profile: Profile, job: SAEJob, make_batches=None, d_in: int | None = None,
                   train_cfg=None, heldout=None, train_tokens: int | None = None,
                   mean_D=None) -> tuple[float, dict[str, Any], Any]:
    """The knob that targets this level's L0 (protocol §2): k for TopK/BatchTopK; for JumpReLU the
    L0 target handed to sae-lens, calibrated (sae-lens's target-L0 penalty lands well above its
    target here: 10.9 and 16.2 for targets 6 and 10 in the default profile); for ReLU/Gated a
    calibrated L1 coefficient. With ``grid.calibrate: false`` the profile's values are used as
    they are. The search starts at ``grid.calibration_start`` where the profile gives it (an
    earlier run's calibrated knobs: one probe each, the same SAEs), else from a calibrated
    neighbour or the profile's ``l1``.

    Calibration probes train on ``train_tokens``, the tokens the final SAE trains on (an L1 SAE's
    L0 keeps falling as it trains, so shorter probes would overshoot): the cache's token count
    after BOS positions are dropped, not the corpus's nominal ``train_tokens``, centred with the
    same ``mean_D``. Those probes train exactly as the final SAE does, so the third value is the
    best probe's :class:`~saelib.sae.train.TrainResult` when the search ran now (the caller keeps
    it rather than training the same SAE a second time: 18 of the default's 30 SAEs), else None."""
    from .sae.calibrate import CalibrationConfig, calibrate_sparsity
    from .sae.registry import get_arch

    spec = get_arch(job.arch)
    target = profile.grid.targets[job.level]
    method = _sparsity_method(profile, job)
    if method in ("k", "l0_target"):
        return float(target), {"method": method}, None
    start = (profile.grid.l1.get(job.arch) or profile.grid.l1.get(spec.name)
             if spec.sparsity_knob == "l1" else None)
    if method != "calibrated":
        if not start:
            from .profiles import ProfileError

            raise ProfileError(f"grid.l1.{job.arch} is needed when grid.calibrate is false")
        return float(start[job.level]), {"method": method}, None
    first = profile.grid.calibration_start.get(job.arch)
    entry = profile.model(job.model)
    store_tokens = train_tokens if train_tokens is not None else profile.corpus.train_tokens
    res = calibrate_sparsity(
        spec.name, float(target), model=entry.name, layer=entry.layer, d_in=d_in,
        d_sae=profile.grid.width, make_batches=make_batches, probe_tokens=store_tokens,
        cache_path=model_dir(profile, entry) / "calibration.json", train_cfg=train_cfg,
        calib_cfg=CalibrationConfig(initial_l1=float(start[job.level]) if start else 1.0,
                                    start=float(first[job.level]) if first else None),
        heldout_acts_ND=heldout, seed=profile.seed, mean_D=mean_D)
    return float(res.knob_value), {"method": "calibrated", "trace": res.to_json()}, res.trained


def run_train(profile: Profile | str, model: str, arch: str, level: int,
              progress: bool = True) -> dict[str, Any]:
    """(Or, when its outputs already exist, return the recorded result of) train one SAE of the grid from the shared activation cache; save it in sae-lens's format and
    write its ``result.json`` (protocol §2–3: realised L0, explained variance, MSE, dead fraction,
    CE-loss recovered, KL score, tokens, seconds, peak memory, disk size, provenance)."""
    from .activations import ActivationStore
    from .data.corpus import load_token_splits
    from .evals.core import CoreConfig, lm_metrics
    from .models import load_model
    from .profiles import section_config
    from .sae.io import save_sae
    from .sae.metrics import reconstruct, reconstruction_metrics
    from .sae.train import TrainConfig, train_sae

    profile, entry, job, out = resolve_job(profile, model, arch, level)
    if train_done(profile, job):
        return read_json(out / RESULT)
    timer = Timer()
    train_store = ActivationStore.open(activations_dir(profile, entry, "train"))
    eval_store = ActivationStore.open(activations_dir(profile, entry, "eval"))
    cfg = section_config(TrainConfig, profile, "training", progress=progress, device=profile.device)
    core_cfg = section_config(CoreConfig, profile, "core")
    heldout_ND = eval_store.sample(core_cfg.eval_tokens, seed=profile.seed)
    total = train_store.n_tokens(drop_bos=True) // cfg.batch_size * cfg.batch_size
    mean_D = train_store.mean()
    make_batches = lambda: train_store.iter_batches(cfg.batch_size, seed=profile.seed,  # noqa: E731
                                                     max_tokens=total)
    with timer("calibrate"):
        value, how, res = sparsity_value(profile, job, make_batches, train_store.d_model, cfg,
                                         heldout_ND, train_tokens=total, mean_D=mean_D)
    metadata = {"model_name": entry.name, "hook_name": f"blocks.{entry.layer}.hook_resid_post",
                "hook_layer": entry.layer, "context_size": profile.corpus.context}
    with timer("train"):
        if res is None:
            res = train_sae(arch, train_store.d_model, profile.grid.width, value, make_batches(),
                            total, cfg, checkpoint_dir=out / "checkpoints", mean_D=mean_D,
                            seed=profile.seed, metadata=metadata)
        else:  # the calibration's best probe is this SAE, trained on the same data and seed
            for key, item in metadata.items():  # as train_sae sets them (SAEMetadata)
                res.sae.cfg.metadata[key] = item
            how["final_from_probe"] = True
    save_sae(res.sae, out / "sae")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    with timer("heldout_metrics"):
        rec = reconstruction_metrics(res.sae, heldout_ND)
    with timer("lm_metrics"):
        lm = load_model(entry.name, device=profile.device)
        tokens = load_token_splits(tokens_dir(profile, entry)).eval_NL
        n_ctx = min(core_cfg.lm_contexts, len(tokens))
        acts = np.concatenate([a for _, a in eval_store.iter_contexts(n_ctx)][:1])[:n_ctx]
        lmm = lm_metrics(lm.tl, lambda x: reconstruct(res.sae, x), acts, tokens[:n_ctx], entry.layer,
                         zero_cache=model_dir(profile, entry) / ZERO_ABLATION)
    disk = sum(p.stat().st_size for p in (out / "sae").rglob("*") if p.is_file())
    record = {
        "model": entry.name, "model_label": entry.display, "layer": entry.layer, "arch": arch,
        "level": level, "target_l0": profile.grid.targets[level], "width": profile.grid.width,
        "sparsity_value": value, "sparsity_method": how,
        "train": {**res.summary(), "disk_bytes": disk, "sae_sha256": _sae_weights_sha(profile, job)},
        "core": {"l0": rec.l0, "mse": rec.mse, "explained_variance": rec.explained_variance,
                 "dead_fraction": rec.dead_fraction, "n_tokens": rec.n_tokens,
                 **{k: getattr(lmm, k) for k in ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered",
                                                 "kl_sae", "kl_zero", "kl_score")},
                 "lm_tokens": lmm.n_tokens},
        "provenance": provenance({"grid": asdict(profile.grid), "training": asdict(cfg),
                                  "corpus": asdict(profile.corpus)}, profile.seed, timer.timings,
                                 profile=profile.name, peak_rss_mb=peak_rss_mb()),
    }
    write_json(out / RESULT, {**(read_result(out / RESULT) or {}), **record})
    return record


def load_results(profile: Profile | str) -> list[dict[str, Any]]:
    """Every SAE's ``result.json`` of a profile (the analysis reads only these)."""
    profile = as_profile(profile)
    rows = []
    for job in sae_jobs(profile):
        path = sae_dir(profile, job) / RESULT
        if path.exists():
            rows.append(read_json(path))
    return rows


# ---------------------------------------------------------------------------------------------
# Stage 3: interpretability μ(θ) of one SAE

INTERP_ROWS = "autointerp.jsonl"


def _sae_weights_sha(profile: Profile, job: SAEJob) -> str:
    """Checksum of the saved SAE's weights: ties an AutoInterp record to the SAE it scored, so a
    retrained SAE is never reported with the previous one's μ(θ)."""
    from .results import sha256_file

    return sha256_file(sae_dir(profile, job) / "sae" / SAE_WEIGHTS)


def interp_settings(profile: Profile) -> tuple[Any, Any]:
    """The profile's validated ``(AutoInterpConfig, JudgeConfig)`` (protocol §3)."""
    from .evals.autointerp import AutoInterpConfig
    from .judges.factory import JudgeConfig
    from .profiles import section_config

    return (section_config(AutoInterpConfig, profile, "interp"),
            section_config(JudgeConfig, profile, "judge"))


def interp_done(profile: Profile, job: SAEJob) -> bool:
    """AutoInterp has run for this SAE as it is saved now, with the profile's current
    ``interp``/``judge`` settings: ``result.json`` holds a matching ``interp`` block and
    ``autointerp.jsonl`` exists."""
    config, judge_cfg = interp_settings(profile)
    return block_is_current(profile, job, "interp", settings_record(interp=config, judge=judge_cfg),
                            INTERP_ROWS)


def special_token_ids(tokenizer) -> list[int]:
    """BOS/EOS/PAD ids of a tokenizer: never window centres (protocol §3)."""
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sorted({int(i) for i in ids if i is not None})


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


def run_interp(profile: Profile | str, model: str, arch: str, level: int,
               progress: bool = True) -> dict[str, Any]:
    """(Or, when done, return the recorded result of) AutoInterp μ(θ) for one SAE (protocol §3).

    The saved SAE encodes the EVAL split's cached activations chunk by chunk (the windows the
    judge sees are held-out text), the profile's judge explains and detects, and the stage writes
    ``autointerp.jsonl`` beside the SAE (one row per scored latent; steering reads each latent's
    explanation and max activation from it, protocol §4) and merges an ``interp`` block (μ, live
    latents, partial/reason, judge and its usage, timings, settings, provenance) into the SAE's
    ``result.json``, keeping every other key. Only the tokenizer is loaded, never the model.
    Reruns when the SAE's weights or the profile's interp/judge settings changed.
    ``progress`` is accepted for symmetry with the other stages (this stage prints nothing).
    """
    from transformers import AutoTokenizer

    from .activations import ActivationStore
    from .data.corpus import load_token_splits
    from .evals.autointerp import run_autointerp
    from .evals.windows import EncodedCodes
    from .judges.factory import make_judge
    from .models import resolve_hf_source
    from .results import write_jsonl
    from .sae.io import load_sae

    profile, entry, job, out = resolve_job(profile, model, arch, level)
    if interp_done(profile, job):
        return read_json(out / RESULT)["interp"]
    if not train_done(profile, job):
        raise FileNotFoundError(f"{out}: no trained SAE here; run the train stage for "
                                f"{entry.name} {arch} level {level} first")
    config, judge_cfg = interp_settings(profile)
    timer = Timer()
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
    with timer("autointerp"):
        res = run_autointerp(codes, tokens_NL, lambda t: tok.decode([t]), judge, config,
                             special_ids=special, bos_at_start=True)
    write_jsonl(out / INTERP_ROWS, res.to_jsonl_rows())
    record = {**res.summary(), "eval_tokens": int(tokens_NL.size), "rows_file": INTERP_ROWS}
    return finish_block(profile, job, "interp", record,
                        settings_record(interp=config, judge=judge_cfg), config.seed, timer.timings)


# ---------------------------------------------------------------------------------------------
# Stage 3b: SAEBench's descriptive metrics of one SAE (same notebook as AutoInterp)

DESCRIPTIVE_ROWS = "descriptive.json"


def descriptive_settings(profile: Profile) -> Any:
    """The profile's validated :class:`~saelib.evals.descriptive.DescriptiveConfig`."""
    from .evals.descriptive import DescriptiveConfig
    from .profiles import section_config

    return section_config(DescriptiveConfig, profile, "descriptive")


def descriptive_done(profile: Profile, job: SAEJob) -> bool:
    """The descriptive metrics were computed for the SAE as saved now with the current settings."""
    return block_is_current(profile, job, "descriptive",
                            settings_record(descriptive=descriptive_settings(profile)), DESCRIPTIVE_ROWS)


def run_descriptive(profile: Profile | str, model: str, arch: str, level: int,
                    progress: bool = True) -> dict[str, Any]:
    """(Or, when done, return the recorded result of) the descriptive metrics of one SAE
    (protocol §3; the paper's Figs. 5–7): dense fraction, first-letter absorption and k-sparse
    probing, from the model's inputs that the capture stage computed once. Writes the
    ``descriptive`` block of ``result.json`` and the per-letter / per-set detail beside it."""
    from .activations import ActivationStore
    from .evals.descriptive import load_inputs, run
    from .results import CorruptFileError
    from .sae.io import load_sae

    profile, entry, job, out = resolve_job(profile, model, arch, level)
    config = descriptive_settings(profile)
    if descriptive_done(profile, job):
        return read_json(out / RESULT)["descriptive"]
    if not train_done(profile, job):
        raise FileNotFoundError(f"{out}: no trained SAE here; run the train stage for "
                                f"{entry.name} {arch} level {level} first")
    timer = Timer()
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
        summary, detail = run(encode, W_dec_FD, inputs, (a for _, a in store.iter_contexts()),
                              config, progress=progress)
    write_json(out / DESCRIPTIVE_ROWS, detail)
    return finish_block(profile, job, "descriptive", {**summary, "rows_file": DESCRIPTIVE_ROWS},
                        settings_record(descriptive=config), config.probing.seed, timer.timings)


# ---------------------------------------------------------------------------------------------
# Stage 4: steering utility g(θ) of one SAE

JUDGE_CALIBRATION = "judge_calibration.json"
STEER_ROWS = "steering.jsonl"


def unsteered_dir(profile: Profile, entry: ModelEntry) -> Path:
    """Where the unsteered answers of ``entry``'s model are cached for all its SAEs
    (:func:`saelib.steering.run.unsteered_answers`)."""
    return model_dir(profile, entry) / "unsteered"


def model_judge_calibration(profile: Profile, entry: ModelEntry, lm, progress: bool = False):
    """The judge's calibration for ``entry``'s model (``judge_calibration.json`` beside its
    activations), made on first use and shared by every SAE of the model, in both the steering
    and the selection stage (:func:`saelib.steering.run.judge_calibration`)."""
    from .steering.run import judge_calibration

    config, judge_cfg = steer_settings(profile)
    return judge_calibration(lm, config, judge_cfg, model_dir(profile, entry) / JUDGE_CALIBRATION,
                             unsteered_cache=unsteered_dir(profile, entry), progress=progress)


def steer_settings(profile: Profile) -> tuple[Any, Any]:
    """The profile's validated ``(SteeringConfig, JudgeConfig)`` (protocol §4)."""
    from .judges.factory import JudgeConfig
    from .profiles import section_config
    from .steering.axbench import SteeringConfig

    return (section_config(SteeringConfig, profile, "steering"),
            section_config(JudgeConfig, profile, "judge"))


def steer_done(profile: Profile, job: SAEJob) -> bool:
    """Steering has run for this SAE as saved now, on its current AutoInterp concepts, with the
    profile's current steering/judge settings."""
    config, judge_cfg = steer_settings(profile)
    return interp_done(profile, job) and block_is_current(
        profile, job, "steering", settings_record(steering=config, judge=judge_cfg), STEER_ROWS)


def steering_concepts(rows: list[dict[str, Any]], concept100: list[int], n: int) -> list[dict[str, Any]]:
    """The first ``n`` CONCEPT100 latents (in CONCEPT100's seeded order) that have an explanation:
    each one's AutoInterp row (``latent``, ``explanation``, ``max_act``) is a concept (protocol §4)."""
    by_latent = {int(r["latent"]): r for r in rows}
    usable = [by_latent[f] for f in concept100
              if f in by_latent and by_latent[f].get("explanation") and by_latent[f]["max_act"] > 0]
    return usable[:n]


def run_steer(profile: Profile | str, model: str, arch: str, level: int,
              progress: bool = True) -> dict[str, Any]:
    """(Or, when done, return the recorded result of) the AxBench steering score g(θ) of one SAE
    (protocol §4).

    Concepts are the SAE's CONCEPT100 latents with their AutoInterp explanations; each gets
    ``n_instructions`` seeded instructions (first ``n_select`` select α, the rest are held out) and
    is steered at every factor in one batched, cached generation pass; the unsteered model answers
    the same instructions once (the offline judge calibrates on those answers). The profile's judge
    rates every generation; ``steering.jsonl`` holds each generation with its ratings, and the
    ``steering`` block of ``result.json`` holds g(θ), α* and the score per concept, costs and
    provenance.
    """
    from .models import load_model
    from .results import read_jsonl, write_jsonl
    from .sae.io import load_sae
    from .steering.axbench import steering_score
    from .steering.run import steer_concepts

    profile, entry, job, out = resolve_job(profile, model, arch, level)
    if steer_done(profile, job):
        return read_json(out / RESULT)["steering"]
    if not interp_done(profile, job):
        raise FileNotFoundError(f"{out}: no AutoInterp result for this SAE; run the interp stage "
                                f"for {entry.name} {arch} level {level} first")
    config, judge_cfg = steer_settings(profile)
    timer = Timer()
    interp = read_json(out / RESULT)["interp"]
    concepts = steering_concepts(read_jsonl(out / INTERP_ROWS), list(interp["concept100"]),
                                 config.n_concepts)
    partial, reason = False, None
    if not concepts:
        partial, reason = True, "no CONCEPT100 latent has an explanation: nothing to steer"
    elif len(concepts) < config.n_concepts:
        partial = True
        reason = (f"{len(concepts)} of the {config.n_concepts} requested concepts have an "
                  f"explanation (CONCEPT100 holds {len(interp['concept100'])})")
    with timer("load"):
        lm = load_model(entry.name, device=profile.device)
        sae = load_sae(out / "sae", device=profile.device)
    run = steer_concepts(lm, sae, entry.layer, concepts, config, judge_cfg, timer, progress,
                         unsteered_cache=unsteered_dir(profile, entry),
                         calibration=model_judge_calibration(profile, entry, lm, progress))
    write_jsonl(out / STEER_ROWS, run.rows)
    record = {"g": steering_score(run.scores), "partial": partial, "reason": reason,
              **run.summary(config.factors), "rows_file": STEER_ROWS}
    return finish_block(profile, job, "steering", record,
                        settings_record(steering=config, judge=judge_cfg), config.seed, timer.timings)


# ---------------------------------------------------------------------------------------------
# Stage 5: feature selection scores (ΔC_k and the output score) of one SAE

SELECT_SCORES = "selection_scores.json"
SELECT_ROWS = "selection_steering.jsonl"


def select_settings(profile: Profile) -> Any:
    """The profile's validated ``SelectionConfig`` (protocol §6)."""
    from .profiles import section_config
    from .selection.config import SelectionConfig

    return section_config(SelectionConfig, profile, "selection")


def _select_record_settings(profile: Profile) -> dict[str, Any]:
    """Selection settings, plus the steering and judge settings its tiers are evaluated with."""
    config = select_settings(profile)
    if not config.steer_tiers:
        return settings_record(selection=config)
    steer_cfg, judge_cfg = steer_settings(profile)
    return settings_record(selection=config, steering=steer_cfg, judge=judge_cfg)


def select_done(profile: Profile, job: SAEJob) -> bool:
    """ΔC_k and output scores (and, with ``steer_tiers``, the tiers' steering) exist for this SAE
    as saved now, with the current settings."""
    rows = SELECT_ROWS if select_settings(profile).steer_tiers else SELECT_SCORES
    return (block_is_current(profile, job, "selection", _select_record_settings(profile), rows)
            and (not select_settings(profile).steer_tiers or steer_done(profile, job)))


def run_select(profile: Profile | str, model: str, arch: str, level: int,
               progress: bool = True) -> dict[str, Any]:
    """(Or, when done, return the recorded result of) feature selection for one SAE (protocol §6).

    1. ΔC_k and Arad et al.'s output score for every feature: the prefix goes through the model
       once; each feature is amplified at the last position at the SAE's layer
       (``selection.variant``) and only that position is recomputed from the next block up
       (:func:`saelib.selection.amplify.amplified_logits_fast`). ``selection_scores.json`` holds
       ΔC_k, C_k and S_out per latent.
    2. With ``steer_tiers``: tiers over the candidate pool (scored latents with an explanation),
       ΔC_k in both directions and the output-score baseline of each tier's size; every feature of
       any tier is steered once with the steering stage's evaluator (``selection_steering.jsonl``),
       a tier's score is the mean of its features' held-out scores (its selection score, the mean
       of their selection-half scores at α*). The paper's pick (best held-out tier) and the honest
       pick (tier chosen on the selection half, reported held out) are both recorded with the
       output-score baseline of the same size and the lifts over g(θ) of the steering stage.
    """
    from .data.corpus import load_token_splits
    from .models import load_model
    from .sae.io import load_sae
    from .selection.amplify import amplified_logits_fast, describe, logit_lens_tokens, prefix_state
    from .selection.confidence import output_score, topk_confidence

    profile, entry, job, out = resolve_job(profile, model, arch, level)
    if select_done(profile, job):
        return read_json(out / RESULT)["selection"]
    config = select_settings(profile)
    needed, stage = (steer_done, "steer") if config.steer_tiers else (train_done, "train")
    if not needed(profile, job):
        raise FileNotFoundError(f"{out}: run the {stage} stage for {entry.name} {arch} level "
                                f"{level} first (selection {'steers tiers against its g' if config.steer_tiers else 'scores its features'})")
    timer = Timer()
    with timer("load"):
        lm = load_model(entry.name, device=profile.device)
        sae = load_sae(out / "sae", device=profile.device)
    captured_bos = load_token_splits(tokens_dir(profile, entry)).bos_id
    ids = config.prefix_ids(lm.tokenizer, captured_bos)
    W_dec_FD, b_dec_D = sae.W_dec.detach(), sae.b_dec.detach()
    n_feat = W_dec_FD.shape[0]
    with timer("delta_conf"):
        state = prefix_state(lm.tl, sae.encode, ids, entry.layer)
        c_base = float(topk_confidence(state.base_logits_V, config.k))
        c_int, s_out = [], []
        for s in range(0, n_feat, config.batch_size):  # never all F × V logits at once
            feats = list(range(s, min(n_feat, s + config.batch_size)))
            logits_BV = amplified_logits_fast(lm.tl, state, W_dec_FD, b_dec_D, feats, config.alpha,
                                              config.variant, batch_size=config.batch_size)
            c_int.append(topk_confidence(logits_BV, config.k))
            lens = logit_lens_tokens(lm.tl, W_dec_FD[feats], config.lens_top, config.batch_size)
            s_out.append(output_score(logits_BV, lens))
    c_int_F = _to_numpy(c_int)
    delta_F = c_int_F - c_base
    s_out_F = _to_numpy(s_out)
    if not (np.isfinite(delta_F).all() and np.isfinite(s_out_F).all()):
        raise FloatingPointError(f"{out}: non-finite ΔC_k or output score (the amplified forward "
                                 f"overflowed); lower selection.alpha")
    write_json(out / SELECT_SCORES, {"latent": list(range(n_feat)), "delta_conf": delta_F.tolist(),
                                     "c_k": c_int_F.tolist(), "output_score": s_out_F.tolist()})
    record = {"c_k_base": c_base, "n_features": n_feat,
              "delta_conf": {"mean": float(delta_F.mean()), "std": float(delta_F.std()),
                             "min": float(delta_F.min()), "max": float(delta_F.max())},
              "output_score": {"mean": float(s_out_F.mean()), "max": float(s_out_F.max())},
              "variant": describe(config.variant), "prefix_tokens": len(ids),
              "scores_file": SELECT_SCORES}
    if config.steer_tiers:
        record.update(_steer_tiers(profile, entry, job, lm, sae, delta_F, s_out_F, config, timer,
                                   progress))
    return finish_block(profile, job, "selection", record, _select_record_settings(profile),
                        profile.seed, timer.timings)


def _steer_tiers(profile: Profile, entry: ModelEntry, job: SAEJob, lm, sae, delta_F: np.ndarray,
                 s_out_F: np.ndarray, config, timer: Timer, progress: bool) -> dict[str, Any]:
    """Step 2 of :func:`run_select`: build the tiers, steer their features, pick tiers, lifts."""
    from .results import read_jsonl, write_jsonl
    from .selection.tiers import (build_tiers, output_score_baselines, pick_best_tier,
                                  pick_tier_honest, tier_score)
    from .steering.run import steer_concepts

    out = sae_dir(profile, job)
    steer_cfg, judge_cfg = steer_settings(profile)
    pool = [r for r in read_jsonl(out / INTERP_ROWS)
            if r.get("explanation") and r["max_act"] > 0 and r.get("score") is not None]
    if not pool:
        return {"tiers": [], "reason": "no scored latent with an explanation: no candidate pool"}
    ids = [int(r["latent"]) for r in pool]
    tiers = build_tiers(delta_F[ids], ids, top_ks=config.top_ks, quantiles=config.quantiles)
    baselines = output_score_baselines(tiers, s_out_F[ids], ids)
    by_latent = {int(r["latent"]): r for r in pool}
    union = list(dict.fromkeys(f for t in (*tiers, *baselines.values()) for f in t.feature_ids))
    concepts = [{k: by_latent[f][k] for k in ("latent", "explanation", "max_act")} for f in union]
    run = steer_concepts(lm, sae, entry.layer, concepts, steer_cfg, judge_cfg, timer, progress,
                         unsteered_cache=unsteered_dir(profile, entry),
                         calibration=model_judge_calibration(profile, entry, lm, progress))
    write_jsonl(out / SELECT_ROWS, run.rows)
    held = {s.latent: s.score for s in run.scores}
    sel = {s.latent: s.select_hm[s.alpha_star] for s in run.scores}
    all_tiers = {t.name: t for t in (*tiers, *baselines.values())}
    table = [{"name": t.name, "kind": t.kind, "direction": t.direction, "size": t.size,
              "features": list(t.feature_ids), "heldout": tier_score(t, held),
              "selection": tier_score(t, sel)} for t in all_tiers.values()]
    dc_held = {t.name: tier_score(t, held) for t in tiers}
    dc_sel = {t.name: tier_score(t, sel) for t in tiers}
    paper = pick_best_tier(dc_held)
    honest = pick_tier_honest(dc_sel, dc_held)
    g_base = read_json(out / RESULT)["steering"]["g"]

    def lift(g: float) -> float | None:
        return (g - g_base) / g_base * 100.0 if g_base else None

    g_out = tier_score(baselines[paper.name], held)
    g_out_honest = tier_score(baselines[honest.name], held)
    return {"g_base": g_base, "n_pool": len(pool), "n_steered": len(union), "tiers": table,
            "paper": {"tier": paper.name, "g_delta_conf": paper.score, "g_output_score": g_out,
                      "lift_pct": lift(paper.score), "lift_output_score_pct": lift(g_out)},
            "honest": {"tier": honest.name, "selection_score": honest.selection_score,
                       "g_delta_conf": honest.heldout_score, "g_output_score": g_out_honest,
                       "lift_pct": lift(honest.heldout_score),
                       "lift_output_score_pct": lift(g_out_honest),
                       "optimism": honest.optimism},
            "steering": {k: v for k, v in run.summary(steer_cfg.factors).items() if k != "concepts"},
            "rows_file": SELECT_ROWS}


def _to_numpy(chunks: list[Any]) -> np.ndarray:
    """Concatenate 1-D torch chunks into one float64 numpy array."""
    return np.concatenate([c.detach().cpu().double().numpy() for c in chunks]) if chunks else np.zeros(0)


# ---------------------------------------------------------------------------------------------
# Analysis: the profile's judge against a second back-end on the same steered generations

JUDGE_AGREEMENT = "judge_agreement.json"


def run_judge_agreement(profile: Profile | str, progress: bool = False) -> dict[str, Any] | None:
    """(Or, when current, return the recorded) agreement between the profile's judge and the
    ``judge_agreement`` section's back-end on a seeded sample of steered generations (protocol §4).

    The first judge's ratings are the ones already in every SAE's ``steering.jsonl``; the second
    rates the same (concept, instruction, output) items. The record holds the per-kind agreement
    (exact match, Kendall τ_b), the second judge's unparsable answers, every item with both
    ratings, the cost and provenance, in ``runs/<profile>/judge_agreement.json``. Returns None when
    ``n_items`` is 0 or no SAE has steering rows yet.
    """
    from dataclasses import replace

    from .judges.agreement import JudgeAgreementConfig, judge_agreement, sample_items
    from .judges.base import RatingItem, Ratings
    from .judges.factory import make_judge
    from .models import resolve_hf_source
    from .profiles import section_config
    from .results import provenance, read_jsonl, write_json

    profile = as_profile(profile)
    cfg = section_config(JudgeAgreementConfig, profile, "judge_agreement")
    _, judge_cfg = steer_settings(profile)
    if cfg.n_items == 0:
        return None
    rows = []
    for job in sae_jobs(profile):
        path = sae_dir(profile, job) / STEER_ROWS
        if path.exists():
            rows += [{**r, "sae": f"{job.model}/{job.name}"} for r in read_jsonl(path)]
    if not rows:
        return None
    items = sample_items(rows, cfg.n_items, cfg.seed)
    keys = [[r["sae"], r["latent"], r["instruction_index"], r["alpha"]] for r in items]
    settings = settings_record(judge_agreement=cfg, judge=judge_cfg)
    out = profile.run_root() / JUDGE_AGREEMENT
    if out.exists():
        old = read_json(out)
        if old.get("settings") == settings and old.get("keys") == json.loads(json.dumps(keys)):
            return old
    second_cfg = replace(judge_cfg, backend=cfg.backend, max_tokens_rating=cfg.max_tokens,
                         local_model=resolve_hf_source(cfg.local_model) if cfg.backend == "local"
                         else judge_cfg.local_model)
    t0 = time.perf_counter()
    second = make_judge(second_cfg)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    theirs = second.rate([RatingItem(r["concept"], r["instruction"], r["output"]) for r in items])
    rate_s = time.perf_counter() - t1
    ours = [Ratings(r["concept_rating"], r["instruction_rating"], r["fluency_rating"]) for r in items]
    name_a = judge_cfg.backend
    name_b = f"{cfg.backend} ({cfg.local_model})" if cfg.backend == "local" else f"{cfg.backend} ({judge_cfg.model})"
    report = judge_agreement(ours, theirs, name_a, name_b)
    usage = asdict(second.usage)
    record = {**report.to_dict(), "n_items": len(items), "n_pool": len(rows),
              "unparsable_ratings": usage.get("extra", {}).get("unparsable_ratings"),
              "ratings_requested": 3 * len(items), "judge_usage": usage,
              "items": [{"sae": r["sae"], "latent": r["latent"], "alpha": r["alpha"],
                         "concept": r["concept"], "output": r["output"],
                         name_a: [a.concept, a.instruction, a.fluency],
                         name_b: [b.concept, b.instruction, b.fluency]}
                        for r, a, b in zip(items, ours, theirs)],
              "keys": keys, "settings": settings, "seconds": load_s + rate_s,
              "items_per_s": len(items) / max(rate_s, 1e-9),
              "provenance": provenance(settings, cfg.seed, {"load": load_s, "rate": rate_s},
                                       profile=profile.name)}
    write_json(out, record)
    return record
