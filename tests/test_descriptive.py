"""SAEBench's descriptive metrics: k-sparse probing and first-letter absorption on hand-made data,
the per-model inputs' manifest, and the profile section (protocol §3, Figs. 5–7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelib.data.corpus import CorpusError
from saelib.data.probing import balanced_split, load_probe_set
from saelib.evals import absorption as ab
from saelib.evals import descriptive as D
from saelib.evals import probing as pr
from saelib.results import CorruptFileError, read_npy, write_npy


# ---------------------------------------------------------------------------- probing

def test_top_k_mean_diff_ranks_by_absolute_gap_and_breaks_ties_by_index():
    X = np.array([[0, 5, 1, 1], [0, 5, 1, 1], [3, 0, 0, 1], [3, 0, 0, 1.0]])
    y = np.array([1, 1, 0, 0])
    # |gaps| = 3, 5, 1, 0 → top-1 is column 1, top-2 columns 0 and 1
    assert pr.top_k_mean_diff(X, y, 1).tolist() == [1]
    assert pr.top_k_mean_diff(X, y, 2).tolist() == [0, 1]
    tied = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert pr.top_k_mean_diff(tied, np.array([1, 0]), 1).tolist() == [0]
    assert pr.top_k_mean_diff(X, y, 10).tolist() == [0, 1, 2, 3]


def test_mean_pool_skips_bos_and_padding():
    acts = np.zeros((2, 4, 2), dtype=np.float16)
    acts[:, 0] = 100.0           # BOS: never pooled
    acts[0, 1:3] = [[1, 2], [3, 4]]
    acts[0, 3] = 50.0            # padding after length 3
    acts[1, 1:4] = [[1, 1], [2, 2], [3, 3]]
    pooled = pr.mean_pool(acts, np.array([3, 4]))
    np.testing.assert_allclose(pooled, [[2, 3], [2, 2]])
    doubled = pr.mean_pool(acts, np.array([3, 4]), encode=lambda x: 2 * x)
    np.testing.assert_allclose(doubled, 2 * pooled)
    with pytest.raises(ValueError, match="after BOS"):
        pr.mean_pool(acts, np.array([1, 4]))


def test_probe_set_finds_the_one_informative_latent():
    rng = np.random.default_rng(0)
    n = 120
    y = np.arange(n) % 2
    res = rng.normal(size=(n, 6))
    res[:, 2] += 3 * y                 # the residual carries the label in one direction
    codes = np.abs(rng.normal(size=(n, 20))) * 0.1
    codes[:, 7] += 2 * y               # and one latent fires on it
    out = pr.probe_set(res[:80], res[80:], codes[:80], codes[80:], y[:80], y[80:], (1, 2, 5), "toy")
    assert out.sae_top_k[1] > 0.95 and out.llm_top_k[1] > 0.9 and out.llm > 0.9
    s = pr.summarise([out, out], (1, 2, 5))
    assert s["sae_top_1_test_accuracy"] == out.sae_top_k[1] and set(s) >= {"llm_test_accuracy", "sae_top_5_test_accuracy"}


def test_balanced_split_is_disjoint_balanced_and_seeded():
    texts = [f"t{i}" for i in range(100)]
    labels = np.array([i % 2 for i in range(100)])
    a = balanced_split("x", texts, labels, 20, 10, seed=3)
    b = balanced_split("x", texts, labels, 20, 10, seed=3)
    assert a.train_texts == b.train_texts and not set(a.train_texts) & set(a.test_texts)
    assert a.train_labels.sum() == 10 and a.test_labels.sum() == 5
    with pytest.raises(CorpusError, match="class 0 has 50 texts"):
        balanced_split("x", texts, labels, 100, 20, seed=0)


def test_probe_sets_load_from_the_package_and_from_csv(tmp_path):
    texts, labels = load_probe_set("5_hist_fig_ismale")
    assert len(texts) == len(labels) > 1000 and set(labels.tolist()) == {0, 1}
    with pytest.raises(CorpusError, match="did you mean"):
        load_probe_set("agnews")
    bad = tmp_path / "three.csv"
    bad.write_text("prompt,target\na,x\nb,y\nc,z\n")
    with pytest.raises(CorpusError, match="exactly two target values"):
        load_probe_set(str(bad))
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("text,label\na,1\n")
    with pytest.raises(CorpusError, match="'prompt' and 'target'"):
        load_probe_set(str(nocol))


# ---------------------------------------------------------------------------- absorption

CFG = ab.AbsorptionConfig(n_words=52)


def test_word_scores_main_latent_carries_the_letter_no_absorption():
    p = np.array([1.0, 0.0])
    x = np.array([2.0, 0.0])
    codes = np.array([2.0, 0.0, 0.0])
    along = np.array([1.0, 1.0, 0.0])
    frac, full = ab.word_scores(x, codes, codes * along, along, p, [0], CFG)
    assert frac == 0.0 and full is False


def test_word_scores_silent_main_and_aligned_absorber_is_full_absorption():
    p = np.array([1.0, 0.0])
    x = np.array([2.0, 0.5])
    codes = np.array([0.0, 1.8, 0.0])
    along = np.array([1.0, 1.0, 0.0])
    frac, full = ab.word_scores(x, codes, codes * along, along, p, [0], CFG)
    assert frac == 1.0 and full is True


def test_word_scores_partial_absorption_fraction():
    p = np.array([1.0, 0.0])
    x = np.array([2.0, 0.0])
    codes = np.array([0.5, 1.5, 0.0])
    along = np.array([1.0, 1.0, 0.0])
    frac, full = ab.word_scores(x, codes, codes * along, along, p, [0], CFG)
    # main projects 0.5, absorbers min(1.5, 2 − 0.5) = 1.5 → 1.5 / (1.5 + 0.5)
    assert frac == pytest.approx(0.75) and full is False
    # a weak absorber (under 40 % of x·p) is not absorption
    codes = np.array([0.5, 0.6, 0.0])
    frac, _ = ab.word_scores(x, codes, codes * along, along, p, [0], CFG)
    assert frac == 0.0


def test_main_latents_grow_only_while_f1_jumps():
    rng = np.random.default_rng(0)
    letter = np.repeat(np.arange(26), 8)
    codes = np.abs(rng.normal(size=(len(letter), 40))) * 0.05
    codes[letter == 3, 5] += 2.0          # one latent carries "d" alone
    mains = ab.main_latents(codes, letter, np.ones(len(letter), bool), 3, ab.AbsorptionConfig())
    assert mains == [5]
    half = (letter == 4) & (np.arange(len(letter)) % 2 == 0)
    codes[half, 9] += 2.0                 # "e" is split across two latents
    codes[(letter == 4) & ~half, 11] += 2.0
    mains = ab.main_latents(codes, letter, np.ones(len(letter), bool), 4, ab.AbsorptionConfig())
    assert sorted(mains) == [9, 11]


def _toy_data(rng, n_per=6, d=32):
    letter = np.repeat(np.arange(26), n_per)
    dirs = rng.normal(size=(26, d))
    acts = dirs[letter] * 3 + rng.normal(size=(len(letter), d)) * 0.3
    is_test = np.arange(len(letter)) % n_per < 2
    words = tuple(f"{ab.LETTERS[c]}w{i}" for i, c in enumerate(letter))
    return ab.AbsorptionData(acts.astype(np.float32), letter, words, is_test), dirs


def test_score_on_a_toy_sae_and_the_partial_path():
    rng = np.random.default_rng(1)
    data, dirs = _toy_data(rng)
    probe = ab.fit_letter_probe(data)
    assert probe.f1_C.mean() > 0.9
    unit = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    # one latent per letter, 6 random ones, and a last latent along "b" that the encoder never uses
    W_dec = np.vstack([unit, rng.normal(size=(6, 32)), unit[1:2]]).astype(np.float32)
    W_enc = torch.as_tensor(W_dec.T).clone()
    W_enc[:, -1] = 0

    def encode(x):
        return torch.relu(x @ W_enc - 1.0)

    res = ab.score(data, probe, encode, W_dec, ab.AbsorptionConfig(n_words=52))
    assert res.n_letters == 26 and not res.partial
    # each letter has its own latent: no word is fully absorbed, and little of any is absorbed
    assert res.mean_full_absorption == 0.0 and res.mean_absorption_fraction < 0.1
    assert res.per_letter["b"]["main_latents"] == [1]

    # planted: on the test words of "b" its main latent is silent and the aligned latent fires
    b_test = torch.as_tensor(data.is_test_W & (data.letter_W == 1))

    def absorbed(x):  # score encodes data.acts_WD whole, so rows are the words in order
        codes = encode(x)
        codes[b_test, -1] = codes[b_test, 1]
        codes[b_test, 1] = 0
        return codes

    planted = ab.score(data, probe, absorbed, W_dec, ab.AbsorptionConfig(n_words=52))
    assert planted.per_letter["b"]["full_absorption"] == 1.0
    assert planted.per_letter["b"]["absorption_fraction"] == pytest.approx(1.0)
    assert {k: v for k, v in planted.per_letter.items() if k != "b"} == \
        {k: v for k, v in res.per_letter.items() if k != "b"}
    assert planted.mean_full_absorption == pytest.approx(1 / 26)
    strict = ab.AbsorptionConfig(n_words=52, min_probe_f1=1.01)
    none = ab.score(data, probe, encode, W_dec.astype(np.float32), strict)
    assert none.partial and none.mean_absorption_fraction is None and "F1" in none.reason


def test_first_letter_prompts_have_one_length_and_read_the_word(smollm2_tokenizer):
    tok = smollm2_tokenizer
    vocab = ab.vocab_words(tok, 3)
    assert len(vocab) > 2000 and all(w.isalpha() and w.islower() for w in list(vocab)[:50])
    words = ab.sample_words(vocab, 104, seed=0)
    assert len(words) == 104 and {w[0] for w in words} == set(ab.LETTERS)
    assert words == ab.sample_words(vocab, 104, seed=0)
    pool = sorted(set(vocab) - set(words))
    ids, pos = ab.build_prompts(tok, words, vocab, pool, 3, seed=0)
    assert ids.shape[0] == len(words)
    for row, word in zip(ids[:10], words):
        assert tok.decode([int(row[pos])]) == " " + word
        assert tok.decode(row[pos + 1:].tolist()) == ab.TEMPLATE


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from saelib.models import resolve_hf_source

    return AutoTokenizer.from_pretrained(resolve_hf_source("smollm2-135m-instruct"))


# ---------------------------------------------------------------------------- inputs and config

def test_npy_files_refuse_pickles_and_checksum_mismatches(tmp_path):
    sha = write_npy(tmp_path / "a.npy", np.arange(6))
    assert read_npy(tmp_path / "a.npy", sha).tolist() == list(range(6))
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-8])
    with pytest.raises(CorruptFileError, match="checksum"):
        read_npy(tmp_path / "a.npy", sha)
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptFileError, match="not a readable"):
        read_npy(tmp_path / "obj.npy")


def test_inputs_capture_on_a_tiny_model_then_a_corrupt_file_is_refused(tmp_path, smollm2_tokenizer):
    d = 16
    emb = torch.nn.Embedding(len(smollm2_tokenizer), d)
    torch.manual_seed(0)

    def residual(tokens_BT):
        return emb(tokens_BT).cumsum(1)   # causal: a position sees only what precedes it

    cfg = D.DescriptiveConfig(absorption=ab.AbsorptionConfig(n_words=52, icl_examples=1),
                              probing=pr.ProbingConfig(datasets=("5_hist_fig_ismale",), n_train=8,
                                                       n_test=4, context=8)).validate()
    man = D.capture_inputs(residual, smollm2_tokenizer, 3, cfg, tmp_path, progress=False)
    assert D.inputs_current(tmp_path, cfg, 3) and not D.inputs_current(tmp_path, cfg, 4)
    other = D.DescriptiveConfig(probing=pr.ProbingConfig(n_train=10))
    assert not D.inputs_current(tmp_path, other, 3)
    inputs = D.load_inputs(tmp_path)
    assert inputs.absorption.acts_WD.shape == (len(man["words"]), d)
    refit = ab.fit_letter_probe(inputs.absorption, cfg.absorption.seed)  # stored probe == a refit
    np.testing.assert_allclose(inputs.probe.dirs_CD, refit.dirs_CD, atol=1e-6)
    np.testing.assert_array_equal(inputs.probe.pred_W, refit.pred_W)
    p = inputs.probing["5_hist_fig_ismale"]
    assert p["acts"].shape == (12, 8, d) and p["n_train"] == 8 and p["labels"][:8].sum() == 4

    W_dec = np.random.default_rng(0).normal(size=(24, d)).astype(np.float32)
    W_enc = torch.as_tensor(W_dec.T)
    summary, detail = D.run(lambda x: torch.relu(x @ W_enc), W_dec, inputs,
                            [np.random.default_rng(1).normal(size=(4, 8, d))], cfg)
    assert 0 <= summary["dense_fraction"] <= 1 and summary["dense_tokens"] == 28
    assert summary["probing_sets"] == 1 and len(detail["probing"]) == 1
    assert set(summary["not_computed"]) == {"SCR", "RAVEL"}

    victim = tmp_path / next(iter(man["files"]))
    victim.write_bytes(victim.read_bytes()[:-4])
    with pytest.raises(CorruptFileError, match="checksum"):
        D.load_inputs(tmp_path)


@pytest.mark.parametrize("section, match", [
    ({"absorption": {"n_words": 10}}, "n_words"),
    ({"probing": {"datasets": []}}, "datasets"),
    ({"probing": {"ks": [0]}}, "ks"),
    ({"dense_threshold": 1.5}, "dense_threshold"),
    ({"probing": {"n_trian": 5}}, "n_trian"),
])
def test_descriptive_profile_section_rejects_bad_values(section, match):
    from saelib.profiles import ProfileError, load_profile, section_config
    import dataclasses

    profile = dataclasses.replace(load_profile("smoke"), descriptive=section)
    with pytest.raises(ProfileError, match=match):
        section_config(D.DescriptiveConfig, profile, "descriptive")


@pytest.mark.parametrize("scale,dtype", [(3.0, np.float16), (1e5, np.float32)])
def test_padded_residuals_keep_float32_when_float16_would_overflow(scale, dtype):
    """Gemma-3-270M's massive activations at BOS overflowed the float16 store and stopped the
    cpu-pair capture; values that fit stay float16 (half the disk)."""
    tokens_NL = np.array([[1, 5, 7, 0], [1, 2, 0, 0], [1, 3, 4, 6]])
    lengths_N = np.array([3, 2, 4])

    def residual(toks_BL):
        return toks_BL.float()[..., None] * torch.tensor([scale, -scale / 2])

    out = D._residual_padded(residual, tokens_NL, lengths_N, 2, "test", progress=False)
    assert out.dtype == dtype and out.shape == (3, 4, 2)
    want = tokens_NL[..., None] * np.array([scale, -scale / 2])
    mask = np.arange(4)[None, :] < lengths_N[:, None]
    np.testing.assert_allclose(out[mask].astype(np.float64), want[mask], rtol=1e-3)
    assert not out[~mask].any()  # padding stays zero


def test_padded_residuals_refuse_non_finite_values():
    with pytest.raises(ValueError, match="non-finite"):
        D._residual_padded(lambda t: torch.full((*t.shape, 2), float("nan")),
                           np.array([[1, 2]]), np.array([2]), 4, "test", progress=False)
