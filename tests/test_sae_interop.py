"""Interop: every architecture saelib trains is saved in sae-lens's format and loads back with
``sae_lens.SAE.load_from_disk`` with identical encode/decode (tolerance 1e-5)."""

import json

import pytest
import sae_lens
import torch

from saelib.results import CorruptFileError
from saelib.sae.io import load_sae, save_sae
from saelib.sae.registry import ARCHITECTURES
from saelib.sae.train import TrainConfig, train_sae

D_IN, D_SAE = 16, 32
KNOB = {"relu": 1.0, "gated": 1.0, "jumprelu": 4, "topk": 4, "batchtopk": 4}


def stream(seed):
    dirs = torch.randn(48, D_IN, generator=torch.Generator().manual_seed(1234))
    dirs /= dirs.norm(dim=-1, keepdim=True)
    offset_D = torch.zeros(D_IN)
    offset_D[:3] = torch.tensor([300.0, -180.0, 240.0])
    g = torch.Generator().manual_seed(seed)
    while True:
        on = (torch.rand(512, 48, generator=g) < 0.08).float()
        yield (on * (torch.rand(512, 48, generator=g) * 2 + 0.5)) @ dirs + offset_D


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_saved_sae_loads_in_sae_lens_with_identical_encode_decode(arch, tmp_path):
    spec = ARCHITECTURES[arch]
    cfg = TrainConfig(batch_size=256, lr=3e-3, progress=False)
    res = train_sae(arch, D_IN, D_SAE, KNOB[arch], stream(0), 256 * 200, cfg,
                    metadata={"model_name": "synthetic", "hook_name": "blocks.0.hook_resid_post"})
    save_sae(res.sae, tmp_path)
    loaded = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(loaded).__name__ == spec.inference_cls_name
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == \
        spec.inference_architecture
    assert loaded.cfg.metadata.model_name == "synthetic"
    x = next(stream(7))
    with torch.no_grad():
        codes_mem, codes_disk = res.sae.encode(x), loaded.encode(x)
        assert torch.allclose(codes_mem, codes_disk, atol=1e-5)
        assert torch.allclose(res.sae.decode(codes_mem), loaded.decode(codes_mem), atol=1e-5)
        assert torch.allclose(res.sae(x), loaded(x), atol=1e-5)
        # and the SAE is a real reconstruction of the raw stream, not a trivial one
        ev = 1 - ((loaded(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert ev > 0.5
    assert 0 < (codes_disk != 0).sum(-1).float().mean() < D_SAE / 2
    assert torch.allclose(loaded.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5)
    ours = load_sae(tmp_path)
    assert torch.equal(ours.W_enc, loaded.W_enc)


def test_load_sae_names_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{trunc")
    (tmp_path / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="cfg.json"):
        load_sae(tmp_path)
