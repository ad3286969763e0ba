"""Profiles: the shipped YAMLs validate, and every bad value is one clear ``ProfileError``.

Protocol "Parameters": a typo must fail in a second, naming the valid choices, rather than after an
hour of capture.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saelib.models import PACKAGED, is_known_model
from saelib.profiles import (PAPER_ARCHITECTURES, PARAMS_DIR, Profile, ProfileError,
                             available_profiles, load_profile, profile_from_dict, section_config)
from saelib.sae.train import TrainConfig


def smoke_dict() -> dict:
    return yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())


def with_change(path: str, value) -> dict:
    """The smoke profile with ``value`` at the dotted ``path`` (``models.0.layer``)."""
    data = smoke_dict()
    node = data
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("name", available_profiles())
def test_shipped_profiles_load_and_validate(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.models
    assert all(m.name in PACKAGED or is_known_model(m.name) for m in profile.models)
    assert set(profile.grid.architectures) <= set(PAPER_ARCHITECTURES)
    cfg = section_config(TrainConfig, profile, "training")
    assert cfg.batch_size == profile.training.get("batch_size", TrainConfig().batch_size)


def test_default_and_smoke_are_shipped():
    assert {"default", "smoke"} <= set(available_profiles())


def test_load_profile_accepts_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(smoke_dict()))
    profile = load_profile(path)
    assert profile.name == "mine"
    assert profile.grid == load_profile("smoke").grid


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(ProfileError, match=r"unknown profile 'nope'; available: .*default.*smoke"):
        load_profile("nope")


def test_invalid_yaml_is_a_profile_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ProfileError, match="a profile is a mapping"):
        load_profile(path)


BAD = [
    pytest.param({**smoke_dict(), "modles": []}, r"unknown key\(s\) 'modles'; valid keys: name, "
                 r"description, seed, models, corpus", id="unknown-top-level-key"),
    pytest.param(with_change("corpus.contxt", 64),
                 r"corpus: unknown key\(s\) 'contxt'; valid keys: source, text_field, context",
                 id="unknown-nested-key"),
    pytest.param(with_change("models.0.layr", 3), r"unknown key\(s\) 'layr'; valid keys: name, layer",
                 id="unknown-model-key"),
    pytest.param(with_change("corpus.context", "64"), r"corpus\.context: expected int, got str",
                 id="wrong-type-str-for-int"),
    pytest.param(with_change("corpus.context", 64.5), r"corpus\.context: expected int, got float",
                 id="wrong-type-float-for-int"),
    pytest.param(with_change("seed", True), r"seed: expected an integer, got True", id="bool-for-int"),
    pytest.param(with_change("grid.targets", 10), r"grid\.targets: expected a list", id="scalar-for-list"),
    pytest.param(with_change("corpus", [1, 2]), r"corpus: expected a mapping of CorpusConfig keys",
                 id="list-for-section"),
    pytest.param(with_change("models.0.name", "not-a-model"),
                 r"unknown model 'not-a-model': use a packaged model \(gemma-3-270m, "
                 r"qwen2\.5-coder-0\.5b-instruct, smollm2-135m-instruct\)", id="unknown-model"),
    pytest.param(with_change("models.0.layer", 30),
                 r"model 'smollm2-135m-instruct': layer 30 out of range \(0\.\.29\)", id="layer-beyond-model"),
    pytest.param(with_change("models.0.layer", -1), r"layer -1 out of range \(0\.\.29\)", id="negative-layer"),
    pytest.param(with_change("models", []), r"names no models", id="no-models"),
    pytest.param(with_change("grid.architectures", ["standard", "relu"]),
                 r"unknown architecture 'relu'; valid: standard, gated, jumprelu, topk, batchtopk",
                 id="unknown-architecture"),
    pytest.param(with_change("grid.architectures", ["topk", "topk"]), r"lists an architecture twice",
                 id="duplicate-architecture"),
    pytest.param(with_change("grid.width", -5), r"grid\.width must be positive, got -5", id="negative-width"),
    pytest.param(with_change("grid.targets", [300]),
                 r"grid\.targets: target L0 300 out of range 1\.\.width \(256\)", id="target-above-width"),
    pytest.param(with_change("grid.targets", [0]), r"target L0 0 out of range", id="zero-target"),
    pytest.param(with_change("grid.targets", []), r"grid\.targets is empty", id="empty-targets"),
    pytest.param(with_change("grid.l1", {"standard": [0.02, 0.03], "gated": [0.024]}),
                 r"grid\.l1\.standard needs one coefficient per target \(1\), got 2", id="l1-wrong-length"),
    pytest.param(with_change("grid.l1", {"topk": [0.02]}), r"grid\.l1 is for 'standard' and 'gated' only",
                 id="l1-for-topk"),
    pytest.param(with_change("grid.l1", {"standard": [-0.02]}), r"coefficients must be positive",
                 id="l1-negative"),
    pytest.param(with_change("grid.calibration_start", {"topk": [3.0]}),
                 r"grid\.calibration_start is for standard, gated, jumprelu only", id="start-for-topk"),
    pytest.param(with_change("grid.calibration_start", {"gated": [1.0, 2.0]}),
                 r"grid\.calibration_start\.gated needs one knob per target \(1\), got 2",
                 id="start-wrong-length"),
    pytest.param(with_change("grid.calibration_start", {"jumprelu": [0.0]}),
                 r"grid\.calibration_start\.jumprelu: knobs must be positive and finite",
                 id="start-zero"),
    pytest.param(with_change("grid.calibration_start", {"standard": [float("nan")]}),
                 r"knobs must be positive and finite", id="start-nan"),
    pytest.param(with_change("models.0.calibration_start", {"gated": [1.0, 2.0]}),
                 r"models\[SmolLM2-135M\]\.calibration_start\.gated needs one knob per target \(1\), "
                 r"got 2", id="model-start-wrong-length"),
    pytest.param(with_change("models.0.calibration_start", {"batchtopk": [3.0]}),
                 r"models\[SmolLM2-135M\]\.calibration_start is for standard, gated, jumprelu only",
                 id="model-start-for-batchtopk"),
    pytest.param(with_change("grid.calibrate_by", "guess"),
                 r"grid\.calibrate_by must be one of search, controller, got 'guess'",
                 id="unknown-calibrate-by"),
    pytest.param(with_change("corpus.context", 4), r"corpus\.context must be >= 8", id="context-too-small"),
    pytest.param(with_change("corpus.train_tokens", 10), r"at least one context of 64 tokens",
                 id="train-tokens-below-context"),
    pytest.param(with_change("corpus.max_documents", -1), r"max_documents must be >= 0",
                 id="negative-max-documents"),
    pytest.param(with_change("capture.batch_size", 0), r"capture\.batch_size .* must be >= 1",
                 id="zero-batch"),
    pytest.param(with_change("capture.dtype", "float16"),
                 r"capture\.dtype must be 'float32' or 'bfloat16', got 'float16'",
                 id="unknown-capture-dtype"),
    pytest.param(with_change("device", "tpu"), r"device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'",
                 id="unknown-device"),
    pytest.param(with_change("training", [1]), r"training: expected a mapping", id="list-for-stage-section"),
]


@pytest.mark.parametrize("data,message", BAD)
def test_validation_errors_name_the_problem_and_the_valid_choices(data, message):
    with pytest.raises(ProfileError, match=message):
        profile_from_dict(data, name="bad")


def test_errors_are_value_errors():
    """Callers that catch ``ValueError`` (the CLI, notebooks) also catch profile errors."""
    assert issubclass(ProfileError, ValueError)


def test_two_models_with_the_same_label_are_rejected():
    data = smoke_dict()
    data["models"] = [{"name": "smollm2-135m-instruct", "layer": 3},
                      {"name": "smollm2-135m-instruct", "layer": 4}]
    with pytest.raises(ProfileError, match="give each a distinct 'label'"):
        profile_from_dict(data)
    data["models"][1]["label"] = "SmolLM2 L4"
    assert [m.display for m in profile_from_dict(data).models] == ["smollm2-135m-instruct", "SmolLM2 L4"]


def test_local_folder_and_hub_id_are_accepted_without_a_layer_bound(tmp_path):
    data = with_change("models", [{"name": str(tmp_path), "layer": 100, "label": "local"},
                                  {"name": "google/gemma-2-2b", "layer": 12}])
    assert [m.layer for m in profile_from_dict(data).models] == [100, 12]


@pytest.mark.parametrize("name", ["", "~nosuchuser_saelib/x/y", "a" * 300, "bad\x00name"])
def test_odd_model_names_are_profile_errors(name):
    with pytest.raises(ProfileError, match="unknown model"):
        profile_from_dict(with_change("models.0.name", name))


def test_model_lookup_by_name_or_label():
    profile = load_profile("smoke")
    assert profile.model("SmolLM2-135M") is profile.model("smollm2-135m-instruct")
    with pytest.raises(ProfileError, match="has no model 'gpt2'; valid: SmolLM2-135M"):
        profile.model("gpt2")


def test_stage_sections_are_validated_with_the_profile():
    """A typo in a stage section (``training``) fails when the profile loads, not hours later."""
    with pytest.raises(ProfileError, match=r"profile 'typo' section 'training': unknown key\(s\) "
                                           r"'btach_size'; valid keys: batch_size, lr"):
        profile_from_dict(with_change("training", {"btach_size": 64}), name="typo")
    with pytest.raises(ProfileError, match=r"profile 'hot' section 'training': .*lr must be in \(0, 1\)"):
        profile_from_dict(with_change("training", {"lr": 5.0}), name="hot")


def test_section_config_rejects_unknown_overrides_naming_the_valid_keys():
    smoke = load_profile("smoke")
    with pytest.raises(ProfileError, match=r"section 'training': unknown key\(s\) 'btach_size'; "
                                           r"valid keys: batch_size, lr"):
        section_config(TrainConfig, smoke, "training", btach_size=64)
    with pytest.raises(ProfileError, match=r"section 'training'\.batch_size: expected int"):
        section_config(TrainConfig, smoke, "training", batch_size="big")
    with pytest.raises(ProfileError, match=r"section 'training': TrainConfig: batch_size must be >= 1"):
        section_config(TrainConfig, smoke, "training", batch_size=0)


def test_section_config_applies_overrides_and_coerces_ints_to_floats():
    profile = profile_from_dict(with_change("training", {"lr": 0.5, "batch_size": 64}))
    cfg = section_config(TrainConfig, profile, "training", progress=False, adam_beta1=0)
    assert (cfg.lr, cfg.batch_size, cfg.progress, cfg.adam_beta1) == (0.5, 64, False, 0.0)
    assert isinstance(cfg.adam_beta1, float)


def test_optional_and_literal_fields_are_type_checked():
    """``int | None`` and ``Literal`` fields of stage configs are checked like plain ones."""
    with pytest.raises(ProfileError, match=r"'training'\.lr_warm_up_steps: expected int or NoneType, got str"):
        profile_from_dict(with_change("training.lr_warm_up_steps", "ten"))
    with pytest.raises(ProfileError, match=r"'training'\.dtype: expected one of 'float32', 'bfloat16', "
                                           r"got 'float16'"):
        profile_from_dict(with_change("training.dtype", "float16"))
    ok = profile_from_dict(with_change("training.lr_warm_up_steps", None))
    assert ok.training["lr_warm_up_steps"] is None


def test_runs_env_moves_the_run_root(tmp_path, monkeypatch):
    from saelib.profiles import RUNS_ENV

    monkeypatch.delenv(RUNS_ENV, raising=False)
    smoke = load_profile("smoke")
    assert smoke.run_root() == PARAMS_DIR.parent / "runs" / "smoke"
    assert profile_from_dict({**smoke_dict(), "runs_dir": str(tmp_path)}, "s").run_root() == tmp_path / "s"
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "elsewhere"))
    assert smoke.run_root() == tmp_path / "elsewhere" / "smoke"


# ---------------------------------------------------------------------------------------------
# Properties

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), inner, max_size=3),
    max_leaves=8)

SECTION_PATHS = ["seed", "description", "models", "models.0", "models.0.name", "models.0.layer",
                 "models.0.label", "corpus", "corpus.context", "corpus.source", "corpus.train_tokens",
                 "capture", "capture.batch_size", "grid", "grid.width", "grid.targets",
                 "grid.architectures", "grid.l1", "grid.l1.standard", "grid.calibrate", "training",
                 "core", "runs_dir", "device", "new_key", "corpus.new_key", "grid.new_key",
                 "descriptive", "descriptive.absorption", "descriptive.absorption.n_words",
                 "descriptive.probing", "descriptive.probing.datasets", "descriptive.probing.ks",
                 "descriptive.dense_threshold"]


def _check_junk(data) -> None:
    try:
        result = profile_from_dict(data, name="junk")
    except ProfileError:
        return
    assert isinstance(result, Profile)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Profile)]) | st.text(max_size=8)
                       | st.integers(-3, 3), JUNK, max_size=5))
def test_junk_mappings_only_ever_raise_profile_errors(data):
    _check_junk(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SECTION_PATHS), JUNK)
def test_junk_in_any_section_only_ever_raises_profile_errors(path, value):
    _check_junk(with_change(path, value))


def _stage_field_names() -> list[tuple[str, str]]:
    import importlib

    from saelib.profiles import SECTION_CONFIGS

    out = []
    for section, target in SECTION_CONFIGS.items():
        module, cls_name = target.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        out += [(section, f.name) for f in dataclasses.fields(cls)]
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_stage_field_names()), JUNK)
def test_junk_values_for_real_stage_keys_only_ever_raise_profile_errors(section_key, value):
    """Stage sections are checked by their own dataclasses; a wrong type there (``lr: "fast"``,
    ``lr_warm_up_steps: [1]``) must still surface as a ProfileError, not a TypeError."""
    section, key = section_key
    _check_junk(with_change(f"{section}.{key}", value))


@st.composite
def valid_grids(draw):
    width = draw(st.integers(1, 1 << 16))
    targets = draw(st.lists(st.integers(1, width), min_size=1, max_size=8))
    archs = draw(st.lists(st.sampled_from(PAPER_ARCHITECTURES), min_size=1, max_size=5, unique=True))
    l1 = {a: draw(st.lists(st.floats(1e-6, 10.0), min_size=len(targets), max_size=len(targets)))
          for a in archs if a in ("standard", "gated")}
    return {"width": width, "targets": targets, "architectures": archs, "l1": l1,
            "calibrate": draw(st.booleans())}


@settings(max_examples=150, deadline=None)
@given(valid_grids())
def test_any_valid_grid_round_trips(grid):
    data = smoke_dict()
    data["grid"] = copy.deepcopy(grid)
    profile = profile_from_dict(data, name="rt")
    assert profile.grid.width == grid["width"]
    assert profile.grid.targets == tuple(grid["targets"])
    assert profile.grid.architectures == tuple(grid["architectures"])
    assert profile.grid.l1 == {a: tuple(v) for a, v in grid["l1"].items()}
    assert profile_from_dict(dataclasses.asdict(profile), name="rt") == profile
