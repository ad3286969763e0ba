"""Activation cache: exact residual stream, no later block computed, resume, NaN guard, reader.

Protocol §2: all SAEs of a (model, layer) train on one capture of ``blocks.{L}.hook_resid_post``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saelib import activations
from saelib.activations import MANIFEST, ActivationError, ActivationStore, capture, sink_mask
from saelib.results import CorruptFileError, write_npy

LAYER = 1
N_CTX, CTX = 10, 16
BOS_ID = 1
PER_SHARD = 3  # shard_tokens = 3 contexts → shards of 3, 3, 3, 1 contexts


def make_tokens(seed: int = 0) -> np.ndarray:
    """``[N, L]`` token ids with BOS first and a distinct second token per context, so every
    non-BOS position has a distinct prefix and hence a distinct residual row."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, 97, size=(N_CTX, CTX)).astype(np.int32)
    toks[:, 0] = BOS_ID
    toks[:, 1] = np.arange(3, 3 + N_CTX)
    return toks


def run_capture(tl, tokens, out, **kw):
    kw = {"batch_size": 2, "shard_tokens": PER_SHARD * CTX, "progress": False, **kw}
    return capture(tl, tokens, LAYER, out, **kw)


def reference(tl, tokens) -> np.ndarray:
    with torch.no_grad():
        _, cache = tl.run_with_cache(torch.as_tensor(tokens, dtype=torch.long),
                                     names_filter=f"blocks.{LAYER}.hook_resid_post")
    return cache[f"blocks.{LAYER}.hook_resid_post"].float().numpy()


def read_all(out) -> np.ndarray:
    store = ActivationStore.open(out)
    return np.concatenate([np.asarray(store.shard(i)) for i in range(len(store.manifest["shards"]))])


@pytest.fixture
def count_contexts(monkeypatch):
    """Counts the contexts pushed through the model by ``capture``."""
    seen = []
    real = activations.residual_at

    def counting(tl, tokens_BL, layer):
        seen.append(int(tokens_BL.shape[0]))
        return real(tl, tokens_BL, layer)

    monkeypatch.setattr(activations, "residual_at", counting)
    return seen


@pytest.fixture
def captured(tiny_tl, tmp_path):
    tokens = make_tokens()
    out = tmp_path / "acts"
    manifest = run_capture(tiny_tl, tokens, out)
    return tiny_tl, tokens, out, manifest


def test_shards_equal_run_with_cache_and_manifest_is_complete(captured):
    tl, tokens, out, manifest = captured
    assert manifest["complete"] and len(manifest["shards"]) == 4
    assert [s["contexts"] for s in manifest["shards"]] == [[0, 3], [3, 6], [6, 9], [9, 10]]
    assert manifest["hook"] == f"blocks.{LAYER}.hook_resid_post"
    acts = read_all(out)
    assert acts.shape == (N_CTX, CTX, 32) and acts.dtype == np.float32
    np.testing.assert_allclose(acts, reference(tl, tokens), rtol=0, atol=1e-5)


def test_no_block_after_the_layer_is_computed(tiny_tl, tmp_path):
    fired = {"at": 0, "after": 0, "unembed": 0}
    tiny_tl.blocks[LAYER].register_forward_hook(lambda *a: fired.__setitem__("at", fired["at"] + 1))
    tiny_tl.blocks[LAYER + 1].register_forward_hook(
        lambda *a: fired.__setitem__("after", fired["after"] + 1))
    tiny_tl.unembed.register_forward_hook(lambda *a: fired.__setitem__("unembed", fired["unembed"] + 1))
    run_capture(tiny_tl, make_tokens(), tmp_path / "acts")
    assert fired == {"at": 7, "after": 0, "unembed": 0}  # 2 + 2 + 2 + 1 batches of <= 2 contexts


def test_rerun_of_a_complete_capture_computes_nothing(captured, count_contexts):
    tl, tokens, out, _ = captured
    before = read_all(out)
    manifest = run_capture(tl, tokens, out)
    assert count_contexts == [] and manifest["complete"]
    np.testing.assert_array_equal(read_all(out), before)


