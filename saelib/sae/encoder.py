"""Training SAEs whose encoder backward skips the input gradient (all five architectures).

Why: every architecture here subtracts the decoder bias from its input before encoding
(``apply_b_dec_to_input``, protocol §2: pre = (x − b_dec) W_enc + b_enc). In sae-lens 6.54 that
subtraction makes the encoder's input depend on ``b_dec``, so autograd computes the gradient of
the whole (B, D) input, ∂L/∂pre · W_encᵀ: a B·F·D matmul as large as the encoder's forward, only
to sum it over the batch into the D numbers of ``b_dec``'s gradient. On this CPU a ReLU step is
six such matmuls and a TopK step (sparse decode) three, so that one is ~1/7 and ~1/6 of a step.
Linear algebra gives the same gradient for B·F + F·D work instead: with x̄ = x − b_dec held
constant,

    pre = x̄ W_enc + b_enc + (b̄ − b_dec) W_enc,   b̄ = b_dec detached,

the last term is exactly zero in value (so every pre-activation, code and loss keeps its bits),
W_enc's gradient is x̄ᵀ ∂L/∂pre as before, and ``b_dec``'s encoder-side gradient is
−(Σ_batch ∂L/∂pre) W_encᵀ, one vector-matrix product (the same sum in another order: ~1e-7
apart). The subclasses below rewrite only sae-lens's ``encode_with_hidden_pre`` (and Gated's
auxiliary loss, which re-encodes) this way; configs, parameters, losses, hooks and saving are
sae-lens's. When the input itself needs a gradient (attribution through a training SAE), they
fall back to sae-lens's computation.
"""

from __future__ import annotations

import torch
from sae_lens.saes import GatedTrainingSAE, JumpReLUTrainingSAE, StandardTrainingSAE
from sae_lens.saes.jumprelu_sae import JumpReLU
from sae_lens.saes.sae import TrainStepInput
from typing_extensions import override


class CentredEncoderMixin:
    """The encoder's pre-activations without the input gradient (module doc)."""

    def _bias_needs_grad(self, x: torch.Tensor) -> bool:
        """Whether the shortcut applies: b_dec is subtracted and trained, the input is not."""
        return (bool(self.cfg.apply_b_dec_to_input) and torch.is_grad_enabled()
                and self.b_dec.requires_grad and not x.requires_grad)

    def centred_input(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """sae-lens's ``process_sae_in(x)`` (x − b_dec), detached when the shortcut applies; the
        flag says whether :meth:`project` must add b_dec's gradient path back."""
        shortcut = self._bias_needs_grad(x)
        sae_in = self.process_sae_in(x)
        return (sae_in.detach() if shortcut else sae_in), shortcut

    def project(self, sae_in: torch.Tensor, shortcut: bool, W_DF: torch.Tensor,
                bias_F: torch.Tensor) -> torch.Tensor:
        """``sae_in @ W_DF + bias_F``, plus the zero-valued term that carries b_dec's gradient
        through ``W_DF`` as a vector product when ``sae_in`` was detached."""
        pre = sae_in @ W_DF + bias_F
        if shortcut:
            b_D = self.b_dec * self.cfg.apply_b_dec_to_input
            pre = pre + (b_D.detach() - b_D) @ W_DF
        return pre

    def encoder_pre(self, x: torch.Tensor) -> torch.Tensor:
        """sae-lens's hooked ``(x − b_dec) W_enc + b_enc`` (ReLU, JumpReLU, TopK, BatchTopK),
        projected by :meth:`project`."""
        sae_in, shortcut = self.centred_input(x)
        return self.hook_sae_acts_pre(self.project(sae_in, shortcut, self.W_enc, self.b_enc))


class CentredStandardTrainingSAE(CentredEncoderMixin, StandardTrainingSAE):
    """sae-lens's ReLU (``standard``) training SAE; same numbers, no input-gradient matmul."""

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.encoder_pre(x)
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre


class CentredJumpReLUTrainingSAE(CentredEncoderMixin, JumpReLUTrainingSAE):
    """sae-lens's JumpReLU training SAE; same numbers, no input-gradient matmul."""

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.encoder_pre(x)
        feature_acts = self.hook_sae_acts_post(JumpReLU.apply(
            hidden_pre, self.threshold.to(hidden_pre.dtype), self.bandwidth,
            self.cfg.jumprelu_ste_to_input))
        return feature_acts, hidden_pre


class CentredGatedTrainingSAE(CentredEncoderMixin, GatedTrainingSAE):
    """sae-lens's Gated training SAE; same numbers, no input-gradient matmul in the magnitude
    and gate paths, and the gate's pre-activation computed once per step.

    sae-lens computes the gate's pre-activation π_gate twice on the same input: in the encode (for
    the Heaviside gate, which passes no gradient) and again in the auxiliary loss (its L1 and its
    reconstruction, which do). Here the encode keeps it, with its gradient path, and the auxiliary
    loss of the same step and input reuses it: one B·F·D matmul fewer, same values.
    """

    _gate_pre: tuple[torch.Tensor, torch.Tensor] | None = None

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sae_in, shortcut = self.centred_input(x)
        gate_pre = self.project(sae_in, shortcut, self.W_enc, self.b_gate)
        self._gate_pre = (x, gate_pre) if shortcut else None
        active_features = (gate_pre > 0).to(self.dtype)
        magnitude_pre = self.hook_sae_acts_pre(
            self.project(sae_in, shortcut, self.W_enc * self.r_mag.exp(), self.b_mag))
        feature_acts = self.hook_sae_acts_post(active_features * self.activation_fn(magnitude_pre))
        return feature_acts, magnitude_pre

    @override
    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts: torch.Tensor,
                           hidden_pre: torch.Tensor, sae_out: torch.Tensor
                           ) -> dict[str, torch.Tensor]:
        """sae-lens 6.54's Gated auxiliary losses (the gate's L1 and its reconstruction)."""
        x = step_input.sae_in
        shortcut = self._bias_needs_grad(x)
        kept, self._gate_pre = self._gate_pre, None
        if shortcut and kept is not None and kept[0] is x:
            pi_gate = kept[1]
        else:
            centred = x - self.b_dec * self.cfg.apply_b_dec_to_input
            pi_gate = self.project(centred.detach() if shortcut else centred, shortcut,
                                   self.W_enc, self.b_gate)
        pi_gate_act = torch.relu(pi_gate)
        l1_loss = (step_input.coefficients["l1"]
                   * torch.sum(pi_gate_act * self.W_dec.norm(dim=1), dim=-1).mean())
        via_gate_reconstruction = self.gate_reconstruction(pi_gate_act)
        aux_recon_loss = (via_gate_reconstruction - x).pow(2).sum(dim=-1).mean()
        return {"l1_loss": l1_loss, "auxiliary_reconstruction_loss": aux_recon_loss}

    def gate_reconstruction(self, pi_gate_act: torch.Tensor) -> torch.Tensor:
        """sae-lens's reconstruction from the gate, ``ReLU(π_gate) @ W_dec + b_dec`` (the decoder
        is not detached in sae-lens 6.54)."""
        return pi_gate_act @ self.W_dec + self.b_dec
