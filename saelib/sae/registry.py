"""The five SAE architectures of the paper, mapped in one place onto sae-lens's training classes.

Why an explicit registry: the paper (protocol §2) names its architectures ReLU ("standard", L1
penalty), Gated, JumpReLU, TopK and BatchTopK and sets each one's sparsity with a different knob
(an L1 coefficient, a target L0, or k). sae-lens has a training config dataclass and a training SAE
class per architecture; this module says, once, which paper name goes with which sae-lens classes,
which knob the sparsity value feeds, and which inference class the trained SAE is saved as
(sae-lens saves BatchTopK as JumpReLU with a threshold, as its ``BatchTopKTrainingSAEConfig`` does).
Everything else in ``saelib.sae`` looks architectures up here instead of branching on names.
Every architecture trains with a saelib subclass of sae-lens's training class that computes the
same numbers with less work: all five skip the encoder's input gradient
(:mod:`saelib.sae.encoder`), and all but JumpReLU also decode their sparse code by embedding bag
(:mod:`saelib.sae.sparse`, ~F/L0 less decoder work; ReLU and Gated on the CPU only).
``sae_lens_training_sae_cls`` keeps sae-lens's own class (``TrainConfig.sparse_decode=False``: tests and benchmarks compare the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from sae_lens.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainingSAE,
    TrainingSAEConfig,
)

from saelib.sae.encoder import CentredJumpReLUTrainingSAE
from saelib.sae.sparse import (SparseBatchTopKTrainingSAE, SparseGatedTrainingSAE,
                               SparseStandardTrainingSAE, SparseTopKTrainingSAE)

if TYPE_CHECKING:
    from saelib.sae.train import TrainConfig

#: What the sparsity value of a grid cell means for an architecture (protocol §2, "Sparsity").
#: 'k': the number of active latents itself (TopK, BatchTopK: k = target L0);
#: 'l1': the L1 coefficient λ (ReLU, Gated; realised L0 falls as λ grows);
#: 'l0_target': the target L0 of sae-lens's quadratic L0 penalty (JumpReLU).
SparsityKnob = Literal["k", "l1", "l0_target"]


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: the paper's name and the sae-lens classes that train and serve it.

    ``build_config`` turns (d_in, d_sae, sparsity value, sparsity warm-up steps, TrainConfig) into
    the sae-lens training config dataclass; it is the only place per-architecture settings live.
    """

    name: str
    paper_name: str
    sae_lens_architecture: str
    training_config_cls: type[TrainingSAEConfig]
    training_sae_cls: type[TrainingSAE[Any]]
    inference_cls_name: str
    inference_architecture: str
    sparsity_knob: SparsityKnob
    build_config: Callable[[int, int, float, int, "TrainConfig"], TrainingSAEConfig]
    #: sae-lens's own training class, of which ``training_sae_cls`` is saelib's subclass.
    sae_lens_training_sae_cls: type[TrainingSAE[Any]] | None = None

    def training_class(self, sparse_decode: bool = True) -> type[TrainingSAE[Any]]:
        """The class that trains this architecture: saelib's subclass (module doc) unless
        ``sparse_decode`` (``TrainConfig``'s name for it) is False, then sae-lens's own class."""
        if sparse_decode or self.sae_lens_training_sae_cls is None:
            return self.training_sae_cls
        return self.sae_lens_training_sae_cls

    def validate_sparsity(self, sparsity_value: float, d_sae: int) -> None:
        """Raise ``ValueError`` when ``sparsity_value`` is meaningless for this architecture."""
        if not math.isfinite(sparsity_value) or sparsity_value <= 0:
            raise ValueError(f"{self.name}: sparsity value ({self.sparsity_knob}) must be a "
                             f"positive finite number, got {sparsity_value!r}")
        if self.sparsity_knob == "k":
            if self.name == "topk" and float(sparsity_value) != int(sparsity_value):
                raise ValueError(f"topk: k must be an integer, got {sparsity_value!r}")
            if sparsity_value > d_sae:
                raise ValueError(f"{self.name}: k={sparsity_value} exceeds d_sae={d_sae}; "
                                 f"valid range is 1..{d_sae}")
        if self.sparsity_knob == "l0_target" and sparsity_value > d_sae:
            raise ValueError(f"{self.name}: target L0 {sparsity_value} exceeds d_sae={d_sae}; "
                             f"valid range is (0, {d_sae}]")

    def make_config(self, d_in: int, d_sae: int, sparsity_value: float,
                    sparsity_warm_up_steps: int, train_cfg: "TrainConfig") -> TrainingSAEConfig:
        """The sae-lens training config for one SAE of this architecture (validated)."""
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"d_in and d_sae must be >= 1, got d_in={d_in}, d_sae={d_sae}")
        self.validate_sparsity(sparsity_value, d_sae)
        return self.build_config(d_in, d_sae, sparsity_value, sparsity_warm_up_steps, train_cfg)


