"""Corrupt or truncated artefacts are detected on read, named, and recomputed (issue "Reliability",
item 1): activation shards, SAE weights, training checkpoints, result JSON, descriptive inputs.

Each test damages one file the way a full disk or a killed copy would (truncation, flipped bytes)
and checks three things: the damage is reported by file name, the stage counts as not done, and
recomputing gives back what was there before.
"""

from __future__ import annotations

import json

import pytest
import torch

from saelib import stages
from saelib.profiles import RUNS_ENV, ProfileError, load_profile
from saelib.results import sha256_file
from saelib.sae.train import TrainConfig, latest_checkpoint, train_sae


def flip_bytes(path, at: int = -64, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[at + i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def activations(seed: int, n_chunks: int = 12, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_chunks):
        yield torch.randn(256, d, generator=g)


def test_corrupt_checkpoint_is_named_and_training_restarts_to_the_same_sae(tmp_path, capsys):
    cfg = TrainConfig(batch_size=256, lr=3e-3, progress=False, checkpoint_every=4)
    total = 256 * 12
    clean = train_sae("topk", 8, 16, 2, activations(0), total, cfg, seed=1)
    first = train_sae("topk", 8, 16, 2, activations(0), total, cfg, checkpoint_dir=tmp_path, seed=1)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    flip_bytes(ckpt / "state.safetensors")
    assert latest_checkpoint(tmp_path) is None
    assert "differs from its checksum" in capsys.readouterr().err
    again = train_sae("topk", 8, 16, 2, activations(0), total, cfg, checkpoint_dir=tmp_path, seed=1)
    assert again.resumed_from_step is None  # trained again from scratch, not from the bad file
    for name, value in clean.sae.state_dict().items():
        assert torch.allclose(value, again.sae.state_dict()[name], atol=1e-6), name
        assert torch.allclose(value, first.sae.state_dict()[name], atol=1e-6), name
    (tmp_path / "latest.json").write_text("{not json")
    assert latest_checkpoint(tmp_path) is None
    assert "restarts from scratch" in capsys.readouterr().err


@pytest.mark.slow
def test_corrupt_shard_sae_and_inputs_are_recomputed_on_the_smoke_profile(smoke_topk_root, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv(RUNS_ENV, str(smoke_topk_root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    profile = load_profile("smoke")
    entry = profile.models[0]
    assert stages.capture.done(profile, entry)
    # The smoke profile streams its training split (no shards on disk): the eval split's shards
    # are the ones the capture stage stores and checks.
    assert stages.streaming.streaming(profile)
    eval_dir = stages.layout.activations_dir(profile, entry, "eval")
    assert not (stages.layout.activations_dir(profile, entry, "train") / "manifest.json").exists()
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    shard = eval_dir / manifest["shards"][-1]["file"]
    before = sha256_file(shard)

    flip_bytes(shard, at=4096)
    assert not stages.capture.done(profile, entry)
    assert shard.name in capsys.readouterr().err
    stages.capture.run(profile, entry.name, progress=False)
    assert stages.capture.done(profile, entry) and sha256_file(shard) == before

    inputs = stages.layout.descriptive_dir(profile, entry)
    victim = inputs / "absorption_acts.npy"
    before_inputs = sha256_file(victim)
    truncate(victim)
    job = stages.SAEJob(entry.name, "topk", 0)
    with pytest.raises(FileNotFoundError, match="absorption_acts.npy"):
        stages.interp.run_descriptive(profile, entry.name, "topk", 0, progress=False)
    assert not stages.capture.done(profile, entry)
    assert victim.name in capsys.readouterr().err
    stages.capture.run(profile, entry.name, progress=False)
    assert stages.capture.done(profile, entry) and sha256_file(victim) == before_inputs
    assert stages.interp.run_descriptive(profile, entry.name, "topk", 0, progress=False)["probing_sets"] == 2

    weights = stages.sae_dir(profile, job) / "sae" / stages.layout.SAE_WEIGHTS
    saved = sha256_file(weights)
    assert stages.train.done(profile, job) and stages.interp.descriptive_done(profile, job)
    truncate(weights, keep=0.9)
    assert not stages.train.done(profile, job) and not stages.interp.descriptive_done(profile, job)
    assert weights.name in capsys.readouterr().err
    # Streamed SAEs are trained by the model's capture job: the train job refuses the damaged
    # file by name, and the capture job trains that one SAE again from the stream.
    assert not stages.capture.done(profile, entry)
    with pytest.raises(ProfileError, match="capture job"):
        stages.train.run(profile, entry.name, "topk", 0, progress=False)
    stages.capture.run(profile, entry.name, progress=False)
    assert stages.capture.done(profile, entry) and sha256_file(weights) == saved
    stages.train.run(profile, entry.name, "topk", 0, progress=False)
    assert stages.train.done(profile, job) and sha256_file(weights) == saved  # same seed, same SAE
