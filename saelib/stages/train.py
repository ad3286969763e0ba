"""Stage ``train`` (protocol §2–3): one SAE of the grid, from the model's activation cache.

Its sparsity knob is chosen (k, or a calibrated L1 coefficient / JumpReLU L0 target), the SAE is
trained with sae-lens's training classes (``saelib.sae.train``) and saved in sae-lens's format,
and its core metrics are measured on held-out activations and through the language model.
Notebook ``train.ipynb``; record: the top-level keys of the SAE's ``result.json``
(:class:`TrainRecord`; the later stages add their blocks beside them).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from sae_lens import SAE

from ..activations import ActivationStore
from ..data.corpus import load_token_splits
from ..evals.core import CoreConfig, lm_metrics
from ..profiles import Profile, ProfileError
from ..results import Timer, peak_rss_mb, provenance, write_json
from ..sae.calibrate import CalibrationConfig, calibrate_sparsity, first_knob
from ..sae.io import save_sae
from ..sae.metrics import reconstruct, reconstruction_metrics
from ..sae.registry import get_arch
from ..sae.train import TrainConfig, train_sae, trajectory_settings
from .layout import (RESULT, SAE_WEIGHTS, ZERO_ABLATION, SAEJob, activations_dir,
                     model_dir, resolve_job, sae_dir, tokens_dir)
from .records import FIRST_SCHEMA, Record, read_result, sae_weights_sha
from .runner import stage_model

NAME = "train"


@dataclass(frozen=True)
class TrainRecord(Record):
    """The train stage's keys at the top of ``result.json``: the grid cell, the knob and how it
    was chosen, the training summary (``train``) and the core metrics (``core``)."""

    model: str
    model_label: str
    layer: int
    arch: str
    level: int
    target_l0: int
    width: int
    sparsity_value: float
    sparsity_method: dict[str, Any]
    train: dict[str, Any]
    core: dict[str, Any]
    provenance: dict[str, Any]

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> "TrainRecord":
        """The train record among ``result.json``'s keys (the later stages' blocks are left out)."""
        names = set(cls.__dataclass_fields__) | {"schema"}
        return cls.from_json({k: v for k, v in result.items() if k in names})


def settings(profile: Profile, progress: bool = False) -> TrainConfig:
    """The profile's training settings on its device (``progress`` only shows a bar)."""
    return replace(profile.section("training"), progress=progress, device=profile.device)


def done(profile: Profile, job: SAEJob) -> bool:
    """The SAE is saved with its training record, and its sparsity knob was chosen and it was
    trained the way the profile and this version ask (e.g. an SAE trained uncalibrated before
    calibration was switched on, or before JumpReLU's training changed, is trained again)."""
    path = sae_dir(profile, job) / RESULT
    if not (sae_dir(profile, job) / "sae").is_dir():
        return False
    result = read_result(path)
    if result is None or "train" not in result:
        return False
    if result.get("schema", FIRST_SCHEMA) != TrainRecord.SCHEMA:
        return False
    # Only the keys this check needs are read: a done check must not fail on a record that a
    # later version extends (the full record is typed where it is read, :func:`read`).
    if (result.get("sparsity_method") or {}).get("method") != sparsity_method(profile, job):
        return False
    saved_settings = ((result.get("provenance") or {}).get("config") or {}).get("training")
    if not trained_as_profile_asks(profile, saved_settings):
        return False
    saved = result["train"].get("sae_sha256")
    weights = sae_dir(profile, job) / "sae" / SAE_WEIGHTS
    if not weights.exists() or (saved is not None and sae_weights_sha(profile, job) != saved):
        print(f"warning: {weights} is missing or differs from the checksum in {path}; "
              "the SAE will be trained again", file=sys.stderr)
        return False
    return True


def trained_as_profile_asks(profile: Profile, saved: dict[str, Any] | None) -> bool:
    """The SAE's recorded training settings (``saved``) are the ones the profile and this version
    ask for."""
    if saved is None:
        return False
    return trajectory_settings(saved) == json.loads(json.dumps(trajectory_settings(settings(profile))))