def _common(d_in: int, d_sae: int, train_cfg: "TrainConfig") -> dict[str, Any]:
    # Parameters stay float32 whatever the compute dtype: bf16 runs use sae-lens's autocast
    # (as the paper's bf16 training does), and Adam steps of ~lr round away in bf16 weights.
    return {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": train_cfg.device,
            "apply_b_dec_to_input": True, "normalize_activations": "none",
            "decoder_init_norm": train_cfg.decoder_init_norm}


def _relu(d_in: int, d_sae: int, value: float, warm: int, cfg: "TrainConfig") -> TrainingSAEConfig:
    return StandardTrainingSAEConfig(**_common(d_in, d_sae, cfg), l1_coefficient=float(value),
                                     lp_norm=1.0, l1_warm_up_steps=warm)


def _gated(d_in: int, d_sae: int, value: float, warm: int, cfg: "TrainConfig") -> TrainingSAEConfig:
    return GatedTrainingSAEConfig(**_common(d_in, d_sae, cfg), l1_coefficient=float(value),
                                  l1_warm_up_steps=warm)


def _jumprelu(d_in: int, d_sae: int, value: float, warm: int,
              cfg: "TrainConfig") -> TrainingSAEConfig:
    # sae-lens's "quadratic" mode is Gemma Scope 2's target-L0 penalty
    # coeff * 2/T * (L0 - T)^2: the paper's "JumpReLU: a target-L0 penalty" (protocol §2).
    return JumpReLUTrainingSAEConfig(
        **_common(d_in, d_sae, cfg), jumprelu_sparsity_loss_mode="quadratic",
        target_l0=float(value), l0_coefficient=cfg.jumprelu_l0_coefficient,
        l0_warm_up_steps=warm, jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        jumprelu_init_threshold=cfg.jumprelu_init_threshold,
        pre_act_loss_coefficient=cfg.jumprelu_pre_act_loss_coefficient,
        jumprelu_ste_to_input=cfg.jumprelu_ste_to_input)


def _topk(d_in: int, d_sae: int, value: float, warm: int, cfg: "TrainConfig") -> TrainingSAEConfig:
    del warm  # k is a hard constraint; there is no penalty to warm up
    return TopKTrainingSAEConfig(**_common(d_in, d_sae, cfg), k=int(value),
                                 aux_loss_coefficient=cfg.topk_aux_loss_coefficient,
                                 rescale_acts_by_decoder_norm=True)


def _batchtopk(d_in: int, d_sae: int, value: float, warm: int,
               cfg: "TrainConfig") -> TrainingSAEConfig:
    del warm
    return BatchTopKTrainingSAEConfig(**_common(d_in, d_sae, cfg), k=float(value),
                                      aux_loss_coefficient=cfg.topk_aux_loss_coefficient,
                                      rescale_acts_by_decoder_norm=cfg.batchtopk_rescale_acts,
                                      topk_threshold_lr=cfg.batchtopk_threshold_lr)


#: Paper name (lower case) -> architecture spec. The grid's architecture axis (protocol §2).
ARCHITECTURES: dict[str, ArchSpec] = {
    "relu": ArchSpec("relu", "ReLU", "standard", StandardTrainingSAEConfig,
                     SparseStandardTrainingSAE, "StandardSAE", "standard", "l1", _relu,
                     StandardTrainingSAE),
    "gated": ArchSpec("gated", "Gated", "gated", GatedTrainingSAEConfig, SparseGatedTrainingSAE,
                      "GatedSAE", "gated", "l1", _gated, GatedTrainingSAE),
    "jumprelu": ArchSpec("jumprelu", "JumpReLU", "jumprelu", JumpReLUTrainingSAEConfig,
                         CentredJumpReLUTrainingSAE, "JumpReLUSAE", "jumprelu", "l0_target",
                         _jumprelu, JumpReLUTrainingSAE),
    "topk": ArchSpec("topk", "TopK", "topk", TopKTrainingSAEConfig, SparseTopKTrainingSAE,
                     "TopKSAE", "topk", "k", _topk, TopKTrainingSAE),
    "batchtopk": ArchSpec("batchtopk", "BatchTopK", "batchtopk", BatchTopKTrainingSAEConfig,
                          SparseBatchTopKTrainingSAE, "JumpReLUSAE", "jumprelu", "k", _batchtopk,
                          BatchTopKTrainingSAE),
}

#: Other spellings accepted by :func:`get_arch` (sae-lens calls ReLU SAEs "standard").
ALIASES = {"standard": "relu"}


def get_arch(name: str) -> ArchSpec:
    """The spec for an architecture name (case-insensitive); a clear error for unknown names."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {name!r}; valid names are "
                         f"{sorted(ARCHITECTURES)} (alias: {sorted(ALIASES)})")
    return ARCHITECTURES[key]
