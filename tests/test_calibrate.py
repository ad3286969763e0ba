"""L0 calibration: the search brackets the target, real training lands in the ±25 % band, and
the JSON cache makes reruns free."""

import dataclasses
import math

import pytest
import torch
import yaml

from saelib.profiles import PARAMS_DIR
from saelib.results import read_json
from saelib.sae.calibrate import (CalibrationConfig, CalibrationKey, CalibrationResult, Probe,
                                  bracket_search, calibrate_sparsity)
from saelib.sae.train import TrainConfig

D_IN, D_SAE = 16, 32
CFG = TrainConfig(batch_size=256, lr=3e-3, progress=False)


def stream(seed=0):
    dirs = torch.randn(48, D_IN, generator=torch.Generator().manual_seed(1234))
    dirs /= dirs.norm(dim=-1, keepdim=True)
    offset_D = torch.zeros(D_IN)
    offset_D[:3] = torch.tensor([300.0, -180.0, 240.0])
    g = torch.Generator().manual_seed(seed)
    while True:
        on = (torch.rand(512, 48, generator=g) < 0.08).float()
        yield (on * (torch.rand(512, 48, generator=g) * 2 + 0.5)) @ dirs + offset_D


@pytest.mark.parametrize("exponent,increasing", [(-1.7, False), (-0.4, False), (0.6, True)])
def test_search_converges_on_monotone_power_laws(exponent, increasing):
    """L0 = 40 * knob^exponent: the band [37.5, 62.5] around 50 is reached in a few probes."""
    def measure(knob):
        return Probe(knob=knob, realised_l0=40 * knob ** exponent, explained_variance=0.9,
                     seconds=0.0)

    start = 1e-3 if exponent < 0 else 1e3  # far off, so the bracket must be found first
    trace = bracket_search(measure, start, 50.0, increasing, CalibrationConfig(max_probes=12))
    assert 37.5 <= trace[-1].realised_l0 <= 62.5
    assert len(trace) <= 12


def test_relu_calibration_hits_target_band_and_is_cached(tmp_path):
    cache = tmp_path / "calib.json"
    calls = []

    def batches():
        calls.append(1)
        return stream()

    res = calibrate_sparsity("relu", 3, model="synthetic", layer=0, d_in=D_IN, d_sae=D_SAE,
                             make_batches=batches, probe_tokens=256 * 300, cache_path=cache,
                             train_cfg=CFG)
    assert res.within_band and 2.25 <= res.realised_l0 <= 3.75
    assert res.knob_name == "l1" and len(res.trace) == len(calls) >= 1
    assert res.trace[-1].knob == res.knob_value and not res.from_cache
    # higher λ than the default start: the realised L0 at λ=1 was above the target
    assert res.knob_value > 1.0
    stored = read_json(cache)
    assert len(stored) == 1 and "synthetic|L0|relu|target=3|width=32" in next(iter(stored))

    n = len(calls)
    again = calibrate_sparsity("relu", 3, model="synthetic", layer=0, d_in=D_IN, d_sae=D_SAE,
                               make_batches=batches, probe_tokens=256 * 300, cache_path=cache,
                               train_cfg=CFG)
    assert again.from_cache and len(calls) == n
    assert again.knob_value == res.knob_value and again.trace == res.trace
    assert again.trained is None  # a cache hit has no probe in memory: the caller trains

    # different training settings are a cache miss, not a stale hit
    other = calibrate_sparsity("relu", 3, model="synthetic", layer=0, d_in=D_IN, d_sae=D_SAE,
                               make_batches=batches, probe_tokens=256 * 300, cache_path=cache,
                               train_cfg=TrainConfig(batch_size=256, lr=2e-3, progress=False),
                               calib_cfg=CalibrationConfig(max_probes=1))
    assert not other.from_cache and len(calls) == n + 1


def test_best_probe_is_the_sae_the_final_training_would_give(tmp_path):
    """The pipeline keeps the best probe instead of training it again (stages.train.sparsity_value):
    valid only because a probe trains exactly as the final SAE does. The final run also
    checkpoints; its weights must equal the probe's bit for bit."""
    from saelib.sae.train import train_sae

    res = calibrate_sparsity("gated", 4, model="synthetic", layer=0, d_in=D_IN, d_sae=D_SAE,
                             make_batches=stream, probe_tokens=256 * 60, cache_path=None,
                             train_cfg=CFG, calib_cfg=CalibrationConfig(max_probes=3))
    assert res.trained is not None and res.trained.sparsity_value == res.knob_value
    assert res.trained.tokens_seen == 256 * 60
    final = train_sae("gated", D_IN, D_SAE, res.knob_value, stream(), 256 * 60,
                      dataclasses.replace(CFG, checkpoint_every=10),
                      checkpoint_dir=tmp_path / "ckpt", seed=0)
    probe_sd, final_sd = res.trained.sae.state_dict(), final.sae.state_dict()
    assert probe_sd.keys() == final_sd.keys()
    for name, tensor in final_sd.items():
        assert torch.equal(probe_sd[name], tensor), name
    assert final.l0 == res.trained.l0