@pytest.mark.parametrize("damage,recomputed", [
    ("delete_last", 1),        # shard 3 holds one context
    ("corrupt_third", 3 + 1),  # a bad shard invalidates it and every shard after it
    ("truncate_manifest", 3 + 3 + 1),
])
def test_resume_recomputes_only_missing_shards(captured, count_contexts, damage, recomputed):
    tl, tokens, out, manifest = captured
    before = read_all(out)
    files = [out / s["file"] for s in manifest["shards"]]
    if damage == "delete_last":
        files[-1].unlink()
    elif damage == "corrupt_third":
        raw = bytearray(files[2].read_bytes())
        raw[-5] ^= 0x01
        files[2].write_bytes(bytes(raw))
    else:
        m = json.loads((out / MANIFEST).read_text())
        m["shards"] = m["shards"][:1]
        m["complete"] = False
        (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises((ActivationError, CorruptFileError)):
        ActivationStore.open(out)
    manifest = run_capture(tl, tokens, out)
    assert sum(count_contexts) == recomputed
    assert manifest["complete"]
    np.testing.assert_array_equal(read_all(out), before)


def test_different_tokens_restart_the_capture(captured, count_contexts):
    tl, tokens, out, _ = captured
    other = make_tokens(seed=1)
    run_capture(tl, other, out)
    assert sum(count_contexts) == N_CTX
    np.testing.assert_allclose(read_all(out), reference(tl, other), rtol=0, atol=1e-5)


def test_a_model_in_another_dtype_restarts_the_capture_both_ways(captured, count_contexts):
    """A bfloat16 model's capture is recorded as such (the shards stay float32), and neither a
    float32 nor a bfloat16 capture is resumed by a model in the other dtype."""
    tl, tokens, out, manifest = captured
    assert "model_dtype" not in manifest  # float32, as every earlier manifest
    tl.to(torch.bfloat16)
    bf16 = run_capture(tl, tokens, out)
    assert sum(count_contexts) == N_CTX and bf16["model_dtype"] == "bfloat16"
    assert bf16["dtype"] == "float32" and read_all(out).dtype == np.float32
    np.testing.assert_array_equal(read_all(out), reference(tl, tokens))
    run_capture(tl, tokens, out)
    assert sum(count_contexts) == N_CTX  # same dtype: nothing recomputed
    tl.to(torch.float32)
    again = run_capture(tl, tokens, out)
    assert sum(count_contexts) == 2 * N_CTX and "model_dtype" not in again


def test_nan_activations_raise_naming_the_shard(tiny_tl, tmp_path):
    def poison(resid, hook):
        resid[0, 3, 0] = float("nan")  # one value: context 3, the first of shard 1
        return resid

    tokens = make_tokens()
    calls = {"n": 0}

    def poison_third_batch(resid, hook):
        calls["n"] += 1
        return poison(resid, hook) if calls["n"] == 3 else resid

    tiny_tl.add_hook("blocks.0.hook_resid_post", poison_third_batch)
    out = tmp_path / "acts"
    with pytest.raises(ActivationError, match=r"shard_00001\.npy: \d+ non-finite activation values "
                                              r"\(contexts 3\.\.5\)"):
        run_capture(tiny_tl, tokens, out)
    assert not (out / "shard_00001.npy").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["shards"]) == 1 and not manifest["complete"]
    with pytest.raises(ActivationError, match="capture is incomplete"):
        ActivationStore.open(out)


def test_store_refuses_missing_incomplete_and_corrupt_caches(captured, tmp_path):
    _, _, out, manifest = captured
    with pytest.raises(ActivationError, match="no activation cache here"):
        ActivationStore.open(tmp_path / "elsewhere")
    shard = out / manifest["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=r"shard_00001\.npy: missing or checksum differs"):
        ActivationStore.open(out)
    assert ActivationStore.open(out, verify=False).n_contexts == N_CTX
    m = json.loads((out / MANIFEST).read_text())
    m["complete"] = False
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ActivationError, match="capture is incomplete"):
        ActivationStore.open(out)


def _row_keys(rows_ND: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in np.ascontiguousarray(rows_ND)]


def test_iter_batches_shapes_counts_and_bos_dropped(captured):
    _, _, out, _ = captured
    store = ActivationStore.open(out)
    acts = read_all(out)
    non_bos = set(_row_keys(acts[:, 1:].reshape(-1, 32)))
    bos = set(_row_keys(acts[:, 0]))
    assert store.n_tokens() == N_CTX * (CTX - 1) == len(non_bos)

    batches = list(store.iter_batches(16, seed=0, max_tokens=128))
    assert len(batches) == 8
    assert all(b.shape == (16, 32) and b.dtype == torch.float32 for b in batches)
    keys = _row_keys(torch.cat(batches).numpy())
    assert len(set(keys)) == 128  # within one epoch no row repeats
    assert set(keys) <= non_bos and not set(keys) & bos

    # beyond one epoch (150 rows) the reader cycles, still without BOS rows
    long = torch.cat(list(store.iter_batches(16, seed=0, max_tokens=400))).numpy()
    assert long.shape == (400, 32)
    assert set(_row_keys(long)) == non_bos

    with_bos = torch.cat(list(store.iter_batches(10, seed=0, drop_bos=False, max_tokens=160))).numpy()
    assert set(_row_keys(with_bos)) == non_bos | bos


