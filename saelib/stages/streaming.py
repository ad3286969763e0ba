"""The train stage's streaming mode (profile ``training.mode: streaming``; protocol §2).

The cached mode writes every training activation to disk (at the paper's 5·10⁸ tokens of
Gemma-2-2B, float32 of width 2,304: ≈ 4.6 TB) and then trains one SAE per grid job. Streaming
runs the model over the training split inside the model's capture job and hands each batch to
every SAE of the model at once (:func:`saelib.sae.train.train_saes`, each SAE with its own
optimiser, schedules and dead-latent counters, exactly as alone); disk holds the eval split, the
checkpoints and the SAEs. The per-SAE train jobs then only measure each SAE and write its record.

Why not sae-lens's ``MultiSAETrainingRunner``: it owns the language model through its own
activation store and config, while here the activations must be the capture's (same contexts,
same forward batches, same shuffling: :class:`saelib.activations.ModelStream` serves the cache's
batches to the bit) and the SAEs must train through the same ``SAETrainer.step`` seam, folding and
checkpoints as the cached mode (:mod:`saelib.sae.train`).

Calibration (the L1 and JumpReLU knobs that hit a target L0) needs trained SAEs to measure. Here
every calibrated cell's bracketing search (:func:`saelib.sae.calibrate.bracket_steps`) advances in
lockstep: a round trains the next probe of every unresolved cell, and in the first round every
TopK/BatchTopK SAE, on one pass of the stream; each probe is a full-length training (an L1 SAE's L0
keeps falling as it trains, so shorter probes would miss the band), and the best probe of a cell is
its SAE, as in the cached mode. Starting from ``grid.calibration_start`` most cells land at the
first probe, so one pass trains the grid; each further round costs one more pass for the cells
still searching. Each cell's probes so far are kept in ``stream_state.json``, each probe's
training checkpoints, so a killed job resumes where it stopped and ends with the same SAE bytes.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Generator

import torch

from ..activations import ActivationStore, ModelStream
from ..data.corpus import load_token_splits
from ..profiles import Profile
from ..results import CorruptFileError, read_json, write_json
from ..sae.calibrate import CalibrationConfig, Probe, bracket_steps, first_knob, l0_miss
from ..sae.io import save_sae
from ..sae.metrics import reconstruction_metrics
from ..sae.registry import get_arch
from ..sae.train import SAERun, TrainConfig, TrainResult, train_saes
from . import train
from .layout import SAE_WEIGHTS, SAEJob, activations_dir, model_dir, sae_dir, sae_jobs, tokens_dir
from .records import sae_weights_sha

#: Per SAE folder: how its SAE was trained in the stream (the train job's record is built from it).
STREAM_RECORD = "stream.json"
#: Per model folder: every unresolved cell's probes so far, and the probes' checkpoints.
STATE = "stream_state.json"
CHECKPOINTS = "stream_checkpoints"
#: Checkpoints per probe when the profile sets no ``training.checkpoint_every``.
CHECKPOINTS_PER_PROBE = 8


def streaming(profile: Profile) -> bool:
    return train.settings(profile).mode == "streaming"


def cell_done(profile: Profile, job: SAEJob) -> bool:
    """The SAE's training is finished and current: its train record is (:func:`train.done`), or
    the stream saved it with this profile's training settings and knob method."""
    if train.done(profile, job):
        return True
    rec = read_cell(profile, job)
    return rec is not None and (sae_dir(profile, job) / "sae" / SAE_WEIGHTS).exists() \
        and rec.get("sae_sha256") == sae_weights_sha(profile, job)


def read_cell(profile: Profile, job: SAEJob) -> dict[str, Any] | None:
    """The SAE's :data:`STREAM_RECORD` when it was written under the current settings."""
    path = sae_dir(profile, job) / STREAM_RECORD
    if not path.exists():
        return None
    try:
        rec = read_json(path)
    except CorruptFileError:
        return None
    if (rec.get("sparsity_method") or {}).get("method") != train.sparsity_method(profile, job):
        return None
    if not train.trained_as_profile_asks(profile, rec.get("training")):
        return None
    return rec