def sparsity_method(profile: Profile, job: SAEJob) -> str:
    """How this SAE's knob is chosen under the profile's settings: the one decision that
    :func:`sparsity_value` acts on and :func:`done` checks a saved SAE against."""
    knob = get_arch(job.arch).sparsity_knob
    if knob == "k":
        return "k"
    if profile.grid.calibrate and profile.grid.calibrate_by == "controller":
        return "controlled" if knob == "l1" else "penalty"
    if profile.grid.calibrate:
        return "calibrated"
    return "profile l1 (uncalibrated)" if knob == "l1" else knob


def sparsity_value(profile: Profile, job: SAEJob, make_batches=None, d_in: int | None = None,
                   train_cfg=None, heldout=None, train_tokens: int | None = None,
                   mean_D=None) -> tuple[float, dict[str, Any], Any]:
    """The knob that targets this level's L0 (protocol §2): k for TopK/BatchTopK; for JumpReLU the
    L0 target handed to sae-lens, calibrated (sae-lens's target-L0 penalty lands well above its
    target here: 10.9 and 16.2 for targets 6 and 10 in the default profile; under
    ``grid.calibrate_by: controller`` the target itself, ``penalty``); for ReLU/Gated a
    calibrated L1 coefficient (under the controller, where λ starts). With
    ``grid.calibrate: false`` the profile's values are used as they are. The search starts at
    ``grid.calibration_start`` where the profile gives it (an earlier run's calibrated knobs: one
    probe each, the same SAEs), else from a calibrated neighbour or the profile's ``l1``.

    Calibration probes train on ``train_tokens``, the tokens the final SAE trains on (an L1 SAE's
    L0 keeps falling as it trains, so shorter probes would overshoot): the cache's token count
    after BOS positions are dropped, not the corpus's nominal ``train_tokens``, centred with the
    same ``mean_D``. Those probes train exactly as the final SAE does, so the third value is the
    best probe's :class:`~saelib.sae.train.TrainResult` when the search ran now (the caller keeps
    it rather than training the same SAE a second time: 18 of the default's 30 SAEs), else None."""
    spec = get_arch(job.arch)
    target = profile.grid.targets[job.level]
    method = sparsity_method(profile, job)
    if method in ("k", "l0_target", "penalty"):
        return float(target), {"method": method}, None
    if method == "controlled":  # where λ starts; the training moves it (controlled_trace)
        search = search_start(profile, job)
        return first_knob(spec.sparsity_knob, float(target), search), {"method": method}, None
    if method != "calibrated":
        start = _profile_l1(profile, job)
        if not start:
            raise ProfileError(f"grid.l1.{job.arch} is needed when grid.calibrate is false")
        return float(start[job.level]), {"method": method}, None
    entry = profile.model(job.model)
    store_tokens = train_tokens if train_tokens is not None else profile.corpus.train_tokens
    res = calibrate_sparsity(
        spec.name, float(target), model=entry.name, layer=entry.layer, d_in=d_in,
        d_sae=profile.grid.width, make_batches=make_batches, probe_tokens=store_tokens,
        cache_path=model_dir(profile, entry) / "calibration.json", train_cfg=train_cfg,
        calib_cfg=search_start(profile, job),
        heldout_acts_ND=heldout, seed=profile.seed, mean_D=mean_D)
    return float(res.knob_value), {"method": "calibrated", "trace": res.to_json()}, res.trained


#: The methods that train an SAE once and leave its L0 to the training itself: the L0 controller
#: moving λ (ReLU, Gated), and JumpReLU's target-L0 penalty at the target (``penalty``: the
#: quadratic penalty pulls L0 to its target once the thresholds have room to travel; module doc
#: of :mod:`saelib.sae.controller`). Their records carry :func:`controlled_trace`.
SELF_TARGETING = ("controlled", "penalty")


def controlled_trace(profile: Profile, job: SAEJob, knob: float, realised_l0: float,
                     explained_variance: float, l0_control: dict[str, Any] | None
                     ) -> dict[str, Any]:
    """What the record says of an SAE trained once toward its target (:data:`SELF_TARGETING`),
    in a search trace's terms: the knob it ended at, its realised L0 on held-out activations and
    whether that is within the ±25 % band, with the controller's start knob and last batch-L0
    average (:mod:`saelib.sae.controller`; None for JumpReLU's penalty)."""
    band = CalibrationConfig().band(float(profile.grid.targets[job.level]))
    return {"knob_name": get_arch(job.arch).sparsity_knob, "knob_value": float(knob),
            "realised_l0": float(realised_l0), "within_band": band[0] <= realised_l0 <= band[1],
            "band": list(band), "explained_variance": float(explained_variance),
            "l0_control": l0_control}


