"""Find the sparsity knob that makes an SAE's realised L0 land near a target L0 (protocol §2).

Why: the paper's grid is indexed by target L0 ∈ {50, 80, 160, 320, 520, 820}; TopK and BatchTopK
hit it by construction (k = target) but ReLU and Gated SAEs are set by an L1 coefficient λ, whose
relation to L0 depends on the model, layer, width and token budget. The paper lists its λ values
(ReLU 0.012-0.06, Gated 0.012-0.08) for its own activation scaling; they do not transfer to other
scalings or budgets, so each (model, layer, arch, target, width, tokens) cell is calibrated with
short training runs: realised L0 falls monotonically as λ grows, so a bracketing search on log λ
(regula falsi in (log λ, log L0), falling back to bisection) stops once L0 is within ±25 % of the
target. JumpReLU's knob is the target of sae-lens's quadratic L0 penalty; it usually lands near
the target, and when it does not the same search runs on that knob (realised L0 rises with it).

Results are cached in one JSON file (guarded by a lock file, since grid workers may calibrate
concurrently), so reruns are free. A cache entry made with different training settings is a miss.
"""

from __future__ import annotations

import fcntl
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from saelib.results import read_json, write_json
from saelib.sae.metrics import reconstruction_metrics
from saelib.sae.registry import get_arch
from saelib.sae.train import TrainConfig, train_sae


@dataclass(frozen=True)
class CalibrationConfig:
    """Search settings. ``tolerance`` is the relative band around the target (protocol: ±25 %)."""

    tolerance: float = 0.25
    max_probes: int = 8
    #: first λ for ReLU / Gated when the cache has no neighbouring target to start from.
    initial_l1: float = 1.0
    #: the knob to try first, ahead of any neighbour in the cache (the profile's
    #: ``grid.calibration_start``: an earlier run's calibrated knob for this very cell).
    start: float | None = None
    #: largest factor by which one step may move the knob before the target is bracketed.
    max_step_factor: float = 8.0

    def band(self, target: float) -> tuple[float, float]:
        """The realised L0s that count as hitting ``target``."""
        return target * (1 - self.tolerance), target * (1 + self.tolerance)

    def validate(self) -> "CalibrationConfig":
        if not 0 < self.tolerance < 1:
            raise ValueError(f"CalibrationConfig: tolerance must be in (0, 1), "
                             f"got {self.tolerance}")
        if self.max_probes < 1:
            raise ValueError(f"CalibrationConfig: max_probes must be >= 1, got {self.max_probes}")
        if not self.initial_l1 > 0:
            raise ValueError(f"CalibrationConfig: initial_l1 must be > 0, got {self.initial_l1}")
        if self.start is not None and not (math.isfinite(self.start) and self.start > 0):
            raise ValueError(f"CalibrationConfig: start must be positive and finite, got {self.start}")
        if not self.max_step_factor > 1:
            raise ValueError(f"CalibrationConfig: max_step_factor must be > 1, "
                             f"got {self.max_step_factor}")
        return self


@dataclass(frozen=True)
class CalibrationKey:
    """What a calibrated knob depends on; the cache is keyed by it."""

    model: str
    layer: int
    arch: str
    target_l0: float
    width: int
    tokens: int

    def as_str(self) -> str:
        return (f"{self.model}|L{self.layer}|{self.arch}|target={self.target_l0:g}|"
                f"width={self.width}|tokens={self.tokens}")


@dataclass(frozen=True)
class Probe:
    """One short training run of the search."""

    knob: float
    realised_l0: float
    explained_variance: float
    seconds: float


