"""``bench/gpu_scale.py`` (the GPU rate behind the paper profiles' plan) at its tiny size on the CPU:
it builds every SAE of the Gemma-2-2B profile as the streaming stage does and trains them on one
stream from a random model of Gemma-2's architecture; its plan figures are the plan's own."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from saelib import plan
from saelib.profiles import load_profile
from saelib.sae.controller import MIN_STEPS

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_scale.py"


@pytest.fixture(scope="module")
def gpu_scale():
    spec = importlib.util.spec_from_file_location("gpu_scale", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_stream_trains_the_profiles_30_saes(gpu_scale, tmp_path, capsys):
    out_path = tmp_path / "gpu_scale.json"
    tokens = MIN_STEPS * gpu_scale.TINY_BATCH
    out = gpu_scale.main(["--tiny", "--tokens", str(tokens), "--warmup-steps", "2",
                          "--out", str(out_path)])
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith("RESULT gpu_scale tokens_per_s=")
    assert json.loads(out_path.read_text())["provenance"]["config"]["profile"] == "gemma-2-2b"

    profile = load_profile("gemma-2-2b")
    assert out["n_saes"] == len(profile.grid.architectures) * len(profile.grid.targets) == 30
    stream = out["stream"]
    assert stream["tokens"] == tokens and out["forward_tokens_per_s"] > 0
    assert set(stream["step_s_by_arch"]) == {"relu", "gated", "jumprelu", "topk", "batchtopk"}
    assert 0 < sum(stream["step_s_by_arch"].values()) + stream["forward_s"] <= stream["wall_s"]
    # TopK's L0 is its k on every token, BatchTopK's on average over a batch: the knobs are the
    # profile's targets scaled to the tiny width (50 … 820 of 16,384 → 3 … 51 of 1,024)
    ks = sorted({max(1, round(t * gpu_scale.TINY_WIDTH / profile.grid.width))
                 for t in profile.grid.targets})
    for arch in ("topk", "batchtopk"):
        got = {float(key.split("@")[1]): l0 for key, l0 in stream["final_l0"].items()
               if key.startswith(arch + "@")}
        assert sorted(got) == ks
        for k, l0 in got.items():
            assert l0 == pytest.approx(k, rel=0.02), (arch, k, l0)

    # the plan's per-token FLOPs, counted here from the plan's own functions and the profile
    d, width = plan.model_shape("google/gemma-2-2b").d_model, profile.grid.width
    hwd = plan.hardware(out["plan"]["hardware"])
    sae = sum(plan.train_flops_per_token(d, width, a, k, hwd.cpu_decode)
              for a in profile.grid.architectures for k in profile.grid.targets)
    assert out["plan"]["sae_flops_per_token"] == pytest.approx(sae)
    fwd = out["plan"]["forward_flops_per_token"]
    assert profile.capture.dtype == "bfloat16"  # the forward at the bfloat16 rate
    assert out["plan"]["hours_capture_train"] == pytest.approx(profile.corpus.train_tokens * (
        fwd / hwd.at(hwd.forward, "bfloat16") + sae / hwd.train) / 3600)
    assert math.isclose(out["hours_at_measured_rate"],
                        profile.corpus.train_tokens / stream["tokens_per_s"] / 3600)


@pytest.mark.parametrize("name,expected", [("NVIDIA H100 80GB HBM3", "H100"),
                                           ("NVIDIA H200", "H200"),
                                           ("NVIDIA A100-SXM4-80GB", "A800"),
                                           ("NVIDIA L40S", "H100"), (None, "cpu-2core")])
def test_the_plans_hardware_class_follows_the_device_name(gpu_scale, name, expected):
    assert gpu_scale._hardware_class(name) == expected