def done(profile: Profile, model: str) -> bool:
    """Every SAE of ``model`` is trained (always true in the cached mode: its train jobs train)."""
    if not streaming(profile):
        return True
    entry = profile.model(model)
    return all(cell_done(profile, job) for job in sae_jobs(profile) if job.model == entry.name)


@dataclass
class _Cell:
    """One grid cell's search: the knob it trains next (None: resolved) and its probes."""

    job: SAEJob
    knob_name: str
    target: float
    steps: Generator[float, Probe, list[Probe]] | None
    next_knob: float | None
    trace: list[Probe] = field(default_factory=list)
    best: Probe | None = None
    #: the target L0 the controller steers its one training to ('controlled' cells), else None.
    control: float | None = None

    def record(self, probe: Probe) -> bool:
        """Add a measured probe; True when it is the cell's best so far."""
        self.trace.append(probe)
        better = self.best is None or (l0_miss(probe.realised_l0, self.target)
                                       < l0_miss(self.best.realised_l0, self.target))
        if better:
            self.best = probe
        if self.steps is None:
            self.next_knob = None
        else:
            try:
                self.next_knob = self.steps.send(probe)
            except StopIteration:
                self.next_knob = None
        return better


def new_cell(profile: Profile, job: SAEJob, replay: list[dict[str, Any]] = ()) -> _Cell:
    """The grid cell's search as the stream trains it: the knob of its first (or next) training
    and the L0 its controller steers to, after ``replay``'s probes (an interrupted run's). Also
    what ``bench/gpu_scale.py`` trains, so a GPU's measured rate is this stage's."""
    spec = get_arch(job.arch)
    target = float(profile.grid.targets[job.level])
    method = train.sparsity_method(profile, job)
    if method == "calibrated":
        search = train.search_start(profile, job)
        steps = bracket_steps(first_knob(spec.sparsity_knob, target, search), target,
                              spec.sparsity_knob == "l0_target", search)
        cell = _Cell(job, spec.sparsity_knob, target, steps, next(steps))
    else:  # one training: at the knob (JumpReLU's 'penalty' too), or where the controller starts
        knob = train.sparsity_value(profile, job)[0]
        cell = _Cell(job, spec.sparsity_knob, target, None, knob,
                     control=target if method == "controlled" else None)
    for p in replay:  # the probes an earlier, interrupted run measured
        cell.record(Probe(**p))
    return cell


