"""The steering intervention at the SAE's layer (protocol §4, AxBench).

Two modes, chosen by ``steering.mode``:

* ``add`` (the paper's): ``x ← x + α · m_f · W_dec[f]`` at every position, prompt and generated,
  with ``W_dec[f]`` the SAE's decoder row (unit norm in every SAE this project saves: training
  folds the row norms into the codes) and ``m_f`` the latent's largest activation over the
  evaluation corpus (AutoInterp's ``max_act``).
* ``clamp`` (AxBench's alternative): set f's code inside the SAE reconstruction to ``α · m_f``
  and keep everything else, ``x ← x + (α · m_f − a_f(x)) · W_dec[f]``, where ``a_f(x)`` is the
  SAE's code for f at that position. The decoder is affine, so this equals replacing the
  reconstruction while keeping the SAE's error term.

One batch may mix concepts and factors: every row carries its own vector (``add``) or its own
(latent, value) pair (``clamp``), so a whole grid of (concept × instruction × factor) generations
shares the model's forward passes.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

Mode = Literal["add", "clamp"]
MODES: tuple[str, ...] = ("add", "clamp")


def steering_vectors(W_dec_FD: torch.Tensor, latents_B: Sequence[int], max_acts_B: Sequence[float],
                     alphas_B: Sequence[float]) -> torch.Tensor:
    """``α_b · m_b · W_dec[f_b]`` for each row b: shape ``(B, D)``."""
    if not len(latents_B) == len(max_acts_B) == len(alphas_B):
        raise ValueError("latents, max_acts and alphas must have one entry per row")
    idx = torch.as_tensor(list(latents_B), dtype=torch.long, device=W_dec_FD.device)
    scale = torch.as_tensor([a * m for a, m in zip(alphas_B, max_acts_B)],
                            dtype=W_dec_FD.dtype, device=W_dec_FD.device)
    return W_dec_FD[idx] * scale[:, None]


def add_hook(vectors_BD: torch.Tensor) -> Callable:
    """A TransformerLens hook adding row b's vector at every position of row b."""

    def hook(resid_BLD: torch.Tensor, hook=None) -> torch.Tensor:
        return resid_BLD + vectors_BD[:, None, :].to(resid_BLD.dtype)

    return hook


def clamp_hook(encode: Callable[[torch.Tensor], torch.Tensor], W_dec_FD: torch.Tensor,
               latents_B: Sequence[int], values_B: Sequence[float]) -> Callable:
    """A TransformerLens hook setting row b's code of latent ``f_b`` to ``values_B[b]`` inside the
    reconstruction at every position (``encode`` maps ``(..., D)`` activations to ``(..., F)``)."""
    idx_B = torch.as_tensor(list(latents_B), dtype=torch.long, device=W_dec_FD.device)
    values = torch.as_tensor(list(values_B), dtype=W_dec_FD.dtype, device=W_dec_FD.device)
    rows_BD = W_dec_FD[idx_B]

    def hook(resid_BLD: torch.Tensor, hook=None) -> torch.Tensor:
        codes_BLF = encode(resid_BLD)
        code_BL = torch.gather(codes_BLF, 2, idx_B[:, None, None].expand(-1, resid_BLD.shape[1], 1))[..., 0]
        delta_BL = values[:, None] - code_BL.to(values.dtype)
        return resid_BLD + (delta_BL[..., None] * rows_BD[:, None, :]).to(resid_BLD.dtype)

    return hook


def make_hook(mode: str, *, W_dec_FD: torch.Tensor, latents_B: Sequence[int],
              max_acts_B: Sequence[float], alphas_B: Sequence[float],
              encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable:
    """The hook for ``mode`` (``add`` or ``clamp``) over one batch of rows."""
    if mode == "add":
        return add_hook(steering_vectors(W_dec_FD, latents_B, max_acts_B, alphas_B))
    if mode == "clamp":
        if encode is None:
            raise ValueError("clamp mode needs the SAE's encode function")
        return clamp_hook(encode, W_dec_FD, latents_B, [a * m for a, m in zip(alphas_B, max_acts_B)])
    raise ValueError(f"unknown steering mode {mode!r}; valid: {', '.join(MODES)}")
