"""The interp stage (protocol §3) end to end on a hand-built run folder: a tiny tokenizer saved as
the "model", its token splits, eval activations captured from a tiny random HookedTransformer and a
TopK SAE trained on them for a few steps. The checks recompute what the stage reports (live latents,
per-latent max activation, μ as the CONCEPT100 mean) independently from the saved files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from saelib import grid, stages
from saelib.activations import ActivationStore, capture
from saelib.data.corpus import build_token_splits, token_frequencies
from saelib.profiles import profile_from_dict
from saelib.results import read_json, read_jsonl, write_json
from saelib.sae.io import load_sae, save_sae
from saelib.sae.train import TrainConfig, train_sae

from conftest import training_provenance

CONTEXT, LAYER, WIDTH, K = 16, 1, 64, 4


def _profile(tmp_path, tok_dir, corpus, **interp):
    return profile_from_dict({
        "models": [{"name": str(tok_dir), "layer": LAYER, "label": "tiny"}],
        "corpus": {"source": str(corpus), "context": CONTEXT, "train_tokens": CONTEXT * 32,
                   "eval_tokens": CONTEXT * 24},
        "grid": {"width": WIDTH, "architectures": ["topk"], "targets": [K], "calibrate": False},
        "interp": {"n_latents": 24, "n_concepts": 8, **interp},
        "runs_dir": str(tmp_path / "runs"),
    }, name="tiny")


@pytest.fixture
def tiny_run(tmp_path, tiny_tokenizer):
    """A run folder as capture + train leave it, for one TopK SAE (train's record faked by hand)."""
    from transformer_lens import HookedTransformer

    from conftest import tiny_config

    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok_dir))
    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(f"t{rng.randrange(40)}" for _ in
                                                               range(rng.randint(10, 60)))})
                                for _ in range(120)))
    profile = _profile(tmp_path, tok_dir, corpus)
    entry = profile.models[0]
    splits = build_token_splits(stages.layout.tokens_dir(profile, entry), tiny_tokenizer,
                                source=str(corpus), context=CONTEXT,
                                train_tokens=profile.corpus.train_tokens,
                                eval_tokens=profile.corpus.eval_tokens)
    torch.manual_seed(0)
    tl = HookedTransformer(tiny_config(d_vocab=len(tiny_tokenizer), n_ctx=CONTEXT))
    tl.eval()
    for split, arr in (("train", splits.train_NL), ("eval", splits.eval_NL)):
        # 10 contexts per shard: the eval split (24 contexts) spans three shards
        capture(tl, arr, LAYER, stages.layout.activations_dir(profile, entry, split), batch_size=8,
                shard_tokens=CONTEXT * 10, progress=False)
    train_store = ActivationStore.open(stages.layout.activations_dir(profile, entry, "train"))
    cfg = TrainConfig(batch_size=64, lr=3e-3, progress=False)
    total = 64 * 40
    res = train_sae("topk", train_store.d_model, WIDTH, K,
                    train_store.iter_batches(64, max_tokens=total), total, cfg)
    job = stages.SAEJob(entry.name, "topk", 0)
    out = stages.sae_dir(profile, job)
    save_sae(res.sae, out / "sae")
    write_json(out / stages.layout.RESULT, {"model": entry.name, "arch": "topk", "level": 0,
                                       "sparsity_method": {"method": "k"},
                                       "provenance": training_provenance(profile),
                                       "train": {"tokens_seen": total}, "core": {"l0": 4.0}})
    return profile, job, splits


