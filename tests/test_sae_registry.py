"""The architecture registry: the paper's five names map onto consistent sae-lens classes."""

import pytest
from sae_lens.saes import SAE

from saelib.sae.registry import ARCHITECTURES, get_arch
from saelib.sae.train import TrainConfig

PAPER_ARCHS = {"relu", "gated", "jumprelu", "topk", "batchtopk"}


def test_registry_holds_exactly_the_paper_architectures():
    assert set(ARCHITECTURES) == PAPER_ARCHS
    assert {s.sparsity_knob for s in ARCHITECTURES.values()} == {"k", "l1", "l0_target"}
    assert get_arch("relu").sparsity_knob == "l1" and get_arch("gated").sparsity_knob == "l1"
    assert get_arch("jumprelu").sparsity_knob == "l0_target"
    assert get_arch("topk").sparsity_knob == "k" and get_arch("batchtopk").sparsity_knob == "k"


def test_lookup_is_case_insensitive_and_accepts_sae_lens_name():
    assert get_arch("BatchTopK") is ARCHITECTURES["batchtopk"]
    assert get_arch("standard") is ARCHITECTURES["relu"]


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        get_arch("matryoshka")
    for name in PAPER_ARCHS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", sorted(PAPER_ARCHS))
def test_spec_is_consistent_with_sae_lens(name):
    spec = ARCHITECTURES[name]
    value = 4 if spec.sparsity_knob in ("k", "l0_target") else 0.5
    cfg = spec.make_config(16, 32, value, 7, TrainConfig())
    assert isinstance(cfg, spec.training_config_cls)
    assert cfg.architecture() == spec.sae_lens_architecture
    inference_cfg_cls = cfg.get_inference_config_class()
    assert inference_cfg_cls.architecture() == spec.inference_architecture
    sae = SAE.from_dict(cfg.get_inference_sae_cfg_dict())
    assert type(sae).__name__ == spec.inference_cls_name
    training = spec.training_sae_cls(cfg)
    assert training.cfg.d_in == 16 and training.cfg.d_sae == 32


def test_knob_values_reach_the_sae_lens_config():
    cfg = TrainConfig(jumprelu_l0_coefficient=2.5)
    relu = get_arch("relu").make_config(16, 32, 0.03, 11, cfg)
    assert relu.l1_coefficient == 0.03 and relu.l1_warm_up_steps == 11
    gated = get_arch("gated").make_config(16, 32, 0.08, 11, cfg)
    assert gated.l1_coefficient == 0.08 and gated.l1_warm_up_steps == 11
    jump = get_arch("jumprelu").make_config(16, 32, 5, 11, cfg)
    assert (jump.jumprelu_sparsity_loss_mode, jump.target_l0) == ("quadratic", 5.0)
    assert jump.l0_coefficient == 2.5 and jump.l0_warm_up_steps == 11
    topk = get_arch("topk").make_config(16, 32, 5, 11, cfg)
    assert topk.k == 5 and topk.rescale_acts_by_decoder_norm
    btk = get_arch("batchtopk").make_config(16, 32, 5, 11, cfg)
    assert btk.k == 5.0


@pytest.mark.parametrize("name,value,match", [
    ("topk", 33, "exceeds d_sae"), ("topk", 2.5, "integer"), ("batchtopk", 40, "exceeds d_sae"),
    ("relu", 0.0, "positive"), ("gated", -1.0, "positive"), ("jumprelu", 64, "exceeds d_sae"),
    ("relu", float("nan"), "positive"),
])
def test_bad_sparsity_values_are_rejected(name, value, match):
    with pytest.raises(ValueError, match=match):
        get_arch(name).make_config(16, 32, value, 0, TrainConfig())
