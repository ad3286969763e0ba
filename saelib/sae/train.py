"""Train one SAE of the grid with sae-lens's training classes, resumably, on raw activations.

Why this module and not ``sae_lens.LanguageModelSAETrainingRunner``: the runner owns the language
model and its activation store, while here activations come from the lead's cache as an iterator
of ``[B, d_in]`` tensors. sae-lens 6.54's :class:`~sae_lens.training.sae_trainer.SAETrainer` has a
public ``step(batch)`` seam (the one its ``fit()`` and ``MultiSAETrainer`` use), so this module
drives that seam: the loss, the Adam optimiser, gradient clipping, the lr schedule, the sparsity
coefficient warm-up and the dead-latent bookkeeping (TopK aux loss) are all sae-lens's own.
What is added here (protocol §2):

* **Schedule scaled to the token budget.** The paper trains on ~5e8 tokens in batches of 2,048,
  i.e. ~244,140 steps, with 1,000 lr-warm-up steps, 5,000 sparsity-warm-up steps and a linear lr
  decay over the last 20 %. CPU profiles train on 1e5-1e6 tokens (tens to hundreds of steps), so
  warm-ups are *fractions* of the total steps (1,000/244,140 and 5,000/244,140 by default) unless an
  absolute step count is given, and are always clipped so warm-up + decay fit in the run.
* **Centring and scaling, folded back.** Raw residual streams carry massive constant offsets
  (offline-data.md, "Massive activations": SAEs trained on raw Gemma activations came out with
  negative explained variance). The SAE therefore trains on ``z = (x - mean) * s`` with
  ``s = sqrt(d_in) / E||x - mean||`` (sae-lens's ``expected_average_only_in`` convention applied to
  centred data), so b_dec starts at the data mean in raw coordinates. After training the affine map
  is folded into the weights with sae-lens's ``fold_activation_whitening`` (M = s*I), and decoder
  rows are folded to unit norm, so the saved SAE takes RAW activations and W_dec[f] is unit-norm
  (protocol §2, "Decoder rows unit-norm"; §4 steering adds alpha * m_f * W_dec[f]).
* **Resume.** Checkpoints are folders of ``state.safetensors`` (weights, Adam moments, RNG, dead-
  latent counters) + ``state.json`` (step, lr/coefficient schedules, config), written to a temporary
  folder and renamed into place, then pointed at by ``latest.json`` (atomic). ``train_sae`` resumes
  from the latest one and skips the batches already consumed, so a resumed run sees the same data
  in the same order as an uninterrupted one. No pickle anywhere.
* **JumpReLU.** The target-L0 penalty is sae-lens's quadratic (Gemma Scope 2) mode, with sae-lens's
  default threshold-only straight-through gradient (``jumprelu_ste_to_input=False``). Passing that
  gradient on to the encoder (Anthropic's variant, this project's earlier default) pushes every
  pre-activation near its threshold down at every step: on a planted dictionary (128 unit
  directions in d = 32, ~4 active, 600 steps of 256) it left 88 % of the latents dead and the
  decoder no closer to the true directions than random rows (MMCS 0.53 vs 0.87 without it); on
  the default profile's activations (level 0) it left 90 % dead, where the threshold-only
  gradient leaves 34 % (explained variance 0.909 -> 0.934).
  Adam moves a log-threshold by about lr per step, so in CPU-length runs (hundreds of steps) the
  thresholds cannot travel far from their start: they start at ``jumprelu_init_threshold`` = 0.2
  (in the centred-and-scaled coordinates, where a typical code is O(1)) instead of sae-lens's
  0.001-0.01, which put L0 at 4.6 for target 4 where 0.01 gave 5.4 (MMCS 0.90 vs 0.87). The
  price: in 512 steps realised L0 has a floor (about 10 on the default's activations; lower
  targets, or a stronger penalty, gave a higher L0), which calibration reports rather than hides.
* **Fused Adam.** sae-lens's Adam (same betas, lr and schedule) with torch's ``fused`` update: one
  pass over each weight per step instead of the single-tensor path's ~8 (``lerp_``, ``mul_``,
  ``addcmul_``, ``sqrt``, ``div``, ``add_``, ``addcdiv_``, ...), which torch picks on the CPU when
  neither ``foreach`` nor ``fused`` is set. Same update up to float rounding; on this CPU the
  optimiser step of a 576 × 2,048 SAE took ~7 % of a ReLU training step before.
* **BatchTopK.** Trained without ``rescale_acts_by_decoder_norm`` (the batch-wide top-k compares
  raw pre-activations, as Bussmann et al.'s unit-norm decoder does): with sae-lens's rescaling on,
  the same planted run left 12 % of the latents dead and MMCS at 0.81 (TopK 0.93); without it,
  2 % dead and 0.90 (default activations, k = 6: 41 % dead -> 0.1 %, explained variance 0.936 ->
  0.934). Decoder norms are folded into the saved JumpReLU's per-latent thresholds,
  which sae-lens's ``JumpReLUSAE.fold_W_dec_norm`` does exactly.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from sae_lens.config import SAETrainerConfig
from sae_lens.saes import SAE, TopKTrainingSAE, BatchTopKTrainingSAE, TrainingSAE
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from saelib.results import (CorruptFileError, files_match, peak_rss_mb, read_json, sha256_file,
                            write_json)
from saelib.sae.controller import L0Controller
from saelib.sae.registry import ArchSpec, get_arch

#: The paper's step counts (protocol §2): ~5e8 tokens / 2,048-token batches.
PAPER_TOTAL_STEPS = 500_000_000 // 2048
PAPER_LR_WARM_UP_STEPS = 1_000
PAPER_SPARSITY_WARM_UP_STEPS = 5_000

CHECKPOINT_FORMAT = 1
_LATEST = "latest.json"
_WEIGHTS = "state.safetensors"
_STATE = "state.json"


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters shared by every SAE of a profile (protocol §2).

    Defaults are the paper's settings where they are scale-free (Adam lr 3e-4, batch 2,048, lr
    decay over the last 20 %) and the paper's warm-up *proportions* where they are not; see the
    module docstring. ``dtype='bfloat16'`` trains with sae-lens's bf16 autocast as the paper does on
    GPUs (parameters stay float32); on CPUs without bf16 units it is ~7x slower, so the CPU default
    is float32 (offline-data.md).
    """

    batch_size: int = 2048
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    #: lr warm-up as a fraction of the total steps (paper: 1,000 of ~244,140 steps).
    lr_warm_up_frac: float = PAPER_LR_WARM_UP_STEPS / PAPER_TOTAL_STEPS
    #: absolute lr warm-up steps; overrides the fraction when set (still clipped to the run).
    lr_warm_up_steps: int | None = None
    #: sparsity-coefficient warm-up (L1 / L0 penalty) as a fraction (paper: 5,000 of ~244,140).
    sparsity_warm_up_frac: float = PAPER_SPARSITY_WARM_UP_STEPS / PAPER_TOTAL_STEPS
    sparsity_warm_up_steps: int | None = None
    #: linear lr decay to 0 over this final fraction of the steps (paper: 20 %).
    lr_decay_frac: float = 0.2
    #: a latent is "dead" for TopK's auxiliary loss after this fraction of the steps without
    #: firing (SAEBench uses 10M of 5e8 tokens = 2 %); at least 1 step.
    dead_feature_window_frac: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    #: 'cached': capture the training activations to disk, then train one SAE per grid job;
    #: 'streaming': the capture job runs the model once over the training split and trains every
    #: SAE of the model from that stream (:mod:`saelib.stages.streaming`); nothing but the eval
    #: split is written.
    mode: Literal["cached", "streaming"] = "cached"
    #: sae-lens's heuristic decoder init norm (Anthropic, April 2024 update).
    decoder_init_norm: float = 0.1
    #: coefficient of sae-lens's quadratic target-L0 penalty (Gemma Scope 2) for JumpReLU.
    jumprelu_l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.05
    #: starting threshold, in the centred-and-scaled coordinates (module doc, JumpReLU).
    jumprelu_init_threshold: float = 0.2
    jumprelu_pre_act_loss_coefficient: float | None = None
    #: pass the L0 penalty's straight-through gradient to the encoder too (Anthropic), not only
    #: to the thresholds (DeepMind, sae-lens's default); see the JumpReLU note in the module doc.
    jumprelu_ste_to_input: bool = False
    topk_aux_loss_coefficient: float = 1.0
    batchtopk_threshold_lr: float = 0.01
    #: sae-lens's ``rescale_acts_by_decoder_norm`` for BatchTopK (module doc, BatchTopK: off).
    batchtopk_rescale_acts: bool = False
    #: train with saelib's subclasses of sae-lens's training SAEs (same numbers, less work: no
    #: encoder input gradient, saelib.sae.encoder; sparse codes decoded by embedding bag, TopK
    #: and BatchTopK everywhere, ReLU and Gated on the CPU, saelib.sae.sparse); False trains
    #: with sae-lens's own classes (dense decode).
    sparse_decode: bool = True
    #: batches used to estimate the centring mean and the scale (clipped to the run).
    norm_estimate_batches: int = 8
    #: checkpoint every this many steps (0: only the final checkpoint) when a folder is given.
    checkpoint_every: int = 0
    #: final L0 / MSE / explained variance are averaged over this many last training batches.
    metrics_tail_batches: int = 8
    #: the L0 controller's time constant and batch-L0 average, as fractions of the run's steps
    #: (used only by a run given a ``target_l0``: :mod:`saelib.sae.controller`).
    l0_control_time_frac: float = 0.1
    l0_control_ema_frac: float = 0.02
    #: the controller acts from this fraction of the run on (or the sparsity warm-up's end if
    #: later): before, L0 falls as the untrained SAE learns, whatever the knob.
    l0_control_start_frac: float = 0.2
    progress: bool = True

    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"adam betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        for name in ("lr_warm_up_frac", "sparsity_warm_up_frac", "lr_decay_frac",
                     "dead_feature_window_frac"):
            v = getattr(self, name)
            need(0 <= v <= 1, f"{name} must be in [0, 1], got {v}")
        need(self.lr_warm_up_frac + self.lr_decay_frac <= 1,
             "lr_warm_up_frac + lr_decay_frac must be <= 1")
        for name in ("lr_warm_up_steps", "sparsity_warm_up_steps"):
            v = getattr(self, name)
            need(v is None or v >= 0, f"{name} must be None or >= 0, got {v}")
        need(self.mode in ("cached", "streaming"),
             f"mode must be 'cached' or 'streaming', got {self.mode!r}")
        need(self.dtype in ("float32", "bfloat16"),
             f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        need(self.decoder_init_norm > 0, "decoder_init_norm must be > 0")
        need(self.jumprelu_l0_coefficient > 0, "jumprelu_l0_coefficient must be > 0")
        need(self.jumprelu_bandwidth > 0, "jumprelu_bandwidth must be > 0")
        need(self.jumprelu_init_threshold >= 0, "jumprelu_init_threshold must be >= 0")
        need(self.topk_aux_loss_coefficient >= 0, "topk_aux_loss_coefficient must be >= 0")
        need(0 < self.batchtopk_threshold_lr <= 1, "batchtopk_threshold_lr must be in (0, 1]")
        need(isinstance(self.batchtopk_rescale_acts, bool),
             f"batchtopk_rescale_acts must be True or False, got {self.batchtopk_rescale_acts!r}")
        need(isinstance(self.sparse_decode, bool),
             f"sparse_decode must be True or False, got {self.sparse_decode!r}")
        need(self.norm_estimate_batches >= 1, "norm_estimate_batches must be >= 1")
        need(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")
        need(self.metrics_tail_batches >= 1, "metrics_tail_batches must be >= 1")
        for name in ("l0_control_time_frac", "l0_control_ema_frac"):
            v = getattr(self, name)
            need(0 < v <= 1, f"{name} must be in (0, 1], got {v}")
        need(0 <= self.l0_control_start_frac < 1,
             f"l0_control_start_frac must be in [0, 1), got {self.l0_control_start_frac}")
        return self

    def schedule(self, total_steps: int) -> "Schedule":
        """Step counts for a run of ``total_steps`` (fractions scaled, then clipped to the run)."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        decay = int(math.floor(self.lr_decay_frac * total_steps))

        def steps(absolute: int | None, frac: float) -> int:
            return int(absolute) if absolute is not None else int(round(frac * total_steps))

        # sae-lens's SequentialLR needs warm-up to end strictly before the decay starts.
        warm = min(steps(self.lr_warm_up_steps, self.lr_warm_up_frac),
                   max(0, total_steps - decay - 1))
        sparsity_warm = min(steps(self.sparsity_warm_up_steps, self.sparsity_warm_up_frac),
                            total_steps)
        dead_window = max(1, int(round(self.dead_feature_window_frac * total_steps)))
        return Schedule(total_steps=total_steps, lr_warm_up_steps=warm, lr_decay_steps=decay,
                        sparsity_warm_up_steps=sparsity_warm, dead_feature_window=dead_window)


@dataclass(frozen=True)
class Schedule:
    """The step counts a run actually used (what the book's training-cost table reports)."""

    total_steps: int
    lr_warm_up_steps: int
    lr_decay_steps: int
    sparsity_warm_up_steps: int
    dead_feature_window: int


@dataclass
class TrainResult:
    """A trained SAE (sae-lens inference class, takes raw activations) and how training went.

    ``l0``, ``mse`` and ``explained_variance`` are over the last ``metrics_tail_batches`` training
    batches, in raw units (``mse`` per element; explained variance = 1 - sum||x - x_hat||^2 /
    sum||x - mean||^2 over those batches). ``dead_fraction`` is sae-lens's training notion: latents
    that did not fire in the last ``schedule.dead_feature_window`` steps. ``peak_rss_mb`` is the
    process's peak resident memory (:func:`saelib.results.peak_rss_mb`), not this call's alone.
    """

    sae: SAE[Any]
    arch: str
    d_in: int
    d_sae: int
    sparsity_value: float
    tokens_seen: int
    n_steps: int
    seconds: float
    peak_rss_mb: float
    l0: float
    mse: float
    explained_variance: float
    dead_fraction: float
    schedule: Schedule
    input_scale: float
    mean_D: torch.Tensor
    resumed_from_step: int | None
    #: the L0 controller's start and final knob, target and last batch-L0 average; None when the
    #: knob was fixed (:mod:`saelib.sae.controller`).
    l0_control: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-able fields (everything but the SAE and the mean vector)."""
        return {"arch": self.arch, "d_in": self.d_in, "d_sae": self.d_sae,
                "sparsity_value": self.sparsity_value, "tokens_seen": self.tokens_seen,
                "n_steps": self.n_steps, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb,
                "l0": self.l0, "mse": self.mse, "explained_variance": self.explained_variance,
                "dead_fraction": self.dead_fraction, "schedule": asdict(self.schedule),
                "input_scale": self.input_scale, "resumed_from_step": self.resumed_from_step,
                **({"l0_control": self.l0_control} if self.l0_control is not None else {})}


class BatchStream:
    """Re-cuts an iterator of ``[n, d_in]`` activation tensors into exact ``[batch, d_in]`` batches.

    Why: the activation cache hands out chunks of whatever size it stored, while the schedule,
    the token count and sae-lens's dead-latent counters assume fixed batches.
    """

    def __init__(self, source: Iterable[torch.Tensor], batch_size: int, d_in: int):
        self._source: Iterator[torch.Tensor] = iter(source)
        self.batch_size = batch_size
        self.d_in = d_in
        self._pending: list[torch.Tensor] = []
        self._n_pending = 0
        self.rows_read = 0

    def _pull(self) -> bool:
        try:
            chunk = next(self._source)
        except StopIteration:
            return False
        if not isinstance(chunk, torch.Tensor) or chunk.ndim != 2 or chunk.shape[1] != self.d_in:
            got = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
            raise ValueError(f"activation batches must be tensors of shape [n, d_in={self.d_in}], "
                             f"got {got}")
        if not chunk.is_floating_point():
            raise ValueError(f"activation batches must be floating point, got {chunk.dtype}")
        if chunk.shape[0]:
            self._pending.append(chunk.float())
            self._n_pending += chunk.shape[0]
        return True

    def next_batch(self) -> torch.Tensor | None:
        """The next ``[batch_size, d_in]`` float32 batch, or None when the source runs out."""
        while self._n_pending < self.batch_size:
            if not self._pull():
                return None
        flat = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        batch, rest = flat[: self.batch_size], flat[self.batch_size:]
        self._pending = [rest] if rest.shape[0] else []
        self._n_pending = rest.shape[0]
        self.rows_read += self.batch_size
        if not torch.isfinite(batch).all():
            raise ValueError(f"activation batch starting at row {self.rows_read - self.batch_size}"
                             " contains NaN or inf")
        return batch


class _TailStats:
    """Running sums over the last training batches, in the centred-and-scaled coordinates.

    Explained variance is invariant to the affine map, MSE is divided by scale^2 to be raw.
    """

    def __init__(self, d_in: int):
        self.n = 0
        self.l0_sum = 0.0
        self.sse = 0.0
        self.sum_x_D = torch.zeros(d_in, dtype=torch.float64)
        self.sum_x2 = 0.0

    @torch.no_grad()
    def update(self, out: TrainStepOutput) -> None:
        x = out.sae_in.detach().double()
        acts = out.feature_acts.detach()
        if acts.is_sparse:
            acts = acts.to_dense()
        self.n += x.shape[0]
        self.l0_sum += float((acts != 0).sum())
        self.sse += float((out.sae_out.detach().double() - x).pow(2).sum())
        self.sum_x_D += x.sum(0).cpu()
        self.sum_x2 += float(x.pow(2).sum())

    def metrics(self, scale: float) -> tuple[float, float, float]:
        if self.n == 0:
            raise RuntimeError("no training batches were recorded for the final metrics")
        d = self.sum_x_D.numel()
        total_var = self.sum_x2 - float(self.sum_x_D.pow(2).sum()) / self.n
        ev = 1.0 - self.sse / total_var if total_var > 0 else float("nan")
        return self.l0_sum / self.n, self.sse / (self.n * d) / scale**2, ev

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return ({"n": self.n, "l0_sum": self.l0_sum, "sse": self.sse, "sum_x2": self.sum_x2},
                {"tail.sum_x_D": self.sum_x_D})

    def load(self, js: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        self.n, self.l0_sum = int(js["n"]), float(js["l0_sum"])
        self.sse, self.sum_x2 = float(js["sse"]), float(js["sum_x2"])
        self.sum_x_D = tensors["tail.sum_x_D"].double().clone()


def trajectory_settings(cfg: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The training settings that change what is trained (a checkpoint resumes, and a saved SAE
    counts as current, only when they agree). ``sparse_decode`` changes float rounding only, so
    either setting may resume the other's run; progress bars and checkpoint spacing change
    nothing; the L0 controller's settings act only on a run given a target L0, whose identity
    names them itself. Accepts the config or its dict as stored in a result's provenance."""
    irrelevant = {"progress", "checkpoint_every", "sparse_decode", "l0_control_time_frac",
                  "l0_control_ema_frac", "l0_control_start_frac"}
    items = cfg.items() if isinstance(cfg, Mapping) else ((f.name, getattr(cfg, f.name))
                                                         for f in fields(cfg))
    # The mode changes the centring mean (streaming centres with the eval split's), so it counts;
    # 'cached' is left out, so records written before modes existed stay current.
    return {k: v for k, v in items
            if k not in irrelevant and not (k == "mode" and v == "cached")}


def _identity(arch: str, d_in: int, d_sae: int, sparsity_value: float, total_tokens: int,
              seed: int, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed (knobs that change the trajectory)."""
    return {"format": CHECKPOINT_FORMAT, "arch": arch, "d_in": d_in, "d_sae": d_sae,
            "sparsity_value": float(sparsity_value), "total_tokens": int(total_tokens),
            "seed": int(seed), "train_cfg": trajectory_settings(cfg)}


def _make_trainer(sae: TrainingSAE[Any], cfg: TrainConfig, sched: Schedule) -> SAETrainer:
    trainer_cfg = SAETrainerConfig(
        total_training_samples=sched.total_steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr,
        lr_scheduler_name="constant", lr_warm_up_steps=sched.lr_warm_up_steps,
        lr_decay_steps=sched.lr_decay_steps, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, device=cfg.device, autocast=cfg.dtype == "bfloat16",
        dead_feature_window=sched.dead_feature_window,
        feature_sampling_window=max(1, sched.total_steps), n_checkpoints=0)
    # sae-lens reads batches through step(); the provider is never pulled.
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))
    fuse_adam(trainer.optimizer)
    return trainer


def fuse_adam(optimizer: torch.optim.Optimizer) -> None:
    """Switch sae-lens's Adam to torch's fused update (module doc, "Fused Adam"), before its first
    step or after a checkpoint's state is loaded (a loaded state brings its own param groups).
    The fused path keeps each parameter's step count as a float32 tensor on the parameter's
    device; a state written by the unfused path is moved there."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def _get_rng(device: str) -> dict[str, torch.Tensor]:
    """The random-number state a run owns: the CPU generator's, and the device's on CUDA."""
    out = {"rng.cpu": torch.get_rng_state()}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return out


def _set_rng(state: Mapping[str, torch.Tensor], device: str) -> None:
    torch.set_rng_state(state["rng.cpu"])
    if "rng.cuda" in state and device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng.cuda"], torch.device(device))


def _save_checkpoint(folder: Path, trainer: SAETrainer, tail: _TailStats, mean_D: torch.Tensor,
                     scale: float, seconds: float, identity: dict[str, Any],
                     rng: Mapping[str, torch.Tensor],
                     l0_control: dict[str, Any] | None = None) -> None:
    step = trainer.n_training_steps
    tensors: dict[str, torch.Tensor] = {
        f"sae.{k}": v.detach().cpu().contiguous() for k, v in trainer.sae.state_dict().items()}
    opt_state = trainer.optimizer.state_dict()
    for idx, per_param in opt_state["state"].items():
        for key, value in per_param.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["trainer.act_freq_scores"] = trainer.act_freq_scores.detach().cpu()
    tensors["trainer.n_forward_passes_since_fired"] = \
        trainer.n_forward_passes_since_fired.detach().cpu()
    tensors["norm.mean_D"] = mean_D.detach().cpu().double()
    tensors.update(rng)
    tail_js, tail_tensors = tail.state()
    tensors.update(tail_tensors)
    state = {
        "identity": identity, "step": step, "tokens_seen": trainer.n_training_samples,
        "seconds": seconds, "scale": scale,
        "optimizer_param_groups": opt_state["param_groups"],
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "coefficient_schedulers": {n: s.state_dict()
                                   for n, s in trainer.coefficient_schedulers.items()},
        "n_frac_active_samples": trainer.n_frac_active_samples, "tail": tail_js,
        **({"l0_control": l0_control} if l0_control is not None else {}),
    }
    name = f"step_{step:09d}"
    tmp = folder / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / _WEIGHTS))
    write_json(tmp / _STATE, state)
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    write_json(folder / _LATEST, {"dir": name, "step": step,
                                  "sha256": {f: sha256_file(final / f) for f in (_WEIGHTS, _STATE)}})
    for old in folder.glob("step_*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The folder of the newest complete checkpoint under ``folder``, or None.

    A checkpoint whose files differ from the checksums its pointer recorded (truncated, corrupt)
    is named on stderr and not used: the run then starts again from scratch, which recomputes it.
    """
    pointer = Path(folder) / _LATEST
    if not pointer.exists():
        return None
    try:
        record = read_json(pointer)
    except CorruptFileError as e:
        print(f"warning: {e}; training restarts from scratch", file=sys.stderr)
        return None
    target = Path(folder) / record["dir"]
    if not (target / _WEIGHTS).exists() or not (target / _STATE).exists():
        return None
    if not files_match(target, record.get("sha256") or {}, pointer,
                       "training restarts from scratch"):
        return None
    return target


def _load_checkpoint(path: Path, trainer: SAETrainer, tail: _TailStats,
                     identity: dict[str, Any], device: str) -> tuple[dict[str, Any], torch.Tensor]:
    state = read_json(path / _STATE)
    if state["identity"] != identity:
        diffs = _dict_diff(state["identity"], identity)
        raise ValueError(f"checkpoint {path} was written by a different run ({diffs}); "
                         "delete the checkpoint folder or use another one")
    tensors = load_file(str(path / _WEIGHTS), device="cpu")
    sae_state = {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}
    trainer.sae.load_state_dict(sae_state)
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = value
    groups = state["optimizer_param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    trainer.optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    fuse_adam(trainer.optimizer)
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name, sd in state["coefficient_schedulers"].items():
        trainer.coefficient_schedulers[name].load_state_dict(sd)
    trainer.act_freq_scores = tensors["trainer.act_freq_scores"].to(device)
    trainer.n_forward_passes_since_fired = \
        tensors["trainer.n_forward_passes_since_fired"].to(device)
    trainer.n_frac_active_samples = int(state["n_frac_active_samples"])
    trainer.n_training_steps = int(state["step"])
    trainer.n_training_samples = int(state["tokens_seen"])
    _set_rng(tensors, device)
    tail.load(state["tail"], tensors)
    return state, tensors["norm.mean_D"]


def _dict_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> str:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            sub = _dict_diff(a, b, f"{prefix}{key}.")
            if sub:
                out.append(sub)
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r} vs now {b!r}")
    return "; ".join(out)


@torch.no_grad()
def _estimate_normalisation(batches: list[torch.Tensor],
                            mean_D: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Data mean (unless given) and s = sqrt(d_in) / E||x - mean|| from the first batches."""
    x = torch.cat(batches).double()
    mean = x.mean(0) if mean_D is None else mean_D.double().cpu()
    norm = (x - mean).norm(dim=-1).mean().item()
    if not norm > 0:
        raise ValueError("activations are constant over the normalisation batches: cannot scale")
    return mean, math.sqrt(x.shape[1]) / norm


@torch.no_grad()
def fold_to_raw(sae: TrainingSAE[Any], mean_D: torch.Tensor, scale: float) -> None:
    """Fold z = (x - mean) * s into the weights and make decoder rows unit-norm, in place.

    Uses sae-lens's per-architecture ``fold_activation_whitening`` (with M = s*I) and
    ``fold_W_dec_norm``; both leave encode/decode of raw inputs unchanged up to float rounding.
    A BatchTopK SAE trained without decoder-norm rescaling keeps its decoder norms here: its
    batch-wide selection is not per-latent scale-free, so they are folded into the per-latent
    thresholds of the JumpReLU it is saved as (:func:`to_inference_sae`).
    """
    d = sae.cfg.d_in
    eye = torch.eye(d, dtype=torch.float64, device=sae.W_dec.device)
    rescaled = bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
    sae.fold_activation_whitening(mean_D.to(sae.W_dec.device), eye * scale, eye / scale)
    if isinstance(sae, TopKTrainingSAE):
        if not rescaled:
            if not isinstance(sae, BatchTopKTrainingSAE):
                raise RuntimeError("TopK SAEs must train with rescale_acts_by_decoder_norm=True: "
                                   "their decoder norms cannot be folded otherwise")
            return
        # sae-lens's TopK fold above already divided by the row norms and switched
        # rescale_acts_by_decoder_norm off, leaving every row at norm 1/s. Scaling all latents
        # by one common factor cannot change which are the top k, so undo it uniformly.
        norms = sae.W_dec.norm(dim=-1)
        common = norms.mean()
        if not torch.allclose(norms, common.expand_as(norms), rtol=1e-3):
            raise RuntimeError("TopK decoder rows have unequal norms after folding; "
                               "expected rescale_acts_by_decoder_norm=True during training")
        sae.W_dec.data /= common
        sae.W_enc.data *= common
        sae.b_enc.data *= common
        if isinstance(sae, BatchTopKTrainingSAE):
            sae.topk_threshold = sae.topk_threshold * common.double()
    else:
        sae.fold_W_dec_norm()


def to_inference_sae(training_sae: TrainingSAE[Any]) -> SAE[Any]:
    """The sae-lens inference SAE a training SAE is saved as (BatchTopK -> JumpReLU).

    Same state-dict processing as sae-lens's ``save_inference_model``, without the disk round trip.
    Decoder norms still left in a BatchTopK SAE (:func:`fold_to_raw`) are folded into the
    JumpReLU's per-latent thresholds here, so every saved SAE has unit-norm decoder rows.
    """
    state = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    cfg_dict = training_sae.cfg.get_inference_sae_cfg_dict()
    cfg_dict["device"] = str(training_sae.W_dec.device)
    sae = SAE.from_dict(cfg_dict)
    sae.load_state_dict(state)
    if isinstance(training_sae, BatchTopKTrainingSAE):
        norms = sae.W_dec.detach().norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), rtol=1e-5):
            sae.fold_W_dec_norm()
    sae.eval()
    return sae


class SAERun:
    """One SAE's training over a stream of batches: sae-lens's ``SAETrainer.step`` seam with the
    schedule, centring and scaling, tail metrics, checkpoints and its own random-number state.

    :func:`train_sae` drives one run; :func:`train_saes` drives many over one stream (the model's
    forward paid once for every SAE of a profile). Each run keeps its own RNG state and swaps it
    in around its steps, so a run's numbers do not depend on which other runs share the stream:
    an SAE trained among others is the same bytes as one trained alone on the same batches.

    A new run needs :meth:`set_normalisation` (from the first batches) before its first step; a
    resumed one has it from its checkpoint and continues at :attr:`step_index`.
    """

    def __init__(self, arch: str, d_in: int, d_sae: int, sparsity_value: float, total_tokens: int,
                 train_cfg: TrainConfig | None = None, checkpoint_dir: str | Path | None = None,
                 seed: int = 0, metadata: Mapping[str, Any] | None = None,
                 target_l0: float | None = None):
        self.spec: ArchSpec = get_arch(arch)
        self.cfg = cfg = (train_cfg or TrainConfig()).validate()
        if total_tokens < cfg.batch_size:
            raise ValueError(f"total_tokens={total_tokens} is less than one batch "
                             f"(batch_size={cfg.batch_size})")
        self.d_in, self.d_sae, self.sparsity_value = d_in, d_sae, float(sparsity_value)
        self.seed, self.total_tokens = seed, total_tokens
        self.sched = cfg.schedule(total_tokens // cfg.batch_size)
        self.identity = _identity(self.spec.name, d_in, d_sae, sparsity_value, total_tokens, seed,
                                  cfg)
        # target_l0: the knob (λ or JumpReLU's penalty target) starts at sparsity_value and the L0
        # controller moves it; TopK's k is its L0 already, so there is nothing to control.
        self.controller: L0Controller | None = None
        if target_l0 is not None and self.spec.sparsity_knob != "k":
            self.controller = L0Controller(
                target_l0, sparsity_value, increasing=self.spec.sparsity_knob == "l0_target",
                total_steps=self.sched.total_steps,
                start_step=max(self.sched.sparsity_warm_up_steps,
                               round(cfg.l0_control_start_frac * self.sched.total_steps)),
                time_frac=cfg.l0_control_time_frac, ema_frac=cfg.l0_control_ema_frac)
            self.identity["l0_control"] = {"target_l0": float(target_l0),
                                           "time_frac": cfg.l0_control_time_frac,
                                           "ema_frac": cfg.l0_control_ema_frac,
                                           "start_frac": cfg.l0_control_start_frac}
        outer_rng = _get_rng(cfg.device)
        torch.manual_seed(seed)
        sae_cfg = self.spec.make_config(d_in, d_sae, sparsity_value,
                                        self.sched.sparsity_warm_up_steps, cfg)
        for key, value in (metadata or {}).items():
            sae_cfg.metadata[key] = value
        self.sae = self.spec.training_class(cfg.sparse_decode)(sae_cfg)
        self.trainer = _make_trainer(self.sae, cfg, self.sched)
        self.tail = _TailStats(d_in)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.prior_seconds = 0.0
        self.resumed_from: int | None = None
        self.mean: torch.Tensor | None = None
        self.scale: float | None = None
        ckpt = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        if ckpt is not None:
            state, mean = _load_checkpoint(ckpt, self.trainer, self.tail, self.identity, cfg.device)
            self.prior_seconds = float(state["seconds"])
            self.resumed_from = self.trainer.n_training_steps
            self._set(mean, float(state["scale"]))
            if self.controller is not None:
                self.controller.load(state["l0_control"])
                if self.resumed_from > self.controller.start_step:
                    self._set_knob(self.controller.knob)
        self.rng = _get_rng(cfg.device)
        _set_rng(outer_rng, cfg.device)
        self.seconds_here = 0.0
        self._tail_start = max(0, self.sched.total_steps - cfg.metrics_tail_batches)
        self._update_every = max(1, self.sched.total_steps // 50)
        self.pbar = None

    def _set(self, mean: torch.Tensor, scale: float) -> None:
        self.mean, self.scale = mean, scale
        self._mean_dev = mean.to(self.cfg.device, torch.float32)

    @property
    def step_index(self) -> int:
        """Steps trained so far (the index of the next batch this run takes)."""
        return self.trainer.n_training_steps

    @property
    def finished(self) -> bool:
        return self.step_index >= self.sched.total_steps

    @property
    def needs_normalisation(self) -> bool:
        return self.mean is None

    def set_normalisation(self, first: list[torch.Tensor], mean_D: torch.Tensor | None) -> None:
        """Centre and scale from the first batches (the data mean ``mean_D`` when given)."""
        if mean_D is not None and (mean_D.shape != (self.d_in,) or not torch.isfinite(mean_D).all()):
            raise ValueError(f"mean_D must be a finite tensor of shape ({self.d_in},), "
                             f"got {tuple(mean_D.shape)}")
        if not first:
            raise ValueError("batches yielded no complete batch of activations")
        self._set(*_estimate_normalisation(first, mean_D))

    def progress_bar(self, position: int = 0) -> None:
        self.pbar = tqdm(total=self.sched.total_steps * self.cfg.batch_size,
                         initial=self.trainer.n_training_samples, desc=f"train {self.spec.name}",
                         disable=not self.cfg.progress, unit="tok", position=position)

    def step(self, batch: torch.Tensor) -> None:
        """One training step on a raw ``[batch_size, d_in]`` batch (the run's next one)."""
        t0 = time.perf_counter()
        outer = _get_rng(self.cfg.device)
        _set_rng(self.rng, self.cfg.device)
        z = (batch.to(self.cfg.device) - self._mean_dev) * self.scale
        out = self.trainer.step(z)
        if self.trainer.n_training_steps >= self._tail_start:
            self.tail.update(out)
        if self.controller is not None:
            acts = out.feature_acts.detach()
            batch_l0 = float((acts != 0).sum()) / acts.shape[0]
            index = self.trainer.n_training_steps
            knob = self.controller.update(index, batch_l0)
            if index >= self.controller.start_step:
                self._set_knob(knob)
        self.trainer.n_training_steps += 1
        self.rng = _get_rng(self.cfg.device)
        _set_rng(outer, self.cfg.device)
        step = self.trainer.n_training_steps
        if self.pbar is not None and (step % self._update_every == 0 or self.finished):
            self.pbar.set_postfix({k: f"{float(v.detach()):.4g}" for k, v in out.losses.items()})
            self.pbar.n = self.trainer.n_training_samples
            self.pbar.refresh()
        self.seconds_here += time.perf_counter() - t0
        if (self.checkpoint_dir is not None and self.cfg.checkpoint_every
                and step % self.cfg.checkpoint_every == 0 and not self.finished):
            self.checkpoint()

    def _set_knob(self, knob: float) -> None:
        """The knob for the next step: λ in sae-lens's coefficient scheduler (past its warm-up,
        where its value is the final value), or the quadratic L0 penalty's target in the config."""
        if self.spec.sparsity_knob == "l1":
            scheduler = self.trainer.coefficient_schedulers["l1"]
            scheduler.final_value = scheduler.current_value = knob
        else:
            self.sae.cfg.target_l0 = knob

    @property
    def knob(self) -> float:
        """The sparsity value the run trains at now (the controller's, when it has one)."""
        return self.controller.knob if self.controller is not None else self.sparsity_value

    @property
    def seconds(self) -> float:
        return self.prior_seconds + self.seconds_here

    def checkpoint(self) -> None:
        _save_checkpoint(self.checkpoint_dir, self.trainer, self.tail, self.mean, self.scale,
                         self.seconds, self.identity, self.rng,
                         None if self.controller is None else self.controller.state())

    def finish(self) -> TrainResult:
        """The trained SAE folded to raw coordinates, with its summary (after the last step)."""
        if not self.finished:
            raise RuntimeError(f"{self.spec.name}: finish() after {self.step_index} of "
                               f"{self.sched.total_steps} steps")
        if self.pbar is not None:
            self.pbar.close()
        if self.checkpoint_dir is not None and self.resumed_from != self.sched.total_steps:
            self.checkpoint()
        l0, mse, ev = self.tail.metrics(self.scale)
        dead_fraction = float(self.trainer.dead_neurons.float().mean())
        sae, spec = self.sae, self.spec
        sae.eval()
        fold_to_raw(sae, self.mean, self.scale)
        sae.cfg.metadata["saelib_arch"] = spec.name
        sae.cfg.metadata["saelib_sparsity_value"] = self.knob
        sae.cfg.metadata["saelib_tokens"] = int(self.trainer.n_training_samples)
        sae.cfg.metadata["saelib_seed"] = int(self.seed)
        inference = to_inference_sae(sae)
        return TrainResult(sae=inference, arch=spec.name, d_in=self.d_in, d_sae=self.d_sae,
                           sparsity_value=self.knob,
                           tokens_seen=self.trainer.n_training_samples,
                           n_steps=self.trainer.n_training_steps, seconds=self.seconds,
                           peak_rss_mb=peak_rss_mb(), l0=l0, mse=mse, explained_variance=ev,
                           dead_fraction=dead_fraction, schedule=self.sched,
                           input_scale=self.scale, mean_D=self.mean.float(),
                           resumed_from_step=self.resumed_from,
                           l0_control=None if self.controller is None else self.controller.summary())


def train_sae(arch: str, d_in: int, d_sae: int, sparsity_value: float,
              batches: Iterable[torch.Tensor] | Callable[[int], Iterable[torch.Tensor]],
              total_tokens: int, train_cfg: TrainConfig | None = None,
              checkpoint_dir: str | Path | None = None, mean_D: torch.Tensor | None = None,
              seed: int = 0, metadata: Mapping[str, Any] | None = None,
              target_l0: float | None = None) -> TrainResult:
    """Train one SAE on raw activations and return it folded to raw coordinates.

    Args:
        arch: a name from :data:`saelib.sae.registry.ARCHITECTURES` (relu, gated, jumprelu, topk,
            batchtopk).
        sparsity_value: k (TopK, BatchTopK), the L1 coefficient (ReLU, Gated) or the target L0 of
            the quadratic L0 penalty (JumpReLU); see :mod:`saelib.sae.calibrate` for finding the
            L1 coefficient that hits a target L0.
        batches: float tensors ``[n, d_in]`` of raw activations, from the start of the stream
            (on resume the consumed rows are skipped). Chunks of any ``n`` are re-cut to
            ``train_cfg.batch_size``. Or a function of the first batch index (:func:`train_saes`).
        total_tokens: training tokens; ``total_tokens // batch_size`` steps are run.
        checkpoint_dir: where checkpoints go; the run resumes from the latest one there.
        mean_D: the data mean b_dec starts at (raw coordinates); estimated from the first
            ``norm_estimate_batches`` batches when None.
        seed: seeds the weight initialisation.
        metadata: extra fields for the saved cfg's metadata (e.g. model_name, hook_name).
        target_l0: when given (and the knob is not k), ``sparsity_value`` is only where the knob
            starts: the L0 controller (:mod:`saelib.sae.controller`) moves it toward this L0.
    """
    run = SAERun(arch, d_in, d_sae, sparsity_value, total_tokens, train_cfg, checkpoint_dir,
                 seed, metadata, target_l0)
    return train_saes([run], batches, mean_D)[0]


def train_saes(runs: list[SAERun],
               batches: Iterable[torch.Tensor] | Callable[[int], Iterable[torch.Tensor]],
               mean_D: torch.Tensor | None = None) -> list[TrainResult]:
    """Train every run on one stream of raw activation batches (one pass of the data for all).

    ``batches`` is an iterable from the start of the stream (on resume the batches already
    trained on are read and dropped) or a function of the first batch index wanted that returns
    batches of exactly the runs' batch size from there (:meth:`~saelib.activations.ActivationStore.
    iter_batches`' ``start_batch``: a resumed stream then reads, or recomputes, nothing it skips).

    The runs share the batch size and token budget (one schedule). Resumed runs may stand at
    different steps (a kill between two runs' checkpoints): the stream restarts at the earliest,
    and each batch goes to the runs whose next step it is, so every run sees the same batches in
    the same order as an uninterrupted run. New runs are centred and scaled from the stream's
    first ``norm_estimate_batches`` batches (or ``mean_D``), as :func:`train_sae` always did.
    """
    if not runs:
        return []
    first_run = runs[0]
    cfg, sched = first_run.cfg, first_run.sched
    for run in runs[1:]:
        if (run.cfg.batch_size, run.sched.total_steps, run.d_in, run.cfg.device) != \
                (cfg.batch_size, sched.total_steps, first_run.d_in, cfg.device):
            raise ValueError("runs trained on one stream need one batch size, token budget, d_in "
                             "and device")
    start = min(run.step_index for run in runs)
    skip = start if start < sched.total_steps else 0
    if callable(batches):
        stream = BatchStream(batches(skip), cfg.batch_size, first_run.d_in)
        skip = 0
    else:
        stream = BatchStream(batches, cfg.batch_size, first_run.d_in)
    for _ in range(skip):
        if stream.next_batch() is None:
            raise ValueError(f"batches ran out while skipping the {start} batches already trained "
                             "on (checkpoints)")
    first: list[torch.Tensor] = []
    if any(run.needs_normalisation for run in runs):
        if start:
            raise RuntimeError("a new run cannot join runs resumed past their first step")
        for _ in range(min(cfg.norm_estimate_batches, sched.total_steps)):
            batch = stream.next_batch()
            if batch is None:
                break
            first.append(batch)
        for run in runs:
            if run.needs_normalisation:
                run.set_normalisation(first, mean_D)
    for i, run in enumerate(runs):
        run.progress_bar(position=i if len(runs) > 1 else 0)
    for index in range(start, sched.total_steps):
        batch = first.pop(0) if first else stream.next_batch()
        if batch is None:
            raise ValueError(f"batches ran out after {stream.rows_read} tokens; total_tokens="
                             f"{first_run.total_tokens} needs {sched.total_steps * cfg.batch_size}")
        # one host-to-device copy per step for every run (30 copies of an 18.9 MB batch per step
        # at Gemma-2-2B's paper profile otherwise); a run's own ``.to`` is then a no-op
        batch = batch.to(cfg.device)
        for run in runs:
            if run.step_index == index:
                run.step(batch)
    return [run.finish() for run in runs]