def test_gated_calibration_with_heldout_set(tmp_path):
    heldout = next(stream(seed=5))
    res = calibrate_sparsity("gated", 4, model="synthetic", layer=0, d_in=D_IN, d_sae=D_SAE,
                             make_batches=stream, probe_tokens=256 * 300, train_cfg=CFG,
                             heldout_acts_ND=heldout)
    assert res.within_band and 3 <= res.realised_l0 <= 5
    assert all(math.isfinite(p.explained_variance) for p in res.trace)


def test_neighbouring_target_seeds_the_next_search(tmp_path):
    cache = tmp_path / "calib.json"
    kw = dict(model="synthetic", layer=0, d_in=D_IN, d_sae=D_SAE, make_batches=stream,
              probe_tokens=256 * 300, cache_path=cache, train_cfg=CFG)
    first = calibrate_sparsity("relu", 3, **kw)
    second = calibrate_sparsity("relu", 6, **kw)
    # starts from λ(3) * L0(3) / 6 rather than the default λ = 1
    assert second.trace[0].knob == pytest.approx(first.knob_value * first.realised_l0 / 6)
    assert second.within_band


def test_an_explicit_start_is_tried_first_and_costs_one_probe_when_in_band(tmp_path):
    """The profile's ``grid.calibration_start`` (an earlier run's calibrated knob): a fresh search
    from it trains once, gives the earlier run's SAE, and wins over a neighbour in the cache."""
    kw = dict(model="synthetic", layer=0, d_in=D_IN, d_sae=D_SAE, make_batches=stream,
              probe_tokens=256 * 300, train_cfg=CFG)
    earlier = calibrate_sparsity("relu", 3, cache_path=tmp_path / "earlier.json", **kw)
    assert len(earlier.trace) > 1  # from λ = 1 the search needs several probes
    cache = tmp_path / "fresh.json"
    calibrate_sparsity("relu", 6, cache_path=cache, **kw)  # a neighbour the start must beat
    again = calibrate_sparsity("relu", 3, cache_path=cache,
                               calib_cfg=CalibrationConfig(start=earlier.knob_value), **kw)
    assert [p.knob for p in again.trace] == [earlier.knob_value]
    assert again.realised_l0 == earlier.realised_l0 and again.within_band
    for name, tensor in earlier.trained.sae.state_dict().items():
        assert torch.equal(again.trained.sae.state_dict()[name], tensor), name
    # a start outside the band is only a start: the search goes on and lands in the band
    off = calibrate_sparsity("relu", 3, calib_cfg=CalibrationConfig(start=earlier.knob_value / 50),
                             **kw)
    assert off.trace[0].knob == pytest.approx(earlier.knob_value / 50)
    assert len(off.trace) > 1 and off.within_band


def test_profile_calibration_start_reaches_the_search(monkeypatch):
    """``grid.calibration_start`` travels from the profile to the search of each level; ``l1``
    still sets the fallback start."""
    from saelib import stages
    from saelib.profiles import profile_from_dict

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["grid"]["calibrate"] = True
    data["grid"]["calibration_start"] = {"gated": [0.123], "jumprelu": [7.5]}
    profile = profile_from_dict(data, name="start")
    seen = {}

    def fake_calibrate(arch, target, **kwargs):
        seen[arch] = kwargs["calib_cfg"]
        key = CalibrationKey(kwargs["model"], kwargs["layer"], arch, target, kwargs["d_sae"], 0)
        return CalibrationResult(key=key, knob_name="x", knob_value=1.0, realised_l0=target,
                                 within_band=True, band=(0, 1))

    monkeypatch.setattr("saelib.stages.train.calibrate_sparsity", fake_calibrate)
    for arch in ("gated", "jumprelu", "standard"):
        stages.train.sparsity_value(profile, stages.SAEJob(profile.models[0].name, arch, 0),
                                d_in=D_IN)
    assert seen["gated"].start == 0.123 and seen["jumprelu"].start == 7.5
    assert seen["relu"].start is None  # sae-lens's name for the paper's "standard"