def run(profile: Profile, model: str, tl, progress: bool = False) -> dict[str, Any]:
    """Train every unfinished SAE of ``model`` from one stream of its training split (module doc);
    returns a summary (rounds, cells, contexts run, seconds)."""
    entry = profile.model(model)
    cfg: TrainConfig = train.settings(profile, progress=progress)
    root = model_dir(profile, entry)
    state_path = root / STATE
    state = read_json(state_path) if state_path.exists() else {}
    if state.get("training") != train.trajectory_settings(cfg):
        state = {"training": train.trajectory_settings(cfg), "probes": {}}
    jobs = [j for j in sae_jobs(profile) if j.model == entry.name and not cell_done(profile, j)]
    summary: dict[str, Any] = {"cells": len(jobs), "rounds": 0, "forward_contexts": 0,
                               "probes": 0}
    if not jobs:
        return summary
    source = ModelStream(tl, load_token_splits(tokens_dir(profile, entry)).train_NL, entry.layer,
                         batch_size=profile.capture.batch_size,
                         shard_tokens=profile.capture.shard_tokens)
    total = source.n_tokens(drop_bos=True) // cfg.batch_size * cfg.batch_size
    eval_store = ActivationStore.open(activations_dir(profile, entry, "eval"))
    mean_D = eval_store.mean()
    heldout_ND = eval_store.sample(profile.section("core").eval_tokens, seed=profile.seed)
    metadata = {"model_name": entry.name, "hook_name": f"blocks.{entry.layer}.hook_resid_post",
                "hook_layer": entry.layer, "context_size": profile.corpus.context}
    # Checkpoints spaced through every probe (the cached mode keeps only a final one, as a job
    # there trains one SAE): a killed stream resumes from the last of them.
    cfg = replace(cfg, checkpoint_every=cfg.checkpoint_every
                  or max(1, total // cfg.batch_size // CHECKPOINTS_PER_PROBE))
    cells = [new_cell(profile, j, state["probes"].get(j.name, [])) for j in jobs]
    while True:
        active = [c for c in cells if c.next_knob is not None]
        if not active:
            break
        runs = [SAERun(c.job.arch, source.d_model, profile.grid.width, c.next_knob, total, cfg,
                       checkpoint_dir=root / CHECKPOINTS / f"{c.job.name}-p{len(c.trace)}",
                       seed=profile.seed, metadata=metadata, target_l0=c.control)
                for c in active]
        results = train_saes(runs, lambda start: source.iter_batches(
            cfg.batch_size, seed=profile.seed, max_tokens=total, start_batch=start), mean_D)
        summary["rounds"] += 1
        summary["probes"] += len(runs)
        for cell, res in zip(active, results):
            _measure(profile, cell, res, heldout_ND, cfg)
            state["probes"][cell.job.name] = [asdict(p) for p in cell.trace]
            write_json(state_path, state)
            shutil.rmtree(root / CHECKPOINTS / f"{cell.job.name}-p{len(cell.trace) - 1}",
                          ignore_errors=True)
    for cell in cells:
        _finish(profile, cell, cfg)
        state["probes"].pop(cell.job.name, None)
    write_json(state_path, state)
    summary["forward_contexts"] = source.forward_contexts
    return summary


def _measure(profile: Profile, cell: _Cell, res: TrainResult, heldout_ND: torch.Tensor,
             cfg: TrainConfig) -> None:
    """Realised L0 of a probe on held-out activations (as the cached calibration measures it);
    the best probe so far is saved as the cell's SAE."""
    m = reconstruction_metrics(res.sae, heldout_ND)
    probe = Probe(knob=float(res.sparsity_value), realised_l0=float(m.l0),
                  explained_variance=float(m.explained_variance), seconds=float(res.seconds))
    if cell.record(probe):
        out = sae_dir(profile, cell.job)
        save_sae(res.sae, out / "sae")
        write_json(out / STREAM_RECORD, {"partial": True, "train": res.summary(),
                                         "training": asdict(cfg)})


def _finish(profile: Profile, cell: _Cell, cfg: TrainConfig) -> None:
    """The cell's record once its search stopped: knob, method (with the search's trace as the
    cached mode records it), the kept probe's training summary, the weights' checksum."""
    out = sae_dir(profile, cell.job)
    partial = read_json(out / STREAM_RECORD)
    method = train.sparsity_method(profile, cell.job)
    best = cell.best
    how: dict[str, Any] = {"method": method, "streamed": True}
    if method == "calibrated":
        how["final_from_probe"] = True
        band = CalibrationConfig().band(cell.target)
        how["trace"] = {"knob_name": cell.knob_name, "knob_value": best.knob,
                        "realised_l0": best.realised_l0,
                        "within_band": band[0] <= best.realised_l0 <= band[1], "band": list(band),
                        "trace": [asdict(p) for p in cell.trace]}
    seconds = sum(p.seconds for p in cell.trace)
    write_json(out / STREAM_RECORD, {
        "sparsity_value": best.knob, "sparsity_method": how, "train": partial["train"],
        "calibrate_seconds": seconds - best.seconds, "train_seconds": best.seconds,
        "training": asdict(cfg), "sae_sha256": sae_weights_sha(profile, cell.job)})