def _profile_l1(profile: Profile, job: SAEJob) -> list[float] | None:
    """The profile's ``grid.l1`` list for a ReLU / Gated cell (by grid or registry name)."""
    if get_arch(job.arch).sparsity_knob != "l1":
        return None
    return profile.grid.l1.get(job.arch) or profile.grid.l1.get(get_arch(job.arch).name)


def search_start(profile: Profile, job: SAEJob) -> CalibrationConfig:
    """Where a calibrated cell's knob search starts, in both training modes: the cell's
    ``calibration_start``, its model's else the grid's (:meth:`Profile.calibration_start`: an
    earlier run's calibrated knob, one probe when still in band), else the profile's ``grid.l1``
    for ReLU / Gated as the first λ; the cached mode's search may instead start from a calibrated
    neighbour (:func:`saelib.sae.calibrate.first_knob` and the calibration cache)."""
    l1 = _profile_l1(profile, job)
    return CalibrationConfig(initial_l1=float(l1[job.level]) if l1 else 1.0,
                             start=profile.calibration_start_knob(job.model, job.arch, job.level)
                             ).validate()


def read(profile: Profile, job: SAEJob) -> TrainRecord:
    return TrainRecord.from_result(read_result(sae_dir(profile, job) / RESULT) or {})


def run(profile: Profile | str, model: str, arch: str, level: int,
        progress: bool = True) -> TrainRecord:
    """(Or, when its outputs already exist, return the recorded result of) train one SAE of the
    grid from the shared activation cache; save it in sae-lens's format and write its
    ``result.json`` (protocol §2–3: realised L0, explained variance, MSE, dead fraction, CE-loss
    recovered, KL score, tokens, seconds, peak memory, disk size, provenance)."""
    profile, entry, job, out = resolve_job(profile, model, arch, level)
    if done(profile, job):
        return read(profile, job)
    timer = Timer()
    eval_store = ActivationStore.open(activations_dir(profile, entry, "eval"))
    cfg = settings(profile, progress=progress)
    core_cfg: CoreConfig = profile.section("core")
    heldout_ND = eval_store.sample(core_cfg.eval_tokens, seed=profile.seed)
    if cfg.mode == "streaming":
        value, how, sae, summary = _streamed(profile, job, timer)
    else:
        value, how, sae, summary = _train_cached(profile, job, cfg, heldout_ND, timer)
    with timer("heldout_metrics"):
        rec = reconstruction_metrics(sae, heldout_ND)
    if how["method"] in SELF_TARGETING:  # both modes: the held-out L0 measured just now
        how["trace"] = controlled_trace(profile, job, value, rec.l0, rec.explained_variance,
                                        summary.get("l0_control"))
    with timer("lm_metrics"):
        lm = stage_model(entry, profile.device)
        tokens = load_token_splits(tokens_dir(profile, entry)).eval_NL
        n_ctx = min(core_cfg.lm_contexts, len(tokens))
        acts = np.concatenate([a for _, a in eval_store.iter_contexts(n_ctx)][:1])[:n_ctx]
        lmm = lm_metrics(lm.tl, lambda x: reconstruct(sae, x), acts, tokens[:n_ctx], entry.layer,
                         zero_cache=model_dir(profile, entry) / ZERO_ABLATION)
    disk = sum(p.stat().st_size for p in (out / "sae").rglob("*") if p.is_file())
    record = TrainRecord(
        model=entry.name, model_label=entry.display, layer=entry.layer, arch=arch, level=level,
        target_l0=profile.grid.targets[level], width=profile.grid.width, sparsity_value=value,
        sparsity_method=how,
        train={**summary, "disk_bytes": disk, "sae_sha256": sae_weights_sha(profile, job)},
        core={"l0": rec.l0, "mse": rec.mse, "explained_variance": rec.explained_variance,
              "dead_fraction": rec.dead_fraction, "n_tokens": rec.n_tokens,
              "explained_variance_excl_sinks": rec.explained_variance_excl_sinks,
              "n_sinks": rec.n_sinks, "sink_variance_share": rec.sink_variance_share,
              **{k: getattr(lmm, k) for k in ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered",
                                              "kl_sae", "kl_zero", "kl_score")},
              "lm_tokens": lmm.n_tokens},
        provenance=provenance({"grid": asdict(profile.grid), "training": asdict(cfg),
                               "corpus": asdict(profile.corpus)}, profile.seed, timer.timings,
                              profile=profile.name, peak_rss_mb=peak_rss_mb()))
    write_json(out / RESULT, {**(read_result(out / RESULT) or {}), **record.to_json()})
    return record