def test_a_models_calibration_start_wins_over_the_grids(monkeypatch):
    """Calibrated knobs belong to a model and layer: a model's ``calibration_start`` is used for
    its SAEs, the grid's for the architectures it does not name, and the other model keeps the
    grid's."""
    from saelib import stages
    from saelib.profiles import profile_from_dict

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["grid"]["calibrate"] = True
    data["grid"]["calibration_start"] = {"gated": [0.123], "jumprelu": [7.5]}
    other = dict(data["models"][0], label="other")
    data["models"][0]["calibration_start"] = {"gated": [0.456]}
    data["models"].append(other)
    profile = profile_from_dict(data, name="per-model")
    first, second = profile.models
    assert profile.calibration_start(first.display) == {"gated": (0.456,), "jumprelu": (7.5,)}
    assert profile.calibration_start(second.display) == {"gated": (0.123,), "jumprelu": (7.5,)}
    job = stages.SAEJob(first.name, "gated", 0)
    assert stages.train.search_start(profile, job).start == 0.456
    assert stages.train.search_start(profile, stages.SAEJob(first.name, "jumprelu", 0)).start == 7.5


def test_topk_needs_no_search_and_jumprelu_starts_at_target():
    called = []
    res = calibrate_sparsity("topk", 7, model="m", layer=1, d_in=D_IN, d_sae=D_SAE,
                             make_batches=lambda: called.append(1), probe_tokens=256, train_cfg=CFG)
    assert (res.knob_name, res.knob_value, res.trace, called) == ("k", 7.0, [], [])
    # target 8: above the ~6 latents per token this undercomplete SAE floors at in 300 steps
    jump = calibrate_sparsity("jumprelu", 8, model="m", layer=1, d_in=D_IN, d_sae=D_SAE,
                              make_batches=stream, probe_tokens=256 * 300, train_cfg=CFG)
    assert jump.knob_name == "l0_target" and jump.trace[0].knob == pytest.approx(8.0)
    assert jump.within_band


@pytest.mark.parametrize("kwargs,match", [
    ({"target_l0": 0}, "target_l0"), ({"target_l0": 64}, "target_l0"),
    ({"probe_tokens": 10}, "probe_tokens"), ({"calib_cfg": CalibrationConfig(tolerance=1.5)},
                                             "tolerance"),
])
def test_calibration_input_errors(kwargs, match):
    args = dict(target_l0=4, model="m", layer=0, d_in=D_IN, d_sae=D_SAE, make_batches=stream,
                probe_tokens=256 * 10, train_cfg=CFG)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_sparsity("relu", **args)


def test_search_stops_when_the_knob_moves_l0_the_wrong_way():
    """JumpReLU's target knob in short runs has a floor: below it, lowering the knob raises L0
    (default activations: target 6 → L0 10.8, 3 → 16.6). The search stops at the first step that
    moves L0 away from the target instead of spending its remaining probes; the best probe is
    kept by the caller."""
    response = {8.0: 12.0, 4.0: 16.0, 2.0: 30.0}
    calls = []

    def measure(knob):
        calls.append(knob)
        l0 = response.get(round(knob, 6), 20.0 + abs(math.log(knob / 8.0)) * 10)
        return Probe(knob, l0, 0.9, 0.0)

    trace = bracket_search(measure, 8.0, 6.0, increasing=True, cfg=CalibrationConfig())
    assert len(trace) == 2 and trace[1].knob < trace[0].knob
    assert trace[1].realised_l0 > trace[0].realised_l0


def test_a_search_starts_at_the_profiles_start_then_its_l1_then_the_target():
    """One choice of first knob for both training modes (the cached search and the streaming
    lockstep one): ``grid.calibration_start``, else the profile's λ (ReLU / Gated), else the
    target itself (JumpReLU's knob is a target L0)."""
    from saelib.profiles import load_profile
    from saelib.sae.calibrate import CalibrationConfig, first_knob
    from saelib.stages import train
    from saelib.stages.layout import SAEJob

    assert first_knob("l1", 10, CalibrationConfig(initial_l1=0.5, start=3.0)) == 3.0
    assert first_knob("l1", 10, CalibrationConfig(initial_l1=0.5)) == 0.5
    assert first_knob("l0_target", 10, CalibrationConfig(initial_l1=0.5)) == 10.0
    default = load_profile("default")
    model = default.models[0].name
    cfg = train.search_start(default, SAEJob(model, "standard", 1))
    assert cfg.start == default.grid.calibration_start["standard"][1]
    assert cfg.initial_l1 == default.grid.l1["standard"][1]
    smoke = load_profile("smoke")  # no calibration_start: the profile's λ, JumpReLU its target
    relu = train.search_start(smoke, SAEJob(model, "standard", 0))
    assert relu.start is None and first_knob("l1", 10, relu) == smoke.grid.l1["standard"][0]
    jump = train.search_start(smoke, SAEJob(model, "jumprelu", 0))
    assert first_knob("l0_target", smoke.grid.targets[0], jump) == smoke.grid.targets[0]


