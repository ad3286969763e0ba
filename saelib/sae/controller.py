"""An L0 controller: one training run that ends at a target L0 (protocol §2, "Sparsity").

Why: ReLU, Gated and JumpReLU SAEs are set by a knob (the L1 coefficient λ, or the target of the
quadratic L0 penalty) whose relation to the realised L0 depends on the model, layer, width and
token budget. :mod:`saelib.sae.calibrate` finds it with a bracketing search over full-length
probe trainings: 1.6 trainings per SAE on the default's first run, and a streaming profile pays
one pass of the model over the whole corpus per round of probes (4 rounds planned at the paper's
5·10⁸ tokens). This controller instead moves the knob *during* the one training, from the
measured L0 of the batches it trains on, so a profile without calibrated starts trains each SAE
once and the stream passes once.

The law (integral control on log-scale, the knob's usual axis): after the sparsity warm-up, each
step takes the exponential moving average L̄ of the batch L0 (over ``ema_frac`` of the run) and
moves log knob by ∓ log(L̄ / target) / T, with T = ``time_frac`` of the run in steps and the
log-miss clipped to ±1; the sign makes λ grow while L0 is above the target (L0 falls as λ grows).
A persistent factor-of-two miss moves the knob by a factor of 2 every T steps; once L̄ is at the
target the knob stops. The SAE answers a new λ only after many steps, so a plain integral keeps
pushing while L0 is already on its way and overshoots, and an L1 SAE pushed too sparse loses
latents for good (a dead ReLU latent gets no gradient): measured on planted data, L0 ended at 0.1
for a target of 6. So the knob holds while L0's trend (a second average over 4x the span) would
reach the target within T steps. Control runs to the end: the learning rate decays to 0 over the
last 20 %, so the SAE and its L0 settle while the knob's last moves fade. The knob the run ended
at is the SAE's sparsity value in its record.

Control starts at ``start_frac`` of the run (or the end of the sparsity warm-up if later): before,
L0 falls as the untrained SAE learns, whatever λ. Runs shorter than :data:`MIN_STEPS` are
refused: the SAE answers a new λ over tens to hundreds of steps, and in 160-step runs on planted
data the controller overshot into dead latents from some starts. Measured (2026-12-06): on
planted data (``tests/test_sae_controller.py``'s), 400-step runs ended at held-out L0 5.0-5.9
for target 6 from λ starts ~70x below to 5x above the answer, ReLU and Gated; on the default's
SmolLM2 activations (508 steps, λ starting at 1.0), ReLU and Gated ended at 7.1 and 7.4 for
target 6 (λ 10.8 and 13.7), 106 and 103 for target 102.

JumpReLU is not moved by this controller: its thresholds move at most ~lr per step, so in a
508-step run its L0 hardly follows its knob (target 20: L0 81 with the knob driven to 0.001).
It needs none: its knob is the target of sae-lens's quadratic penalty 2/T·(L0 − T)², itself a
pull toward T, so under ``grid.calibrate_by: controller`` it trains once at knob = T (method
``penalty``, :mod:`saelib.stages.train`). It lands above T by a bias where the reconstruction's
gain from one more latent balances the penalty's slope; the reconstruction term is summed over the
input's d dimensions (inputs scaled to norm √d), so the coefficient that keeps the bias small grows
with d. Measured on the default's activations (d 576, lr 3e-3, knob = T): 2,048 steps at
coefficient 1 gave +40 % and +16 % for T 10 and 65; at coefficient 4, +25 %, +19 %, +6 %, +5 % for
T 6, 10, 65, 102 (T 6: +26 % after 4,096 steps, so a settled bias, and +18 % at coefficient 8);
in 512 steps the thresholds had not arrived (T 10: +96 %). The paper profiles train ~240,000
steps at lr 3e-4, about 12x the threshold travel of those 2,048, at targets of 50 to 820.

Not a search: the SAE is trained at a moving knob, which the fixed-knob trainings of the paper
were not. Its realised L0 is still measured on held-out activations, and the calibration record
says whether it landed within ±25 % of the target.
"""

