"""Shared test fixtures: a tiny random HookedTransformer, a tiny real tokenizer, a private cache.

Nothing heavy happens at import: TransformerLens and tokenizers are imported inside the fixtures,
so collecting the fast tests stays quick.
"""

from __future__ import annotations

import os
import warnings

# Triton reads TRITON_INTERPRET when a kernel module is first imported, and several test modules
# import saelib.kernels; set it before any of them so the Triton kernels run (interpreted) on CPU
# tensors in tests/test_kernels.py whatever the collection order. Those tests use CPU tensors, so
# with TRITON_INTERPRET=0 they skip: the compiled kernels run on a GPU in bench/sae_kernels.py.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

#: Words of the tiny tokenizer's vocabulary: document ``i`` of ``doc_texts`` uses only ``t{i}``,
#: so every token id names the document it came from (the split-disjointness test relies on it).
N_WORDS = 300
BOS, EOS, UNK = "<bos>", "<eos>", "<unk>"


def make_tokenizer():
    """A real ``PreTrainedTokenizerFast`` over a WordLevel model: ``t0 … t299`` plus specials."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {UNK: 0, BOS: 1, EOS: 2, **{f"t{i}": 3 + i for i in range(N_WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK)


def doc_texts(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` documents of 5–40 words; document ``i`` repeats the word ``t{i}``."""
    import random

    rng = random.Random(seed)
    return [" ".join([f"t{i}"] * rng.randint(5, 40)) for i in range(n_docs)]


def tiny_config(**overrides):
    from transformer_lens import HookedTransformerConfig

    kwargs = dict(n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=97, act_fn="gelu",
                  normalization_type="LN", device="cpu")
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


@pytest.fixture
def tiny_tl():
    """A 3-layer randomly initialised HookedTransformer (d_model 32, vocabulary 97), in eval mode."""
    from transformer_lens import HookedTransformer

    torch.manual_seed(0)
    with warnings.catch_warnings():  # TL 3.x flags HookedTransformer as legacy; saelib uses it on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(tiny_config())
    model.eval()
    return model


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Point ``SAELIB_CACHE`` at a fresh folder so a test never touches the user's cache."""
    from saelib.models import CACHE_ENV

    root = tmp_path / "saelib-cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="session")
def smoke_topk_root(tmp_path_factory):
    """A run folder holding the smoke profile's prepared tokens, capture (with the descriptive
    inputs) and its trained TopK SAE (level 0), built once per session for the slow tests that
    need one real SAE (sae-bench cross-check, corrupt artefacts). Tests point ``SAELIB_RUNS`` at
    it with their own ``monkeypatch``; a test that damages a file must leave it recomputed."""
    from saelib import stages
    from saelib.profiles import RUNS_ENV, load_profile

    root = tmp_path_factory.mktemp("smoke-topk")
    before = {k: os.environ.get(k) for k in (RUNS_ENV, "HF_HUB_OFFLINE")}
    os.environ[RUNS_ENV], os.environ["HF_HUB_OFFLINE"] = str(root), "1"
    try:
        profile = load_profile("smoke")
        entry = profile.models[0]
        stages.capture.prepare(profile, progress=False)
        stages.capture.run(profile, entry.name, progress=False)
        stages.train.run(profile, entry.name, "topk", 0, progress=False)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root


def training_provenance(profile) -> dict:
    """The ``provenance`` block of a train record as ``stages.train.run`` writes it (the
    profile's training settings), for tests that hand-make a trained SAE's ``result.json``."""
    from dataclasses import asdict

    from saelib.profiles import section_config
    from saelib.sae.train import TrainConfig

    cfg = section_config(TrainConfig, profile, "training", progress=False, device=profile.device)
    return {"config": {"training": asdict(cfg)}}
