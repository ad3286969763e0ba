"""The AutoInterp window sampler (protocol §3) on hand-made activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelib.evals.windows import (
    ArrayCodes,
    EncodedCodes,
    WindowSpec,
    centre_mask_NL,
    gather_codes,
    hashed_uniform,
    sample_windows,
    scan_top,
    stream_windows,
    window_bounds,
)

BOS, PAD = 1, 0


def corpus(N=30, L=48, F=12, density=0.15, seed=0):
    """Random sparse codes over a corpus whose contexts start with BOS."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 200, size=(N, L))
    tokens[:, 0] = BOS
    mask = rng.random((N, L, F)) < density
    codes = (rng.exponential(size=(N, L, F)) * mask).astype(np.float32)
    return tokens, codes


def test_window_bounds_shift_inside_context():
    assert window_bounds(30, 64, 10) == (20, 41)
    assert window_bounds(2, 64, 10) == (0, 21)
    assert window_bounds(63, 64, 10) == (43, 64)
    assert window_bounds(3, 8, 10) == (0, 8)
    with pytest.raises(ValueError, match="centre"):
        window_bounds(64, 64, 10)


def test_counts_and_width():
    tokens, codes = corpus()
    lw = sample_windows(codes[..., 0], tokens, latent=0, special_ids=[BOS])
    assert (len(lw.top), len(lw.iw), len(lw.random)) == (12, 7, 10)
    for w in lw.top + lw.iw + lw.random:
        assert w.end - w.start == 21 == len(w.token_ids) == len(w.acts)
        assert w.start <= w.centre < w.end
        assert w.token_ids == tuple(tokens[w.context, w.start:w.end])


def test_top_greedy_exact_on_hand_made_peaks():
    N, L = 2, 64
    tokens = np.full((N, L), 7)
    tokens[:, 0] = BOS
    acts = np.zeros((N, L), np.float32)
    acts[0, 30] = 10.0   # first pick; its window is [20, 41)
    acts[0, 35] = 9.0    # inside that window: excluded
    acts[0, 52] = 8.0    # outside: second pick
    acts[1, 5] = 7.0     # other context: third pick
    acts[0, 40] = 6.0    # inside the first window: excluded
    spec = WindowSpec(n_top=12, n_iw=0, n_random=0)
    lw = sample_windows(acts, tokens, latent=0, spec=spec, special_ids=[BOS])
    assert [(w.context, w.centre, w.peak) for w in lw.top] == [(0, 30, 10.0), (0, 52, 8.0),
                                                               (1, 5, 7.0)]
    assert lw.max_act == 10.0
    assert lw.top[2].start == 0 and lw.top[2].end == 21  # shifted at the context start


def test_top_windows_hold_no_other_top_centre():
    tokens, codes = corpus(density=0.4)
    for f in range(codes.shape[2]):
        lw = sample_windows(codes[..., f], tokens, latent=f, special_ids=[BOS])
        peaks = [w.peak for w in lw.top]
        assert peaks == sorted(peaks, reverse=True) and peaks[0] == lw.max_act
        for a in lw.top:
            for b in lw.top:
                if a is not b and a.context == b.context:
                    assert not a.start <= b.centre < a.end


def test_bos_and_special_tokens_never_centres_and_count_zero():
    tokens, codes = corpus(density=0.3)
    tokens[:, 10] = PAD
    acts = codes[..., 0].copy()
    acts[:, 0] = 1e6      # BOS activations dominate raw, as in real SAEs
    acts[:, 10] = 1e5     # PAD
    lw = sample_windows(acts, tokens, latent=0, special_ids=[BOS, PAD])
    assert lw.max_act < 1e5
    for w in lw.top + lw.iw + lw.random:
        assert w.centre not in (0, 10)
        for pos, a in zip(range(w.start, w.end), w.acts):
            if pos in (0, 10):
                assert a == 0.0
    valid = centre_mask_NL(tokens, [BOS, PAD])
    assert not valid[:, 0].any() and not valid[:, 10].any() and valid[:, 5].all()


def test_iw_windows_follow_the_rules():
    tokens, codes = corpus(density=0.3)
    for f in range(codes.shape[2]):
        lw = sample_windows(codes[..., f], tokens, latent=f, special_ids=[BOS])
        smallest_top = min(w.peak for w in lw.top)
        for i, w in enumerate(lw.iw):
            assert 0 < w.peak < smallest_top
            for t in lw.top + lw.iw[:i]:
                if t.context == w.context:
                    assert not t.start <= w.centre < t.end


