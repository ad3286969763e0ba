"""Corpus → token contexts: determinism by seed, BOS layout, disjoint splits, cache and checksums.

Protocol §2–3 and ``saelib/data/corpus.py``: every context is ``[BOS] + (context − 1)`` tokens; the
eval split is filled first from seed-shuffled documents so no document feeds both splits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import N_WORDS, doc_texts, make_tokenizer

from saelib.data import corpus
from saelib.data.corpus import (CorpusError, build_token_splits, load_documents, load_token_splits,
                                packaged_documents)
from saelib.results import CorruptFileError

CONTEXT = 16
N_DOCS = N_WORDS


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def txt_source(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(doc_texts(N_DOCS)) + "\n")
    return path


def build(out_dir, tokenizer, source, seed=0, train_tokens=40 * CONTEXT, eval_tokens=10 * CONTEXT, **kw):
    return build_token_splits(out_dir, tokenizer, source=str(source), context=CONTEXT,
                              train_tokens=train_tokens, eval_tokens=eval_tokens, seed=seed,
                              tokenizer_name="tiny-wordlevel", **kw)


def test_shapes_dtype_and_bos_at_position_zero(tmp_path, tokenizer, txt_source):
    splits = build(tmp_path / "tok", tokenizer, txt_source, train_tokens=40 * CONTEXT - 3)
    bos = tokenizer.bos_token_id
    assert splits.train_NL.shape == (40, CONTEXT)  # ceil(637 / 16) contexts
    assert splits.eval_NL.shape == (10, CONTEXT)
    assert splits.train_NL.dtype == splits.eval_NL.dtype == np.int32
    assert splits.bos_id == bos
    for arr in (splits.train_NL, splits.eval_NL):
        assert (arr[:, 0] == bos).all()
        assert not (arr[:, 1:] == bos).any()
        assert not (arr == tokenizer.unk_token_id).any()


def test_no_document_contributes_to_both_splits(tmp_path, tokenizer, txt_source):
    """Document ``i`` is made only of the word ``t{i}``, so a shared token id is a shared document."""
    for seed in range(3):
        splits = build(tmp_path / f"tok{seed}", tokenizer, txt_source, seed=seed)
        bos = splits.bos_id
        train_ids = set(np.unique(splits.train_NL)) - {bos}
        eval_ids = set(np.unique(splits.eval_NL)) - {bos}
        assert train_ids and eval_ids
        assert not train_ids & eval_ids
        used = splits.manifest["documents_used"]
        assert len(eval_ids) <= used["eval"] and len(train_ids) <= used["train"]


def test_same_seed_same_arrays_different_seed_different_arrays(tmp_path, tokenizer, txt_source):
    a = build(tmp_path / "a", tokenizer, txt_source, seed=7)
    b = build(tmp_path / "b", tokenizer, txt_source, seed=7)
    c = build(tmp_path / "c", tokenizer, txt_source, seed=8)
    np.testing.assert_array_equal(a.train_NL, b.train_NL)
    np.testing.assert_array_equal(a.eval_NL, b.eval_NL)
    assert a.manifest["content_hash"] == b.manifest["content_hash"]
    assert not np.array_equal(a.train_NL, c.train_NL)
    assert not np.array_equal(a.eval_NL, c.eval_NL)
    assert a.manifest["content_hash"] != c.manifest["content_hash"]


def test_cache_is_reused_without_retokenising(tmp_path, tokenizer, txt_source, monkeypatch):
    first = build(tmp_path / "tok", tokenizer, txt_source)

    def must_not_run(*args, **kwargs):
        raise AssertionError("load_documents called although the cache matches")

    monkeypatch.setattr(corpus, "load_documents", must_not_run)
    again = build(tmp_path / "tok", tokenizer, txt_source)
    np.testing.assert_array_equal(first.train_NL, again.train_NL)
    np.testing.assert_array_equal(first.eval_NL, again.eval_NL)
    with pytest.raises(AssertionError, match="load_documents called"):
        build(tmp_path / "tok", tokenizer, txt_source, seed=1)  # a different key rebuilds


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, tokenizer, txt_source):
    out = tmp_path / "tok"
    first = build(out, tokenizer, txt_source)
    path = out / "train.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=r"train\.npy: checksum differs from its manifest"):
        load_token_splits(out)
    rebuilt = build(out, tokenizer, txt_source)
    np.testing.assert_array_equal(rebuilt.train_NL, first.train_NL)
    np.testing.assert_array_equal(load_token_splits(out).train_NL, first.train_NL)
    (out / "eval.npy").unlink()
    with pytest.raises(CorruptFileError, match=r"eval\.npy"):
        load_token_splits(out)


def test_truncated_manifest_is_a_corrupt_file_error_naming_it(tmp_path, tokenizer, txt_source):
    out = tmp_path / "tok"
    build(out, tokenizer, txt_source)
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(CorruptFileError, match=r"manifest\.json: not valid JSON"):
        load_token_splits(out)


def test_jsonl_source_and_folder_source(tmp_path, tokenizer):
    docs = doc_texts(N_DOCS, seed=1)
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n"
                                            for i, d in enumerate(docs[:150])) + "\n")
    (folder / "b.txt").write_text("\n\n".join(docs[150:]))
    (folder / "ignored.csv").write_text("not,read\n")
    assert load_documents(str(folder), text_field="body") == docs
    assert load_documents(str(folder / "a.jsonl"), text_field="body", max_documents=3) == docs[:3]
    with pytest.raises(CorpusError, match=r"a\.jsonl: line 1 has no field 'text'"):
        load_documents(str(folder / "a.jsonl"))
    splits = build(tmp_path / "tok", tokenizer, folder, text_field="body")
    assert splits.train_NL.shape == (40, CONTEXT)


def test_too_small_corpus_is_a_corpus_error(tmp_path, tokenizer, txt_source):
    with pytest.raises(CorpusError, match=r"too small: asked for 100000 train \+ 10 eval contexts of 16"):
        build(tmp_path / "tok", tokenizer, txt_source, train_tokens=100_000 * CONTEXT)
    assert not (tmp_path / "tok" / "manifest.json").exists()


@pytest.mark.parametrize("content", ["", "\n\n  \n\n\t\n"])
def test_empty_source_is_a_corpus_error(tmp_path, tokenizer, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(CorpusError, match="holds no text"):
        build(tmp_path / "tok", tokenizer, path)
    folder = tmp_path / "no_text_files"
    folder.mkdir()
    with pytest.raises(CorpusError, match="holds no text"):
        load_documents(str(folder))


def test_missing_source_and_unsupported_file_are_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match=r"neither 'packaged', 'hf:<id>' nor an existing"):
        load_documents(str(tmp_path / "nowhere"))
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"only \.txt and \.jsonl"):
        load_documents(str(csv))


def test_tokenizer_without_bos_or_eos_is_rejected(tmp_path, txt_source):
    tok = make_tokenizer()
    tok.bos_token = None
    tok.eos_token = None
    with pytest.raises(CorpusError, match="neither a BOS nor an EOS"):
        build(tmp_path / "tok", tok, txt_source)


def test_packaged_source_has_over_ten_thousand_documents():
    docs = load_documents("packaged")
    assert len(docs) > 10_000
    assert all(d.strip() == d and d for d in docs[:200])
    assert docs == packaged_documents()
    assert len(load_documents("packaged", max_documents=50)) == 50