def _train_cached(profile: Profile, job: SAEJob, cfg: TrainConfig, heldout_ND,
                  timer: Timer) -> tuple[float, dict[str, Any], SAE, dict[str, Any]]:
    """The cached mode: choose the knob (calibration probes) and train the SAE from the model's
    activation cache, then save it; (knob, how chosen, SAE, training summary)."""
    entry, out = profile.model(job.model), sae_dir(profile, job)
    train_store = ActivationStore.open(activations_dir(profile, entry, "train"))
    total = train_store.n_tokens(drop_bos=True) // cfg.batch_size * cfg.batch_size
    mean_D = train_store.mean()
    make_batches = lambda: train_store.iter_batches(cfg.batch_size, seed=profile.seed,  # noqa: E731
                                                     max_tokens=total)
    with timer("calibrate"):
        value, how, res = sparsity_value(profile, job, make_batches, train_store.d_model, cfg,
                                         heldout_ND, train_tokens=total, mean_D=mean_D)
    metadata = {"model_name": entry.name, "hook_name": f"blocks.{entry.layer}.hook_resid_post",
                "hook_layer": entry.layer, "context_size": profile.corpus.context}
    controlled = how["method"] == "controlled"
    with timer("train"):
        if res is None:
            res = train_sae(job.arch, train_store.d_model, profile.grid.width, value,
                            make_batches(), total, cfg, checkpoint_dir=out / "checkpoints",
                            mean_D=mean_D, seed=profile.seed, metadata=metadata,
                            target_l0=float(profile.grid.targets[job.level]) if controlled else None)
        else:  # the calibration's best probe is this SAE, trained on the same data and seed
            for key, item in metadata.items():  # as train_sae sets them (SAEMetadata)
                res.sae.cfg.metadata[key] = item
            how["final_from_probe"] = True
    if controlled:
        value = res.sparsity_value  # where the controller left λ
    save_sae(res.sae, out / "sae")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return value, how, res.sae, res.summary()


def _streamed(profile: Profile, job: SAEJob,
              timer: Timer) -> tuple[float, dict[str, Any], SAE, dict[str, Any]]:
    """The streaming mode: the model's capture job trained this SAE among all of the model's
    (:mod:`saelib.stages.streaming`); read it and how it was trained."""
    from . import streaming

    rec = streaming.read_cell(profile, job)
    if rec is None or "sparsity_value" not in rec:
        raise ProfileError(f"{job.name} of {job.model}: no SAE trained in streaming mode under the "
                           "current settings; run the model's capture job first (it trains them)")
    weights = sae_dir(profile, job) / "sae" / SAE_WEIGHTS
    if not weights.exists() or rec.get("sae_sha256") != sae_weights_sha(profile, job):
        raise ProfileError(f"{weights} is missing or differs from the checksum in its "
                           f"{streaming.STREAM_RECORD}; run the model's capture job again (it "
                           "trains this SAE again from the stream)")
    timer.timings["calibrate"] = float(rec["calibrate_seconds"])
    timer.timings["train"] = float(rec["train_seconds"])
    sae = SAE.load_from_disk(str(sae_dir(profile, job) / "sae"))
    return float(rec["sparsity_value"]), rec["sparsity_method"], sae, rec["train"]


def load(profile: Profile | str, model: str, arch: str, level: int) -> SAE:
    """The saved SAE, loaded by sae-lens itself (the notebook shows its parameter shapes)."""
    *_, out = resolve_job(profile, model, arch, level)
    return SAE.load_from_disk(str(out / "sae"))