def test_run_interp_records_mu_rows_and_keeps_train_keys(tiny_run):
    profile, job, splits = tiny_run
    out = stages.sae_dir(profile, job)
    assert not stages.interp.autointerp_done(profile, job)

    rec = stages.interp.run(profile, job.model, job.arch, job.level, progress=False)

    # Independent recomputation: encode the eval store, ignore BOS (position 0, the only special).
    sae = load_sae(out / "sae")
    store = ActivationStore.open(stages.layout.activations_dir(profile, profile.models[0], "eval"))
    with torch.no_grad():
        codes_NLF = torch.cat([sae.encode(torch.from_numpy(np.array(a)).reshape(-1, store.d_model))
                               .reshape(len(a), CONTEXT, WIDTH) for _, a in store.iter_contexts(7)])
    fires_F = (codes_NLF[:, 1:] > 0).sum(dim=(0, 1))
    assert rec["n_live"] == int((fires_F > 15).sum())  # SAEBench: more than 15 firings
    assert rec["n_rare"] == int(((fires_F > 0) & (fires_F <= 15)).sum())
    max_F = codes_NLF[:, 1:].amax(dim=(0, 1))
    assert 0 < rec["n_live"] <= WIDTH
    assert rec["n_scored"] == min(24, rec["n_live"])
    assert rec["eval_tokens"] == splits.eval_NL.size

    rows = read_jsonl(out / stages.interp.INTERP_ROWS)
    assert len(rows) == rec["n_scored"]
    for row in rows:
        assert {"explanation", "max_act", "score"} <= set(row)
        assert row["max_act"] == pytest.approx(float(max_F[row["latent"]]), rel=1e-5)
        assert isinstance(row["explanation"], str)
        assert 0.0 <= row["score"] <= 1.0
    c100 = [r["score"] for r in rows if r["in_concept100"]]
    assert len(c100) == rec["n_concept100"] == 8
    assert 0.0 <= rec["mu"] <= 1.0
    assert rec["mu"] == pytest.approx(float(np.mean(c100)), abs=1e-12)
    assert rec["judge"] == "offline"

    result = read_json(out / stages.layout.RESULT)
    assert result["train"] == {"tokens_seen": 64 * 40} and result["core"] == {"l0": 4.0}
    assert result["interp"]["mu"] == rec["mu"]
    assert stages.interp.autointerp_done(profile, job)

    # Idempotent: a second call returns the record and rewrites nothing.
    mtime = (out / stages.interp.INTERP_ROWS).stat().st_mtime_ns
    assert stages.interp.run(profile, job.model, job.arch, job.level)["mu"] == rec["mu"]
    assert (out / stages.interp.INTERP_ROWS).stat().st_mtime_ns == mtime

    # Other interp settings, or other SAE weights, make the record stale.
    other = _profile(profile.run_root().parent.parent, profile.models[0].name,
                     profile.corpus.source, n_concepts=4)
    assert not stages.interp.autointerp_done(other, job)
    save_sae(sae, out / "sae")  # same weights re-saved: still done
    assert stages.interp.autointerp_done(profile, job)
    with torch.no_grad():
        sae.W_enc.mul_(2.0)
    save_sae(sae, out / "sae")
    assert not stages.interp.autointerp_done(profile, job)


def test_run_interp_needs_a_trained_sae(tiny_run):
    profile, job, _ = tiny_run
    (stages.sae_dir(profile, job) / stages.layout.RESULT).unlink()
    with pytest.raises(FileNotFoundError, match="run the train stage"):
        stages.interp.run(profile, job.model, job.arch, job.level)


def test_token_frequencies_skip_bos_and_specials_and_merge_same_text():
    tokens_NL = np.array([[1, 5, 6, 5, 2], [1, 7, 5, 0, 0]])  # 1 = BOS, 2 = EOS, 0 = PAD
    names = {5: " a", 6: "b", 7: "b"}
    freq = token_frequencies(tokens_NL, lambda ids: [names[i] for i in ids],
                                      special_ids=[0, 1, 2])
    assert freq == pytest.approx({" a": 3 / 5, "b": 2 / 5})
    with pytest.raises(ValueError, match="no ordinary token"):
        token_frequencies(np.array([[1, 0, 0]]), lambda ids: [], special_ids=[0, 1])


def test_grid_runs_interp_after_its_train_job_and_before_analysis(tmp_path):
    import yaml

    from saelib.profiles import PARAMS_DIR

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["runs_dir"] = str(tmp_path)
    jobs = {j.name: j for j in grid.build_jobs(profile_from_dict(data, name="smoke"))}
    trains = [j for j in jobs.values() if j.stage == "train"]
    interps = [j for j in jobs.values() if j.stage == "interp"]
    assert len(interps) == len(trains) == 5
    order = list(jobs)
    for job in interps:
        (dep,) = job.deps
        assert jobs[dep].stage == "train" and jobs[dep].parameters == job.parameters
        assert order.index(dep) < order.index(job.name)
    assert {j.name for j in interps} <= set(jobs["analysis"].deps)
