"""saelib.plan: runs for every profile, counts what it claims exactly on small cases (from the
profile's own numbers), and holds each measured profile's stage times (``tests/data``) within
30 %."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from saelib import plan
from saelib.profiles import PARAMS_DIR, available_profiles, load_profile, profile_from_dict
from saelib.sae.registry import get_arch
from saelib.sae.train import TrainConfig
from saelib.stages import STAGES

@pytest.mark.parametrize("name", available_profiles())
@pytest.mark.parametrize("mode", ["cached", "streaming"])
def test_plan_runs_for_every_profile(name, mode):
    profile = load_profile(name)
    p = plan.build_plan(profile, mode=mode)
    names = [s.stage for s in p.stages]
    assert names == [s.name for s in STAGES if s.name in names]
    assert {"capture", "train", "interp", "steering", "selection"} <= set(names)
    for s in p.stages:
        for key in ("model_tokens", "flops", "seconds", "peak_memory", "disk_peak", "disk_final",
                    "judge_calls"):
            value = getattr(s, key)
            assert math.isfinite(value) and value >= 0, (name, s.stage, key, value)
    assert p.seconds > 0 and p.judge_usd > 0
    text = plan.format_plan(p)
    assert f"Plan for profile {name!r}" in text and "Total:" in text


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu", "topk"])
def test_sae_params_match_sae_lens(arch):
    spec = get_arch(arch)
    cfg = spec.build_config(12, 40, 4.0, 1, TrainConfig())
    sae = spec.training_sae_cls(cfg)
    counted = sum(p.numel() for p in sae.parameters())
    counted += sum(b.numel() for n, b in sae.named_buffers() if n == "threshold")
    assert plan.sae_params(12, 40, arch) == counted


def test_batchtopk_is_counted_as_saved_jumprelu():
    assert plan.sae_params(12, 40, "batchtopk") == plan.sae_params(12, 40, "topk") + 40


def test_training_flops_per_token():
    d, f, k = 4, 8, 2
    # encoder: forward + weight gradient; decoder: forward + code gradient + weight gradient;
    # Gated: two encodes, and the reconstruction from its gate through the decoder again
    assert plan.train_flops_per_token(d, f, "relu", k) == 2 * (2 * d * f) + 3 * (2 * d * f)
    assert plan.train_flops_per_token(d, f, "gated", k) == 4 * (2 * d * f) + 6 * (2 * d * f)
    assert plan.train_flops_per_token(d, f, "topk", k) == 2 * (2 * d * f) + 3 * (2 * d * k)
    assert plan.train_flops_per_token(d, f, "topk", k, True) == \
        plan.train_flops_per_token(d, f, "topk", k)
    assert plan.train_flops_per_token(d, f, "relu", k, True) == 2 * (2 * d * f) + 3 * (2 * d * k)
    assert plan.train_flops_per_token(d, f, "gated", k, True) == 4 * (2 * d * f) + 6 * (2 * d * k)
    assert plan.train_flops_per_token(d, f, "jumprelu", k, True) == \
        plan.train_flops_per_token(d, f, "jumprelu", k)
    assert plan.HARDWARE["cpu-2core"].cpu_decode
    assert not any(plan.HARDWARE[g].cpu_decode for g in ("A800", "H100", "H200"))


class _MatmulFlops:
    """Counts 2·M·K·N FLOPs of every matrix product an autograd step runs."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                    a, b = args[-2], args[-1]
                    counter.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
                return func(*args, **(kwargs or {}))

        self.flops, self._mode = 0, Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu", "topk", "batchtopk"])
@pytest.mark.parametrize("sparse_code", [False, True])
def test_the_flop_count_is_the_training_steps_matrix_products(arch, sparse_code):
    """A training step of saelib's SAE, its matrix products counted: the plan's FLOPs per token
    less its decode of the non-zeros (no matrix product), within the per-batch vector products
    (b_dec's encoder-side gradient, 2·d·F per batch: 1/B). A dense code (a GPU's decode, or early
    training) runs every decoder product; a sparse one (5 % non-zero) runs none for ReLU and
    Gated on the CPU."""
    from sae_lens.saes.sae import TrainStepInput

    d, f, b = 24, 96, 256
    torch.manual_seed(0)
    spec = get_arch(arch)
    k = 5 if arch in ("topk", "batchtopk") else 8.0
    sae = spec.training_class()(spec.make_config(d, f, k, 0, TrainConfig()))
    x = torch.randn(b, d) * 2
    if sparse_code and arch in ("relu", "gated"):
        bias = sae.b_gate if arch == "gated" else sae.b_enc
        with torch.no_grad():
            bias.copy_(-torch.quantile((x - sae.b_dec) @ sae.W_enc, 0.95, dim=0))
    with _MatmulFlops() as mm:
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={"l1": 0.5, "l0": 0.5}, dead_neuron_mask=None,
            n_training_steps=0, is_logging_step=False))
        out.loss.backward()
    sparse = sparse_code and arch in ("relu", "gated")
    if sparse:
        assert float((out.feature_acts != 0).float().mean()) < 0.125
    counted = plan.train_flops_per_token(d, f, arch, k, cpu_decode=sparse_code)
    n_decoder = {"gated": 6}.get(arch, 3) if sparse or arch in ("topk", "batchtopk") else 0
    counted -= n_decoder * 2 * d * k
    assert counted <= mm.flops / b <= counted * 1.02, (mm.flops / b, counted)


