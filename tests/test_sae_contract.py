"""Contract over every architecture (SAELens's habit): each one recovers a planted dictionary.

The data: 128 random unit-norm directions in d = 32, each sample a sum of ~4 of them (Bernoulli
4/128 each) with magnitudes in [0.5, 1.5], plus noise 0.01. Every architecture, trained at its
own sparsity knob set for L0 = 4 (k = 4; JumpReLU's target L0 = 4; the L1 coefficient that lands
near 4 for ReLU and Gated), must find the directions: MMCS (mean over true directions of the best
cosine with a decoder row) >= 0.90, where random decoder rows give ~0.45, and realised L0 within
±50 % of the planted 4 (up to 3 × 4 for ReLU and Gated, whose L1 knob is not an L0 target: they
land at 5.4 and 7.1 here). This is what caught JumpReLU learning nothing (MMCS 0.53, 88 % dead) and
BatchTopK's decoder-norm rescaling (0.81).
"""

import pytest
import torch

from saelib.sae.registry import ARCHITECTURES
from saelib.sae.train import TrainConfig, train_sae

N_DIRS, D, K, BATCH, STEPS = 128, 32, 4, 256, 1000
#: The knob that aims at L0 = K for each architecture (ReLU's and Gated's L1 coefficients land
#: at L0 5.4 and 7.1 here: L1 is not an L0 target, and calibration would fine-tune it).
KNOB = {"relu": 4.0, "gated": 4.0, "jumprelu": float(K), "topk": float(K), "batchtopk": float(K)}


def planted_directions() -> torch.Tensor:
    dirs = torch.randn(N_DIRS, D, generator=torch.Generator().manual_seed(1234))
    return dirs / dirs.norm(dim=-1, keepdim=True)


def planted_stream(dirs: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        on = (torch.rand(BATCH, N_DIRS, generator=g) < K / N_DIRS).float()
        mag = torch.rand(BATCH, N_DIRS, generator=g) + 0.5
        yield (on * mag) @ dirs + 0.01 * torch.randn(BATCH, D, generator=g)


def mmcs(W_dec_FD: torch.Tensor, dirs_ND: torch.Tensor) -> float:
    """Mean over true directions of the best cosine with any decoder row."""
    W = W_dec_FD / W_dec_FD.norm(dim=-1, keepdim=True)
    return float((dirs_ND @ W.T).max(dim=1).values.mean())


def test_random_rows_do_not_pass_the_bar():
    dirs = planted_directions()
    rand = torch.randn(N_DIRS, D, generator=torch.Generator().manual_seed(7))
    assert mmcs(rand, dirs) < 0.6


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_recovers_a_planted_dictionary(arch):
    assert set(KNOB) == set(ARCHITECTURES)
    dirs = planted_directions()
    res = train_sae(arch, D, N_DIRS, KNOB[arch], planted_stream(dirs), BATCH * STEPS,
                    TrainConfig(batch_size=BATCH, lr=3e-3, progress=False))
    W_dec = res.sae.W_dec.detach()
    assert torch.allclose(W_dec.norm(dim=-1), torch.ones(N_DIRS), atol=1e-4)
    assert mmcs(W_dec, dirs) >= 0.90, f"{arch}: MMCS {mmcs(W_dec, dirs):.3f}"
    assert 0.5 * K <= res.l0 <= 1.5 * K * (2 if arch in ("relu", "gated") else 1), res.l0
    assert res.dead_fraction <= 0.15
    # the saved SAE is the trained function on raw inputs: its own L0 on fresh data is near K
    x = next(planted_stream(dirs, seed=5))
    l0 = float((res.sae.encode(x) > 0).float().sum(-1).mean())
    assert 0.5 * K <= l0 <= 2.0 * K, l0