from __future__ import annotations

import math
from typing import Any, Mapping


#: Fewest steps a controlled run may have (module doc).
MIN_STEPS = 300
#: The largest log-miss one step acts on: an untrained SAE's L0 is hundreds of times the target,
#: and acting on all of it would drive λ up until latents die (a dead ReLU latent does not return).
MAX_MISS = 1.0


class L0Controller:
    """The knob of one run, moved each step toward ``target`` realised L0 (module doc).

    ``increasing``: whether realised L0 rises with the knob (JumpReLU's L0 target) or falls (λ).
    ``start_step``: the first step controlled (the end of the sparsity warm-up: while the
    penalty still ramps up, L0 says nothing about the knob). ``time_frac`` and ``ema_frac``
    (:class:`saelib.sae.train.TrainConfig`'s ``l0_control_time_frac`` and ``l0_control_ema_frac``)
    are clipped to at least one step, so a 64-step smoke run reacts within a few steps and a
    244,000-step paper run averages over thousands."""

    def __init__(self, target: float, knob: float, increasing: bool, total_steps: int,
                 start_step: int = 0, time_frac: float = 0.1, ema_frac: float = 0.02):
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target L0 must be positive and finite, got {target}")
        if not (math.isfinite(knob) and knob > 0):
            raise ValueError(f"the knob must start positive and finite, got {knob}")
        if total_steps < MIN_STEPS:
            raise ValueError(f"a run of {total_steps} steps is too short for the L0 controller "
                             f"(it needs >= {MIN_STEPS}); calibrate by search instead")
        for name, value in (("time_frac", time_frac), ("ema_frac", ema_frac)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.target, self.knob, self.start_knob = float(target), float(knob), float(knob)
        self.sign = -1.0 if increasing else 1.0
        self.start_step = int(start_step)
        self.time_steps = max(1.0, time_frac * total_steps)
        self.ema_steps = max(1.0, ema_frac * total_steps)
        self.l0_ema: float | None = None
        self.l0_slow: float | None = None

    def update(self, step: int, batch_l0: float) -> float:
        """Fold in the L0 of the batch just trained on (step ``step``, 0-based); the knob for
        the next step."""
        self.l0_ema = batch_l0 if self.l0_ema is None else \
            self.l0_ema + (batch_l0 - self.l0_ema) / self.ema_steps
        self.l0_slow = batch_l0 if self.l0_slow is None else \
            self.l0_slow + (batch_l0 - self.l0_slow) / (4 * self.ema_steps)
        if step >= self.start_step:
            miss = max(-MAX_MISS, min(MAX_MISS, math.log(max(self.l0_ema, 1e-3) / self.target)))
            # log-L0 per step: a linear trend puts the 4x-span average 3 spans behind the other
            slope = math.log(max(self.l0_ema, 1e-3) / max(self.l0_slow, 1e-3)) / (3 * self.ema_steps)
            closing = miss * slope < 0 and abs(miss) < abs(slope) * self.time_steps
            if not closing:  # hold while L0 is on its way to the target within T steps
                self.knob *= math.exp(self.sign * miss / self.time_steps)
        return self.knob

    def state(self) -> dict[str, Any]:
        return {"knob": self.knob, "l0_ema": self.l0_ema, "l0_slow": self.l0_slow}

    def load(self, state: Mapping[str, Any]) -> None:
        self.knob = float(state["knob"])
        self.l0_ema, self.l0_slow = (None if state[k] is None else float(state[k])
                                     for k in ("l0_ema", "l0_slow"))

    def summary(self) -> dict[str, Any]:
        return {"target_l0": self.target, "start_knob": self.start_knob, "final_knob": self.knob,
                "final_l0_ema": self.l0_ema, "time_steps": self.time_steps,
                "ema_steps": self.ema_steps}