def test_iw_sampling_is_proportional_to_activation():
    """Two candidates with activations 1 and 3: the first IW draw picks 3 with p = 0.75."""
    N, L = 1, 200
    tokens = np.full((N, L), 9)
    tokens[0, 0] = BOS
    acts = np.zeros((N, L), np.float32)
    acts[0, 20], acts[0, 80], acts[0, 150] = 100.0, 1.0, 3.0
    hits = 0
    n = 400
    for seed in range(n):
        spec = WindowSpec(n_top=1, n_iw=1, n_random=0, seed=seed)
        lw = sample_windows(acts, tokens, latent=0, spec=spec, special_ids=[BOS])
        hits += lw.iw[0].centre == 150
    # Binomial(400, 0.75): sd 0.022; 4 sd tolerance.
    assert abs(hits / n - 0.75) < 0.09


def test_random_windows_uniform_valid_distinct():
    tokens, codes = corpus()
    lw = sample_windows(codes[..., 2], tokens, latent=2, special_ids=[BOS])
    centres = [(w.context, w.centre) for w in lw.random]
    assert len(set(centres)) == 10 and all(c != 0 for _, c in centres)


def test_few_firings_give_fewer_windows():
    tokens, _ = corpus()
    acts = np.zeros(tokens.shape, np.float32)
    acts[3, 20], acts[7, 30], acts[7, 33] = 2.0, 5.0, 1.0
    lw = sample_windows(acts, tokens, latent=0, special_ids=[BOS])
    assert [w.peak for w in lw.top] == [5.0, 2.0]   # 1.0 lies in the 5.0 window
    assert lw.iw == () and len(lw.random) == 10


def test_determinism_by_seed():
    tokens, codes = corpus()
    a = sample_windows(codes[..., 1], tokens, 1, WindowSpec(seed=3), [BOS])
    b = sample_windows(codes[..., 1], tokens, 1, WindowSpec(seed=3), [BOS])
    c = sample_windows(codes[..., 1], tokens, 1, WindowSpec(seed=4), [BOS])
    assert a == b
    assert a.top == c.top  # top windows involve no randomness
    assert a.random != c.random and a.iw != c.iw


def test_hashed_uniform_in_unit_interval_and_seeded():
    pos = torch.arange(10_000)
    lat = torch.full_like(pos, 5)
    u = hashed_uniform(7, lat, pos)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    assert torch.equal(u, hashed_uniform(7, lat, pos))
    assert not torch.equal(u, hashed_uniform(8, lat, pos))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_streaming_equals_reference(chunk):
    tokens, codes = corpus(density=0.25)
    tokens[:, 17] = PAD
    spec = WindowSpec(seed=11)
    valid = centre_mask_NL(tokens, [BOS, PAD])
    src = ArrayCodes(codes, contexts_per_chunk=chunk)
    top = scan_top(src, valid, spec, backend="torch")
    latents = [0, 3, 5, 11]
    streamed = stream_windows(src, tokens, valid, latents, top, spec)
    for lw in streamed:
        ref = sample_windows(codes[..., lw.latent], tokens, lw.latent, spec, [BOS, PAD])
        assert lw == ref


def test_encoded_codes_match_array_codes():
    rng = np.random.default_rng(1)
    N, L, D, F = 12, 32, 8, 10
    acts = torch.as_tensor(rng.normal(size=(N, L, D)), dtype=torch.float32)
    W_DF = torch.as_tensor(rng.normal(size=(D, F)), dtype=torch.float32)

    def encode(acts_BD):
        return torch.relu(acts_BD @ W_DF - 1.0)

    enc = EncodedCodes(encode, lambda: (acts[i:i + 5].reshape(-1, D) for i in range(0, N, 5)),
                       context_len=L, width=F)
    dense = gather_codes(enc, range(F), N, L)
    expected = encode(acts.reshape(-1, D)).reshape(N, L, F).permute(2, 0, 1)
    assert torch.allclose(dense, expected)


def test_source_not_covering_tokens_raises():
    tokens, codes = corpus(N=10)
    valid = centre_mask_NL(tokens, [BOS])
    with pytest.raises(ValueError, match="yielded 8 contexts but tokens_NL has 10"):
        scan_top(ArrayCodes(codes[:8]), valid)
    with pytest.raises(ValueError, match="acts_NL shape"):
        sample_windows(codes[:5, :, 0], tokens, 0)