def test_work_counts_follow_the_profile():
    profile = load_profile("smoke")
    p = {s.stage: s for s in plan.build_plan(profile).stages}
    st = profile.section("steering")
    n_saes = len(profile.grid.targets) * len(profile.grid.architectures)
    # selection instructions at every factor, held-out ones at α* only
    gens = n_saes * st.n_concepts * (st.n_select * len(st.factors) + st.n_instructions - st.n_select)
    assert p["steering"].judge_calls == 3 * gens
    # the offline judge's fluency rule scores every answer (and a BOS) once more
    assert profile.section("judge").backend == "offline"
    assert p["steering"].model_tokens == gens * (plan.PROMPT_TOKENS + st.max_new_tokens) \
        + gens * (st.max_new_tokens + 1)
    n_latents = min(profile.section("interp").n_latents, profile.grid.width)
    assert p["interp"].judge_calls == 2 * n_saes * n_latents
    assert p["train"].jobs == n_saes


def test_streaming_keeps_the_paper_profile_off_the_disk():
    """The paper's Gemma-2-2B profile in the cached mode caches 5·10⁸ float32 activations of width
    2,304 (≈ 4.6 TB); streaming (as shipped) keeps the eval split and the SAEs only."""
    profile = load_profile("gemma-2-2b")
    assert profile.section("training").mode == "streaming"
    cached = plan.build_plan(profile, "H100", "cached")
    streaming = plan.build_plan(profile, "H100", "streaming")
    corpus = profile.corpus
    cache = (corpus.train_tokens + corpus.eval_tokens) * 2304 * 4
    assert max(s.disk_peak for s in cached.stages) >= cache
    assert max(s.disk_peak for s in streaming.stages) < 50e9
    cap_c = next(s for s in cached.stages if s.stage == "capture")
    cap_s = next(s for s in streaming.stages if s.stage == "capture")
    # cached: both splits through the model once; streaming: the eval split, and the training
    # split once (under the controller every SAE trains once: no rounds of probes)
    assert cap_c.model_tokens >= corpus.train_tokens + corpus.eval_tokens
    assert corpus.eval_tokens + corpus.train_tokens <= cap_s.model_tokens \
        < corpus.eval_tokens + 2 * corpus.train_tokens


def test_under_the_controller_every_sae_trains_once_and_the_stream_passes_once():
    """``grid.calibrate_by: controller``: a ReLU / Gated SAE is one training (no probes), and
    JumpReLU one training at its penalty's target, so the stream passes once; under the search,
    JumpReLU's probes cost their rounds."""
    def streamed(calibrate_by, architectures):
        data = yaml.safe_load((PARAMS_DIR / "gemma-2-2b.yaml").read_text())
        data["grid"]["calibrate_by"] = calibrate_by
        data["grid"]["architectures"] = architectures
        p = profile_from_dict(data, name=f"{calibrate_by}-{len(architectures)}")
        return next(s for s in plan.build_plan(p, "H100").stages if s.stage == "capture")

    corpus = load_profile("gemma-2-2b").corpus
    search = streamed("search", ["standard", "gated"])
    controlled = streamed("controller", ["standard", "gated"])
    passes = (search.model_tokens - controlled.model_tokens) / corpus.train_tokens
    assert passes == plan.ROUNDS_PER_SEARCH - 1  # the stream passes once instead of per round
    assert controlled.flops < search.flops / 1.4  # no probes: 28/18 trainings per SAE -> 1
    with_jump = streamed("controller", ["standard", "gated", "jumprelu"])
    assert with_jump.model_tokens == controlled.model_tokens
    searched_jump = streamed("search", ["standard", "gated", "jumprelu"])
    assert searched_jump.model_tokens == search.model_tokens
    assert with_jump.flops < searched_jump.flops / 1.4


def test_paper_check_is_of_the_papers_order():
    """On A800s the plan's capture + training hours for Gemma-2-2B are within a factor 2 of the
    paper's 17 h (its GPU count is not stated: a sanity check of the FLOP count and the assumed
    utilisation, not a measurement)."""
    t = plan.paper_check("A800").set_index("profile")
    ratio = t.loc["gemma-2-2b", "plan: capture + train hours"] / t.loc["gemma-2-2b", "paper: training hours"]
    assert 0.5 <= ratio <= 2.0


