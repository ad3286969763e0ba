"""saelib.sae.encoder: every architecture's encoder skips the input gradient and trains exactly
what sae-lens's own class trains.

Checked against sae-lens 6.54's classes on the same weights and inputs: codes and pre-activations
bit for bit, losses and every parameter gradient to 1e-5 (b_dec's encoder-side gradient is the
same sum in another order), short training runs to 1e-4; and the claim itself, counted: one
B·F·D matmul fewer per step (two for Gated, whose auxiliary loss re-encodes).
"""

import itertools

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput
from torch.utils._python_dispatch import TorchDispatchMode

from saelib.sae.registry import ARCHITECTURES, get_arch
from saelib.sae.train import TrainConfig, train_sae

D_IN, D_SAE, B = 24, 96, 128
KNOB = {"relu": 0.5, "gated": 0.5, "jumprelu": 8.0, "topk": 6, "batchtopk": 6}
TOL = dict(rtol=1e-5, atol=1e-5)


def pair(arch: str):
    """(saelib's training SAE, sae-lens's) with identical random weights."""
    spec = get_arch(arch)
    cfg = spec.make_config(D_IN, D_SAE, KNOB[arch], 0, TrainConfig())
    torch.manual_seed(3)
    ours = spec.training_class(sparse_decode=True)(cfg)
    theirs = spec.training_class(sparse_decode=False)(cfg)
    assert type(ours) is not type(theirs) and isinstance(ours, type(theirs))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
            if name == "threshold":
                p.abs_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def step(sae, x):
    sae.zero_grad()
    out = sae.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={"l1": 0.5, "l0": 0.5}, dead_neuron_mask=None, n_training_steps=0,
        is_logging_step=False))
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in sae.named_parameters()
                 if p.grad is not None}


class LargeMatmuls(TorchDispatchMode):
    """Counts matrix products of at least ``B·D·F / 2`` multiply-adds."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            if a.shape[0] * a.shape[1] * b.shape[1] >= B * D_IN * D_SAE // 2:
                self.n += 1
        return out


def inputs(seed: int = 7) -> torch.Tensor:
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 1


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_same_step_as_sae_lens(arch):
    ours, theirs = pair(arch)
    x = inputs()
    out_o, grads_o = step(ours, x)
    out_t, grads_t = step(theirs, x)
    torch.testing.assert_close(out_o.feature_acts, out_t.feature_acts, rtol=0, atol=0)
    torch.testing.assert_close(out_o.hidden_pre, out_t.hidden_pre, rtol=0, atol=0)
    assert set(out_o.losses) == set(out_t.losses)
    for name in out_t.losses:
        torch.testing.assert_close(out_o.losses[name], out_t.losses[name], **TOL, msg=name)
    torch.testing.assert_close(out_o.sae_out, out_t.sae_out, **TOL)
    assert set(grads_o) == set(grads_t) and "b_dec" in grads_t
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], **TOL, msg=name)
    assert grads_t["b_dec"].abs().max() > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_one_large_matmul_fewer_per_step(arch):
    """The encoder's input gradient (one B·F·D product per encoding: two for Gated) is not
    computed; Gated computes its gate's pre-activation once, not twice; TopK and BatchTopK also
    skip the dense decode's three (forward, code and weight gradients; tests/test_sae_sparse.py)."""
    counts = {}
    for cls_name, sae in zip(("ours", "theirs"), pair(arch)):
        with LargeMatmuls() as mm:
            step(sae, inputs())
        counts[cls_name] = mm.n
    fewer = {"gated": 2 + 1, "topk": 1 + 3, "batchtopk": 1 + 3}.get(arch, 1)
    assert counts["theirs"] - counts["ours"] == fewer, counts


def test_an_input_that_needs_a_gradient_gets_it():
    """Attribution through a training SAE: the shortcut steps aside and x gets sae-lens's
    gradient."""
    grads = []
    for sae in pair("relu"):
        x = inputs().requires_grad_(True)
        feature_acts, _ = sae.encode_with_hidden_pre(x)
        feature_acts.sum().backward()
        grads.append(x.grad)
    assert grads[0] is not None and grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu"])
def test_short_training_run_matches_sae_lens(arch):
    """30 Adam steps give the same SAE with saelib's class as with sae-lens's (TopK and BatchTopK:
    tests/test_sae_sparse.py)."""
    results = {}
    for ours in (True, False):
        cfg = TrainConfig(batch_size=B, lr=3e-3, progress=False, norm_estimate_batches=2,
                          sparse_decode=ours)
        batches = (inputs(seed) for seed in itertools.count())
        results[ours] = train_sae(arch, D_IN, D_SAE, KNOB[arch], batches, 30 * B, cfg)
    assert results[True].l0 == pytest.approx(results[False].l0, abs=1e-3)
    theirs = results[False].sae.state_dict()
    for name, value in results[True].sae.state_dict().items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-4, atol=1e-4, msg=name)