@dataclass
class CalibrationResult:
    """The knob to train with, the L0 it gave, and the search that found it."""

    key: CalibrationKey
    knob_name: str
    knob_value: float
    realised_l0: float
    within_band: bool
    band: tuple[float, float]
    trace: list[Probe] = field(default_factory=list)
    from_cache: bool = False
    #: the best probe's trained SAE (a :class:`~saelib.sae.train.TrainResult`) when the search ran
    #: in this call: probes train exactly as the final SAE would (same data, seed, centring,
    #: token budget), so the caller can keep it instead of training the same SAE again. ``None``
    #: from the cache or for TopK/BatchTopK. Never serialised.
    trained: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"key": asdict(self.key), "knob_name": self.knob_name,
                "knob_value": self.knob_value, "realised_l0": self.realised_l0,
                "within_band": self.within_band, "band": list(self.band),
                "trace": [asdict(p) for p in self.trace]}

    @classmethod
    def from_json(cls, js: dict[str, Any]) -> "CalibrationResult":
        return cls(key=CalibrationKey(**js["key"]), knob_name=js["knob_name"],
                   knob_value=float(js["knob_value"]), realised_l0=float(js["realised_l0"]),
                   within_band=bool(js["within_band"]), band=tuple(js["band"]),
                   trace=[Probe(**p) for p in js["trace"]], from_cache=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _train_fingerprint(cfg: TrainConfig, d_in: int, seed: int,
                       mean_D: torch.Tensor | None = None) -> dict[str, Any]:
    skip = {"progress", "checkpoint_every", "mode"}
    mean = None if mean_D is None else float(torch.as_tensor(mean_D).double().norm())
    return {"d_in": d_in, "seed": seed, "mean_norm": mean,
            **{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in skip}}


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    return read_json(path)


def _initial_knob(key: CalibrationKey, knob_name: str, cache: dict[str, Any],
                  fingerprint: dict[str, Any], cfg: CalibrationConfig) -> float:
    """``cfg.start`` when given; else the nearest calibrated target of the same cell, scaled by a
    power law; else :func:`first_knob`."""
    if cfg.start is not None:
        return cfg.start
    best: tuple[float, float, float] | None = None
    for entry in cache.values():
        k = entry["result"]["key"]
        if (entry.get("train") != fingerprint or k["target_l0"] == key.target_l0
                or {**k, "target_l0": key.target_l0} != asdict(key)):
            continue
        l0 = float(entry["result"]["realised_l0"])
        if l0 <= 0:
            continue
        dist = abs(math.log(key.target_l0 / l0))
        if best is None or dist < best[0]:
            best = (dist, float(entry["result"]["knob_value"]), l0)
    if best is None:
        return first_knob(knob_name, key.target_l0, cfg)
    if knob_name == "l0_target":
        return best[1] * key.target_l0 / best[2]
    return best[1] * best[2] / key.target_l0


def first_knob(knob_name: str, target_l0: float, cfg: CalibrationConfig) -> float:
    """A search's first knob without a calibrated neighbour: ``cfg.start`` when given, else the
    target itself (JumpReLU's knob is a target L0) or ``cfg.initial_l1`` (ReLU / Gated)."""
    if cfg.start is not None:
        return cfg.start
    return float(target_l0) if knob_name == "l0_target" else cfg.initial_l1


def bracket_steps(start: float, target: float, increasing: bool,
                  cfg: CalibrationConfig) -> Generator[float, Probe, list[Probe]]:
    """Bracketing search on u = log(knob) for log(L0) = log(target), one probe at a time: yields
    the next knob to train, is sent its :class:`Probe`, and returns the trace when it stops.

    h(u) = ±(log L0 - log target) is made increasing in u. Before a bracket exists, steps assume
    L0 ∝ knob^±1 (clipped to ``max_step_factor``); afterwards, regula falsi inside the bracket,
    with bisection when the interpolant falls in the outer 10 % of the bracket. A generator, so
    that many cells' searches can advance in lockstep, each round's probes trained together on
    one stream (:mod:`saelib.stages.streaming`); :func:`bracket_search` drives one alone.
    """
    lo_band, hi_band = cfg.band(target)
    sign = 1.0 if increasing else -1.0
    neg: tuple[float, float] | None = None  # (u, h) with h < 0
    pos: tuple[float, float] | None = None  # (u, h) with h > 0
    u = math.log(start)
    max_step = math.log(cfg.max_step_factor)
    trace: list[Probe] = []
    for _ in range(cfg.max_probes):
        probe = yield math.exp(u)
        trace.append(probe)
        if lo_band <= probe.realised_l0 <= hi_band:
            break
        h = sign * (math.log(max(probe.realised_l0, 1e-2)) - math.log(target))
        if len(trace) >= 2 and _moved_the_wrong_way(trace[-2], probe, sign, target):
            break  # the response is not monotone here: more probes would only guess

        if h < 0:
            neg = (u, h) if neg is None or u > neg[0] else neg
        else:
            pos = (u, h) if pos is None or u < pos[0] else pos
        if neg is not None and pos is not None:
            (u0, h0), (u1, h1) = neg, pos
            frac = -h0 / (h1 - h0)
            frac = 0.5 if not 0.1 <= frac <= 0.9 else frac
            u = u0 + frac * (u1 - u0)
        else:
            u = u - max(-max_step, min(max_step, h))
    return trace


def bracket_search(measure: Callable[[float], Probe], start: float, target: float,
                   increasing: bool, cfg: CalibrationConfig) -> list[Probe]:
    """:func:`bracket_steps` with each probe measured by ``measure(knob)`` as it is asked for."""
    steps = bracket_steps(start, target, increasing, cfg)
    try:
        knob = next(steps)
        while True:
            knob = steps.send(measure(knob))
    except StopIteration as stop:
        return stop.value


def l0_miss(l0: float, target: float) -> float:
    """How far a realised L0 is from its target, |log(L0 / target)|: the best probe of a search
    is the one with the smallest."""
    return abs(math.log(max(l0, 1e-2) / target))


def _moved_the_wrong_way(before: Probe, after: Probe, sign: float, target: float) -> bool:
    """A step taken towards the target that moved L0 further from it, against the monotone
    response the search assumes (JumpReLU's target-L0 knob in short runs: on the default's
    activations target 6 gave L0 10.8, target 3 gave 16.6, target 1.5 gave 34)."""
    d_before = math.log(max(before.realised_l0, 1e-2) / target)
    d_after = math.log(max(after.realised_l0, 1e-2) / target)
    stepped_down = after.knob < before.knob
    expected_down = (d_before > 0) == (sign > 0)
    return stepped_down == expected_down and abs(d_after) > abs(d_before) \
        and (d_after > 0) == (d_before > 0)


def calibrate_sparsity(arch: str, target_l0: float, *, model: str, layer: int, d_in: int,
                       d_sae: int, make_batches: Callable[[], Iterable[torch.Tensor]],
                       probe_tokens: int, cache_path: str | Path | None = None,
                       train_cfg: TrainConfig | None = None,
                       calib_cfg: CalibrationConfig | None = None,
                       heldout_acts_ND: torch.Tensor | None = None,
                       seed: int = 0, mean_D: torch.Tensor | None = None) -> CalibrationResult:
    """The sparsity value to pass to :func:`~saelib.sae.train.train_sae` for ``target_l0``.

    Args:
        make_batches: returns a fresh iterator of raw activation batches (one per probe).
        probe_tokens: training tokens per probe; part of the cache key, since realised L0 at a
            given λ drifts with the budget. Use the final budget to calibrate exactly.
        heldout_acts_ND: when given, realised L0 is measured on it (inference SAE); otherwise on
            the last training batches.
        mean_D: the activation mean the final training centres with; probes must train exactly as
            the final SAE will (same data, seed, centring), or the final L0 misses the band the
            probe found (measured: a Gated smoke SAE at L0 7.0 for a probe's 10).

    TopK/BatchTopK need no search: the knob is k = target, returned without training.
    """
    spec = get_arch(arch)
    tcfg = replace((train_cfg or TrainConfig()).validate(), progress=False, checkpoint_every=0)
    ccfg = (calib_cfg or CalibrationConfig()).validate()
    if not target_l0 > 0 or target_l0 > d_sae:
        raise ValueError(f"target_l0 must be in (0, d_sae={d_sae}], got {target_l0}")
    if probe_tokens < tcfg.batch_size:
        raise ValueError(f"probe_tokens={probe_tokens} is less than one batch "
                         f"({tcfg.batch_size})")
    key = CalibrationKey(model=model, layer=int(layer), arch=spec.name,
                         target_l0=float(target_l0), width=int(d_sae), tokens=int(probe_tokens))
    band = ccfg.band(target_l0)
    if spec.sparsity_knob == "k":
        k = float(int(round(target_l0))) if spec.name == "topk" else float(target_l0)
        return CalibrationResult(key=key, knob_name="k", knob_value=k, realised_l0=k,
                                 within_band=True, band=band)

    path = Path(cache_path) if cache_path is not None else None
    fingerprint = _train_fingerprint(tcfg, d_in, seed, mean_D)
    if path is not None:
        with _locked(path):
            cache = _read_cache(path)
        hit = cache.get(key.as_str())
        if hit is not None and hit.get("train") == fingerprint:
            return CalibrationResult.from_json(hit["result"])
    else:
        cache = {}

    def miss(l0: float) -> float:
        return l0_miss(l0, target_l0)

    kept: dict[str, Any] = {}

    def measure(knob: float) -> Probe:
        t0 = time.perf_counter()
        res = train_sae(spec.name, d_in, d_sae, knob, make_batches(), probe_tokens, tcfg,
                        mean_D=mean_D, seed=seed)
        if heldout_acts_ND is not None:
            m = reconstruction_metrics(res.sae, heldout_acts_ND)
            l0, ev = m.l0, m.explained_variance
        else:
            l0, ev = res.l0, res.explained_variance
        probe = Probe(knob=knob, realised_l0=l0, explained_variance=ev,
                      seconds=time.perf_counter() - t0)
        if not kept or miss(l0) < miss(kept["probe"].realised_l0):
            kept.update(probe=probe, trained=res)  # only the best so far stays in memory
        return probe

    start = _initial_knob(key, spec.sparsity_knob, cache, fingerprint, ccfg)
    trace = bracket_search(measure, start, float(target_l0),
                    increasing=spec.sparsity_knob == "l0_target", cfg=ccfg)
    best = min(trace, key=lambda p: miss(p.realised_l0))
    result = CalibrationResult(key=key, knob_name=spec.sparsity_knob, knob_value=best.knob,
                               realised_l0=best.realised_l0,
                               within_band=band[0] <= best.realised_l0 <= band[1], band=band,
                               trace=trace,
                               trained=kept["trained"] if kept.get("probe") is best else None)
    if path is not None:
        with _locked(path):
            cache = _read_cache(path)
            cache[key.as_str()] = {"train": fingerprint, "result": result.to_json()}
            write_json(path, cache)
    return result