def test_a_stage_that_does_not_fit_is_named():
    """Gemma-2-9B's 30 SAEs with their Adam states and the model in one streaming job need more
    than an H100's 80 GB; an H200 holds them."""
    profile = load_profile("gemma-2-9b")
    assert "WARNING: stage capture needs" in plan.format_plan(plan.build_plan(profile, "H100", "streaming"))
    assert "WARNING" not in plan.format_plan(plan.build_plan(profile, "H200", "streaming"))


def test_unknown_hardware_and_mode_are_clear_errors():
    profile = load_profile("smoke")
    with pytest.raises(ValueError, match="unknown hardware"):
        plan.build_plan(profile, "TPU")
    with pytest.raises(ValueError, match="mode must be"):
        plan.build_plan(profile, mode="lazy")


def test_cli_prints_a_plan(capsys):
    plan.main(["--profile", "smoke", "--hardware", "H100", "--mode", "streaming"])
    out = capsys.readouterr().out
    assert "on H100" in out and "mode streaming" in out


#: Job seconds per stage of a fresh clone's `make book` on the default, with where they come from.
#: Fresh-clone runs' stage seconds, one file per profile (``<profile>_stage_seconds.json``).
MEASURED = sorted((Path(__file__).parent / "data").glob("*_stage_seconds.json"))


@pytest.mark.parametrize("path", MEASURED, ids=[p.name.split("_")[0] for p in MEASURED])
def test_plan_holds_measured_stage_times(path):
    """A profile's plan against a fresh clone's `make book` of it on this machine: every stage
    that takes at least 5 % of the run within 30 %, and their total within 30 %. Stages the
    record marks as measured beside other work, or whose work changed since (named, with the
    reason), are left out."""
    assert any(p.name == "default_stage_seconds.json" for p in MEASURED)
    measured = json.loads(path.read_text())
    seconds: dict[str, float] = {}
    left_out = {**measured.get("contended", {}), **measured.get("changed", {})}
    for stage, s in measured["stage_seconds"].items():  # the plan counts both summaries as analysis
        if stage not in left_out:
            key = "analysis" if stage == "observations" else stage
            seconds[key] = seconds.get(key, 0.0) + s
    p = {s.stage: s.seconds for s in plan.build_plan(load_profile(path.name.split("_")[0])).stages}
    total = sum(measured["stage_seconds"].values())
    checked = [k for k, s in seconds.items() if s >= 0.05 * total]
    assert len(checked) >= 4
    for stage in checked:
        assert p[stage] == pytest.approx(seconds[stage], rel=0.3), (stage, p[stage], seconds[stage])
    # a stage the plan has no work for (a judge job that only says it did not run) counts 0
    assert sum(p.get(k, 0.0) for k in seconds) == pytest.approx(sum(seconds.values()), rel=0.3)


def test_wall_time_counts_the_jobs_that_run_alone_in_full():
    """The capture and the LLM judge take every core with nothing beside them; the per-SAE
    stages share the workers."""
    p = plan.build_plan(load_profile("default"))
    s = {st.stage: st.seconds for st in p.stages}
    alone = s["capture"] + s["judge"]
    assert p.wall_seconds == pytest.approx(alone + (p.seconds - alone) / 2)
    assert p.seconds / 2 < p.wall_seconds < p.seconds


def test_the_offline_judges_model_pass_is_counted_and_an_llm_judges_is_not():
    """The rule judge's fluency signal runs every answer through the model once more: its FLOPs
    are the forward of ``max_new_tokens + 1`` tokens with logits at every position, its time
    falls with bfloat16 blocks; an LLM judge's cost is its calls instead."""
    shape = plan.model_shape("smollm2-135m-instruct")
    hw = plan.HARDWARE["cpu-2core"]
    steer = load_profile("default").section("steering")
    rule = plan._rule_scoring(shape, hw, 240, steer, "offline")
    new = steer.max_new_tokens
    assert rule["tokens"] == 240 * (new + 1)
    assert rule["flops"] == pytest.approx(2 * shape.per_layer * shape.n_layers * 240 * (new + 1)
                                          + 2 * shape.embedding * 240 * new)
    assert rule["seconds"] > 240 * hw.rule_item_s
    f32 = plan._rule_scoring(shape, hw, 240, dataclasses.replace(steer, dtype="float32"), "offline")
    assert steer.dtype == "bfloat16" and f32["seconds"] > rule["seconds"]
    for backend in ("llama", "openai", "local"):
        assert plan._rule_scoring(shape, hw, 240, steer, backend)["seconds"] == 0.0


