"""CE-loss recovered and KL score (protocol §3) on a tiny random transformer, and the
zero-ablation cache shared by a model's SAEs: the same numbers with or without it, one run fewer
per SAE with it, and a stale or damaged cache recomputed."""

from __future__ import annotations

import pytest
import torch

from saelib.evals.core import lm_metrics

LAYER = 1


def inputs(tl, seed=0, n=6, length=12):
    g = torch.Generator().manual_seed(seed)
    tokens_NL = torch.randint(1, tl.cfg.d_vocab, (n, length), generator=g)
    with torch.no_grad():
        acts_NLD = tl(tokens_NL, stop_at_layer=LAYER + 1)  # the residual after block LAYER
    return acts_NLD.numpy(), tokens_NL.numpy()


def noisy(x):
    return x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


def count_runs(tl):
    """Number of forwards that start above the SAE's layer (one per batch and kind of run)."""
    calls = []
    tl.blocks[LAYER + 1].hook_resid_pre.add_hook(lambda x, hook: calls.append(1))
    return calls


def test_identity_reconstruction_recovers_everything(tiny_tl):
    acts, tokens = inputs(tiny_tl)
    m = lm_metrics(tiny_tl, lambda x: x.clone(), acts, tokens, LAYER)
    assert m.ce_sae == pytest.approx(m.ce_clean, abs=1e-6)
    assert m.ce_loss_recovered == pytest.approx(1.0, abs=1e-5)
    assert m.kl_sae == pytest.approx(0.0, abs=1e-6) and m.kl_score == pytest.approx(1.0, abs=1e-5)
    assert m.kl_zero > 0 and m.n_tokens == tokens.size - len(tokens)  # random model: CE may fall


def test_zero_ablation_cache_gives_the_same_numbers_with_one_run_fewer(tiny_tl, tmp_path, capsys):
    acts, tokens = inputs(tiny_tl)
    cache = tmp_path / "zero_ablation.json"
    calls = count_runs(tiny_tl)
    plain = lm_metrics(tiny_tl, noisy, acts, tokens, LAYER, batch_size=4)
    batches = 2
    assert len(calls) == 3 * batches
    first = lm_metrics(tiny_tl, noisy, acts, tokens, LAYER, batch_size=4, zero_cache=cache)
    assert cache.exists() and len(calls) == 6 * batches
    second = lm_metrics(tiny_tl, noisy, acts, tokens, LAYER, batch_size=4, zero_cache=cache)
    assert len(calls) == 8 * batches  # clean and patched only: the zero-ablated sums are read
    assert plain == first == second  # bit for bit: the cache holds the floats a run accumulates
    assert 0 < first.ce_loss_recovered < 1

    # other tokens (a re-captured corpus): the key misses, the run is redone, the cache replaced
    acts2, tokens2 = inputs(tiny_tl, seed=3)
    other = lm_metrics(tiny_tl, noisy, acts2, tokens2, LAYER, batch_size=4, zero_cache=cache)
    assert len(calls) == 11 * batches
    assert other == lm_metrics(tiny_tl, noisy, acts2, tokens2, LAYER, batch_size=4)
    assert other.ce_zero != first.ce_zero

    # a damaged file is named and recomputed, never trusted
    cache.write_text('{"key": "tru')
    again = lm_metrics(tiny_tl, noisy, acts2, tokens2, LAYER, batch_size=4, zero_cache=cache)
    assert again == other and "zero-ablated run is recomputed" in capsys.readouterr().err


def test_misaligned_inputs_are_rejected(tiny_tl):
    acts, tokens = inputs(tiny_tl)
    with pytest.raises(ValueError, match="do not align"):
        lm_metrics(tiny_tl, noisy, acts[:, :-1], tokens, LAYER)
