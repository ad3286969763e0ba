"""Tests for saelib.selection.confidence on hand-made next-token distributions (protocol §6)."""

from __future__ import annotations

import math

import pytest
import torch

from saelib.selection.confidence import delta_topk_confidence, output_score, topk_confidence


def _logits(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def test_uniform_gives_log_v_for_every_k():
    logits = torch.zeros(3, 10)
    for k in (1, 3, 10):
        assert torch.allclose(topk_confidence(logits, k), torch.full((3,), math.log(10)))


def test_one_hot_ish_is_near_zero_and_stable():
    logits = torch.tensor([[1000.0, 0.0, 0.0, 0.0]])
    assert topk_confidence(logits, 1).item() == pytest.approx(0.0, abs=1e-6)
    # log_softmax keeps the second token's surprisal finite (≈ 1000), where log(softmax) is inf.
    c2 = topk_confidence(logits, 2).item()
    assert math.isfinite(c2) and c2 == pytest.approx(500.0, rel=1e-6)


def test_hand_made_k_values_and_ties():
    p = [0.5, 0.25, 0.125, 0.125]
    logits = _logits(p)
    assert topk_confidence(logits, 1).item() == pytest.approx(math.log(2))
    assert topk_confidence(logits, 2).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    # k = 3 takes one of the two tied 0.125 tokens; which one does not matter.
    assert topk_confidence(logits, 3).item() == pytest.approx(
        (math.log(2) + math.log(4) + math.log(8)) / 3)
    # k = |V|: the mean surprisal over the whole vocabulary.
    assert topk_confidence(logits, 4).item() == pytest.approx(
        -sum(math.log(q) for q in p) / 4)


def test_logit_shift_invariance_and_leading_dims():
    logits = torch.randn(2, 5, 7)
    assert topk_confidence(logits, 2).shape == (2, 5)
    assert torch.allclose(topk_confidence(logits + 3.0, 2), topk_confidence(logits, 2), atol=1e-5)


def test_delta_sign_convention_and_broadcast():
    base = torch.tensor([2.0, 0.0, 0.0, 0.0])          # fairly confident
    flatter = torch.zeros(4)                            # uniform: less confident
    sharper = torch.tensor([8.0, 0.0, 0.0, 0.0])        # more confident
    delta = delta_topk_confidence(torch.stack([flatter, sharper, base]), base, k=1)
    assert delta[0] > 0 and delta[1] < 0 and delta[2] == pytest.approx(0.0, abs=1e-6)
    expected0 = math.log(4) - (-math.log(math.exp(2) / (math.exp(2) + 3)))
    assert delta[0].item() == pytest.approx(expected0, rel=1e-5)
    per_row = delta_topk_confidence(torch.stack([flatter, sharper]), torch.stack([base, base]))
    assert torch.allclose(per_row, delta[:2])


def test_confidence_input_errors():
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 4\]"):
        topk_confidence(torch.zeros(4), 5)
    with pytest.raises(ValueError, match="k must be"):
        topk_confidence(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="NaN"):
        topk_confidence(torch.tensor([0.0, math.nan]), 1)
    with pytest.raises(ValueError, match="floating-point"):
        topk_confidence(torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        delta_topk_confidence(torch.zeros(2, 4), torch.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        delta_topk_confidence(torch.zeros(2, 4), torch.zeros(3, 4))


def test_output_score_hand_made():
    # p = (0.4, 0.3, 0.2, 0.1) over V = 4 tokens; ranks 0..3 (rank 0 = most probable).
    logits = _logits([[0.4, 0.3, 0.2, 0.1]] * 3)
    lens = torch.tensor([[0, 3], [2, 3], [3, 3]])
    s = output_score(logits, lens)
    assert s[0].item() == pytest.approx((1 - 0 / 4) * 0.4)  # a lens token is the argmax
    assert s[1].item() == pytest.approx((1 - 2 / 4) * 0.2)  # best lens token at rank 2
    assert s[2].item() == pytest.approx((1 - 3 / 4) * 0.1)  # repeated ids are harmless


def test_output_score_ties_share_best_rank():
    logits = _logits([[0.3, 0.3, 0.2, 0.2]])
    # Token 1 ties with token 0 for the top: rank 0, not 1.
    assert output_score(logits, torch.tensor([[1]])).item() == pytest.approx(0.3)
    # Token 3 ties with token 2 behind two larger ones: rank 2.
    assert output_score(logits, torch.tensor([[3]])).item() == pytest.approx((1 - 2 / 4) * 0.2)


def test_output_score_matches_arad_argsort_without_ties():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    lens = torch.randint(0, 50, (5, 20))
    got = output_score(logits, lens)
    probs = torch.softmax(logits, -1)
    for f in range(5):
        order = torch.argsort(probs[f], descending=True)
        ranks = [int((order == t).nonzero()) for t in lens[f]]
        ref = (1 - min(ranks) / 50) * probs[f, lens[f]].max().item()
        assert got[f].item() == pytest.approx(ref, rel=1e-6)


def test_output_score_input_errors():
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        output_score(torch.zeros(1, 4), torch.tensor([[4]]))
    with pytest.raises(ValueError, match=r"shape \(2, T\)"):
        output_score(torch.zeros(2, 4), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="integer token ids"):
        output_score(torch.zeros(1, 4), torch.tensor([[0.0]]))
    with pytest.raises(ValueError, match=r"shape \(F, V\)"):
        output_score(torch.zeros(4), torch.tensor([[0]]))