def test_iter_batches_is_deterministic_by_seed(captured):
    _, _, out, _ = captured
    store = ActivationStore.open(out)

    def run(seed):
        return torch.cat(list(store.iter_batches(8, seed=seed, max_tokens=96)))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_mean_and_sample_match_numpy(captured):
    _, _, out, _ = captured
    store = ActivationStore.open(out)
    acts = read_all(out)
    np.testing.assert_allclose(store.mean().numpy(), acts[:, 1:].reshape(-1, 32).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(store.mean(drop_bos=False).numpy(), acts.reshape(-1, 32).mean(0),
                               rtol=1e-5, atol=1e-6)
    sample = store.sample(50, seed=2)
    assert sample.shape == (50, 32)
    assert torch.equal(sample, store.sample(50, seed=2))
    assert set(_row_keys(sample.numpy())) <= set(_row_keys(acts[:, 1:].reshape(-1, 32)))


def test_iter_contexts_is_in_corpus_order(captured):
    _, _, out, _ = captured
    store = ActivationStore.open(out)
    starts, chunks = zip(*store.iter_contexts(batch_contexts=2))
    assert starts == (0, 2, 3, 5, 6, 8, 9)
    np.testing.assert_array_equal(np.concatenate(chunks), read_all(out))


def _original_iter_batches(store, batch_size, seed, total):
    """The reader's batches as first written (one shard in memory, a carry array): the shared
    :func:`~saelib.activations.shuffled_batches` must serve exactly these."""
    rng = np.random.default_rng(seed)
    served, carry = 0, np.empty((0, store.d_model), dtype=np.float32)
    while served < total:
        for i in rng.permutation(len(store.manifest["shards"])):
            rows = np.asarray(store.shard(int(i))[:, 1:, :]).reshape(-1, store.d_model)
            rows = np.concatenate([carry, rows[rng.permutation(len(rows))]])
            n_full = len(rows) // batch_size
            for b in range(n_full):
                if served >= total:
                    return
                yield rows[b * batch_size:(b + 1) * batch_size].copy()
                served += batch_size
            carry = rows[n_full * batch_size:]


@pytest.mark.parametrize("batch_size", [7, 50])
def test_batches_are_the_readers_first_order_and_skip_exactly(captured, batch_size):
    store = ActivationStore.open(captured[2])
    total = 3 * store.n_tokens() + 11
    want = list(_original_iter_batches(store, batch_size, 5, total))
    got = [b.numpy() for b in store.iter_batches(batch_size, seed=5, max_tokens=total)]
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    later = [b.numpy() for b in store.iter_batches(batch_size, seed=5, max_tokens=total,
                                                   start_batch=4)]
    assert all(np.array_equal(a, b) for a, b in zip(later, want[4:])) and len(later) == len(want) - 4


def test_model_stream_serves_the_caches_batches(captured):
    """Streaming mode: the model computes a shard when a batch needs it, in the capture's forward
    batches, so the batches are the cache's to the bit; one epoch runs each context once, and a
    resumed stream recomputes only the shards its next batch spans."""
    tl, tokens, out, _ = captured
    store = ActivationStore.open(out)
    stream = activations.ModelStream(tl, tokens, LAYER, batch_size=2,
                                     shard_tokens=PER_SHARD * CTX)
    assert (stream.d_model, stream.n_tokens()) == (store.d_model, store.n_tokens())
    epoch = store.n_tokens() // 16 * 16
    want = [b.numpy() for b in store.iter_batches(16, seed=2, max_tokens=epoch)]
    got = [b.numpy() for b in stream.iter_batches(16, seed=2, max_tokens=epoch)]
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert stream.forward_contexts == N_CTX
    stream.forward_contexts = 0
    last = list(stream.iter_batches(16, seed=2, max_tokens=epoch, start_batch=len(want) - 1))
    assert len(last) == 1 and np.array_equal(last[0].numpy(), want[-1])
    assert stream.forward_contexts <= 2 * PER_SHARD


def test_sink_mask_NL_flags_a_planted_sink_and_never_bos(captured):
    """A row of a captured shard moved 100x its typical distance from the mean is the split's one
    sink; BOS rows (far off too, in real models) are never flagged; same rule as ``sink_mask``."""
    _, _, out, _ = captured
    store = ActivationStore.open(out)
    assert not store.sink_mask_NL().any()
    acts = np.array(store.shard(1))  # contexts 3-5
    mean = store.mean().numpy()
    typical = np.median(np.linalg.norm(read_all(out)[:, 1:] - mean, axis=-1))
    acts[1, 7] = mean + 100 * typical * np.eye(32, dtype=acts.dtype)[0]
    acts[:, 0] *= 1000  # BOS rows
    write_npy(out / store.manifest["shards"][1]["file"], acts)
    store = ActivationStore.open(out, verify=False)
    mask = store.sink_mask_NL()
    assert mask.shape == (N_CTX, CTX) and mask.dtype == bool
    assert np.argwhere(mask).tolist() == [[4, 7]]
    rows = torch.from_numpy(np.concatenate([np.asarray(store.shard(i))[:, 1:]
                                            for i in range(len(store.manifest["shards"]))]))
    assert torch.equal(sink_mask(rows.reshape(-1, 32), mean_D=store.mean()),
                       torch.from_numpy(mask[:, 1:].reshape(-1)))
    assert not store.sink_mask_NL(multiple=0).any()
