"""Amplified-feature logits on the neutral prefix (protocol §6): the three variants, fast == naive.

A tiny random HookedTransformer (conftest) and a hand-made affine SAE: W_dec unit rows, ReLU codes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from saelib.selection.amplify import (VARIANTS, amplified_logits_fast, amplified_logits_naive,
                                      amplify_resid, logit_lens_tokens, prefix_state)
from saelib.selection.confidence import delta_topk_confidence

LAYER = 1
F = 13


class TinySAE:
    def __init__(self, d: int, f: int = F, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W_enc_DF = torch.randn(d, f, generator=g) / d ** 0.5
        self.b_enc_F = torch.randn(f, generator=g) * 0.1
        W = torch.randn(f, d, generator=g)
        self.W_dec_FD = W / W.norm(dim=1, keepdim=True)
        self.b_dec_D = torch.randn(d, generator=g) * 0.1

    def encode(self, x):
        return torch.relu((x - self.b_dec_D) @ self.W_enc_DF + self.b_enc_F)


@pytest.fixture(params=["standard", "rotary"])
def model(request):
    from transformer_lens import HookedTransformer

    from conftest import tiny_config

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tl = HookedTransformer(tiny_config(positional_embedding_type=request.param))
    return tl.eval()


PREFIX = [1, 17, 42, 5, 63, 8]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_equals_naive_for_every_variant(model, variant):
    sae = TinySAE(model.cfg.d_model)
    state = prefix_state(model, sae.encode, PREFIX, LAYER)
    feats = list(range(F))
    naive = amplified_logits_naive(model, state, sae.W_dec_FD, sae.b_dec_D, feats, 10.0, variant)
    fast = amplified_logits_fast(model, state, sae.W_dec_FD, sae.b_dec_D, feats, 10.0, variant,
                                 batch_size=5)
    assert fast.shape == naive.shape == (F, model.cfg.d_vocab)
    assert (fast - naive).abs().max().item() <= 1e-4
    d_fast = delta_topk_confidence(fast, state.base_logits_V, k=1)
    d_naive = delta_topk_confidence(naive, state.base_logits_V, k=1)
    assert (d_fast - d_naive).abs().max().item() <= 1e-4
    assert d_fast.abs().max() > 1e-3  # the amplification does move the distribution


def test_base_logits_are_the_unamplified_forward(model):
    sae = TinySAE(model.cfg.d_model)
    state = prefix_state(model, sae.encode, PREFIX, LAYER)
    with torch.no_grad():
        assert torch.allclose(state.base_logits_V, model(torch.tensor([PREFIX]))[0, -1], atol=1e-5)


def test_variants_change_the_residual_as_documented():
    sae = TinySAE(8, f=4, seed=2)
    x_D = torch.randn(8)
    codes_F = torch.tensor([0.0, 2.0, 0.5, 0.0])
    f = torch.tensor([0, 2])
    arad = amplify_resid("arad", x_D, codes_F, sae.W_dec_FD, sae.b_dec_D, f, 10.0)
    assert torch.allclose(arad, x_D + 10.0 * 2.0 * sae.W_dec_FD[f])
    scale = amplify_resid("scale", x_D, codes_F, sae.W_dec_FD, sae.b_dec_D, f, 10.0)
    assert torch.allclose(scale[0], x_D)  # a silent feature scaled stays silent
    assert torch.allclose(scale[1], x_D + 9.0 * 0.5 * sae.W_dec_FD[2])
    dec = amplify_resid("decode", x_D, codes_F, sae.W_dec_FD, sae.b_dec_D, f, 10.0)
    assert torch.allclose(dec, 10.0 * sae.W_dec_FD[f] + sae.b_dec_D)
    with pytest.raises(ValueError, match="unknown amplification variant"):
        amplify_resid("clamp", x_D, codes_F, sae.W_dec_FD, sae.b_dec_D, f, 10.0)


def test_scale_variant_of_a_silent_feature_leaves_the_logits_unchanged(model):
    sae = TinySAE(model.cfg.d_model)
    state = prefix_state(model, sae.encode, PREFIX, LAYER)
    silent = [f for f in range(F) if state.codes_F[f] == 0]
    assert silent, "the fixture SAE should have a silent feature at the last position"
    fast = amplified_logits_fast(model, state, sae.W_dec_FD, sae.b_dec_D, silent, 10.0, "scale")
    assert torch.allclose(fast, state.base_logits_V.expand_as(fast), atol=1e-4)


def test_one_token_prefix_needs_no_cache(model):
    sae = TinySAE(model.cfg.d_model)
    state = prefix_state(model, sae.encode, [1], LAYER)
    naive = amplified_logits_naive(model, state, sae.W_dec_FD, sae.b_dec_D, [0, 3], 10.0)
    fast = amplified_logits_fast(model, state, sae.W_dec_FD, sae.b_dec_D, [0, 3], 10.0)
    assert (fast - naive).abs().max().item() <= 1e-4


def test_logit_lens_tokens_are_the_top_unembedded_tokens(model):
    sae = TinySAE(model.cfg.d_model)
    ids = logit_lens_tokens(model, sae.W_dec_FD, top=20, batch_size=4)
    assert ids.shape == (F, 20)
    with torch.no_grad():
        want = model.unembed(model.ln_final(sae.W_dec_FD[:, None, :]))[:, 0].topk(20).indices
    assert torch.equal(ids, want)