def test_the_controller_trains_every_calibrated_sae_once():
    """``grid.calibrate_by: controller``: ReLU and Gated are 'controlled' (one training from the
    search's first knob, no probes), JumpReLU is 'penalty' (one training at its target), TopK
    keeps its k; the record's trace says whether the realised L0 landed in the band."""
    from saelib import stages
    from saelib.profiles import profile_from_dict

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["grid"]["calibrate_by"] = "controller"
    data["grid"]["calibration_start"] = {"gated": [0.123]}
    profile = profile_from_dict(data, name="controlled")
    model = profile.models[0].name
    job = {arch: stages.SAEJob(model, arch, 0) for arch in ("standard", "gated", "jumprelu", "topk")}
    methods = {arch: stages.train.sparsity_method(profile, j) for arch, j in job.items()}
    assert methods == {"standard": "controlled", "gated": "controlled", "jumprelu": "penalty",
                       "topk": "k"}
    assert set(methods.values()) - {"k"} <= set(stages.train.SELF_TARGETING)
    assert stages.train.sparsity_value(profile, job["jumprelu"]) == \
        (float(profile.grid.targets[0]), {"method": "penalty"}, None)
    assert stages.train.sparsity_value(profile, job["standard"]) == \
        (profile.grid.l1["standard"][0], {"method": "controlled"}, None)
    assert stages.train.sparsity_value(profile, job["gated"])[0] == 0.123
    target = profile.grid.targets[0]
    inside = stages.train.controlled_trace(profile, job["gated"], 0.5, target * 1.2, 0.9, None)
    outside = stages.train.controlled_trace(profile, job["gated"], 0.5, target * 1.3, 0.9, None)
    assert inside["within_band"] and not outside["within_band"]
    assert inside["band"] == [target * 0.75, target * 1.25] and inside["knob_name"] == "l1"


@pytest.mark.slow
def test_a_streamed_jumprelu_under_the_controller_trains_once_at_its_target(tmp_path, monkeypatch):
    """The smoke profile with ``calibrate_by: controller`` and JumpReLU alone, in its streaming
    mode on the real packaged model: the stream passes once (no rounds of probes), the SAE's knob
    is its target and its record carries the held-out L0 and the band it is judged by."""
    from saelib import stages
    from saelib.profiles import RUNS_ENV, profile_from_dict

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["grid"]["calibrate_by"] = "controller"
    data["grid"]["architectures"] = ["jumprelu"]
    profile = profile_from_dict(data, name="penalty")
    assert profile.section("training").mode == "streaming"
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    entry = profile.models[0]
    stages.capture.prepare(profile, progress=False)
    stages.capture.run(profile, entry.name, progress=False)
    split = read_json(stages.layout.model_dir(profile, entry) / "capture.json")["splits"]["train"]
    assert split["cells"] == 1 and split["rounds"] == 1
    rec = stages.train.run(profile, entry.name, "jumprelu", 0, progress=False)
    target = float(profile.grid.targets[0])
    assert rec.sparsity_method["method"] == "penalty" and rec.sparsity_method["streamed"]
    assert rec.sparsity_value == target
    trace = rec.sparsity_method["trace"]
    assert trace["knob_value"] == target and trace["l0_control"] is None
    assert trace["realised_l0"] == pytest.approx(rec.core["l0"])
    assert trace["band"] == [0.75 * target, 1.25 * target]
    assert trace["within_band"] == (0.75 * target <= rec.core["l0"] <= 1.25 * target)


def test_a_null_start_leaves_that_level_to_its_neighbour_or_l1():
    """``calibration_start`` with null for a level that has no earlier knob (cpu-pair's Gemma level
    5): that level's search has no start, the others keep theirs."""
    from saelib import stages
    from saelib.profiles import profile_from_dict

    data = yaml.safe_load((PARAMS_DIR / "default.yaml").read_text())
    data["grid"]["calibration_start"]["standard"][5] = None
    profile = profile_from_dict(data, name="null-start")
    model = profile.models[0].name
    starts = [stages.train.search_start(profile, stages.SAEJob(model, "standard", level)).start
              for level in range(6)]
    assert starts[5] is None and starts[:5] == list(data["grid"]["calibration_start"]["standard"][:5])
    assert stages.train.search_start(profile, stages.SAEJob(model, "gated", 5)).start is not None