def test_a_level_without_a_calibration_start_is_counted_as_a_search():
    """Probes are counted per level: a null start (no earlier knob) costs a search's probes, the
    levels with a start one training each."""
    def train_flops(starts):
        data = yaml.safe_load((PARAMS_DIR / "default.yaml").read_text())
        data["grid"]["calibration_start"]["standard"] = starts
        p = profile_from_dict(data, name="starts")
        return next(s for s in plan.build_plan(p).stages if s.stage == "train").flops

    knobs = yaml.safe_load((PARAMS_DIR / "default.yaml").read_text())["grid"]["calibration_start"]
    full = train_flops(knobs["standard"])
    one_null = train_flops(knobs["standard"][:5] + [None])
    all_null = train_flops([None] * 6)
    assert full < one_null < all_null
    per_level = plan.train_flops_per_token(576, 2048, "standard", 102,
                                           plan.HARDWARE["cpu-2core"].cpu_decode)
    tokens = load_profile("default").corpus.train_tokens
    assert one_null - full == pytest.approx((plan.PROBES_PER_SEARCH - 1) * tokens * per_level)


def test_the_captures_model_dtype_sets_its_forward_rate():
    """On a GPU a bfloat16 capture runs the model at the bfloat16 rate and a float32 one at the
    FP32 peak's share of it (torch's default: no TF32); nothing else in the plan moves. On the CPU,
    whose rates are float32's, bfloat16 is 7x slower."""
    data = yaml.safe_load((PARAMS_DIR / "gemma-2-2b.yaml").read_text())
    assert data["capture"]["dtype"] == "bfloat16"
    bf16 = profile_from_dict(data, name="gemma-2-2b")
    data["capture"]["dtype"] = "float32"
    f32 = profile_from_dict(data, name="gemma-2-2b")
    h100 = plan.hardware("H100")
    assert h100.at(h100.forward, "float32") == pytest.approx(h100.forward * 67 / 989)
    a = {s.stage: s for s in plan.build_plan(bf16, h100).stages}
    b = {s.stage: s for s in plan.build_plan(f32, h100).stages}
    shape = plan.model_shape("google/gemma-2-2b")
    fwd = plan._forward_flops(shape, a["capture"].model_tokens, bf16.models[0].layer + 1)
    expected = fwd * (1 / h100.at(h100.forward, "float32") - 1 / h100.forward) / h100.all_cores_gain
    assert b["capture"].seconds - a["capture"].seconds == pytest.approx(expected)
    assert expected / 3600 > 8  # the forward over 5e8 tokens: hours more in float32
    for stage in set(a) - {"capture"}:
        assert a[stage].seconds == b[stage].seconds, stage
    cpu = plan.hardware("cpu-2core")
    assert cpu.at(cpu.forward, "bfloat16") == pytest.approx(cpu.forward / 7)
    assert cpu.at(cpu.forward, "float32") == cpu.forward


def test_a_plan_at_the_rates_a_run_measured(tmp_path, monkeypatch, capsys):
    """Each stage's seconds times that stage's measured / planned in a run of another profile on
    this machine; stages the run did not measure keep the plan's seconds. The CLI reads the run's
    grid.json and says when there is none."""
    run_plan = plan.build_plan(load_profile("default"))
    planned = {s.stage: s.seconds for s in run_plan.stages}
    measured = {"capture": 2 * planned["capture"], "train": 0.5 * planned["train"]}
    factors = plan.stage_factors(run_plan, measured)
    assert factors == pytest.approx({"capture": 2.0, "train": 0.5})
    other = plan.build_plan(load_profile("cpu-pair"))
    scaled = plan.at_rates_of(other, factors, "the test run")
    for a, b in zip(other.stages, scaled.stages):
        assert b.seconds == pytest.approx(a.seconds * factors.get(a.stage, 1.0)), a.stage
        assert (a.flops, a.judge_calls) == (b.flops, b.judge_calls)
    assert "the test run" in scaled.hardware.name and "capture 2.00" in scaled.hardware.source
    row = plan.summary_rows(["cpu-pair"], factors=factors, label="the test run").iloc[0]
    assert row["hours (wall)"] == pytest.approx(scaled.wall_seconds / 3600)

    # the CLI, from a run folder's grid.json (job seconds and their stages)
    monkeypatch.setenv("SAELIB_RUNS", str(tmp_path))
    with pytest.raises(SystemExit, match="no measured job seconds"):
        plan.main(["--profile", "cpu-pair", "--rates-of", "default"])
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "grid.json").write_text(json.dumps({
        "job_seconds": {"capture-x": measured["capture"], "train-x": measured["train"]},
        "job_stages": {"capture-x": "capture", "train-x": "train"}}))
    plan.main(["--profile", "cpu-pair", "--rates-of", "default"])
    out = capsys.readouterr().out
    assert "at the 'default' run's rates" in out
    assert f"Total: {scaled.seconds / 3600:,.2f} job-hours" in out
