"""A paper profile's streaming training at paper width, on a model of the profile's shape with
random weights: the rate behind the plan's GPU hours (issue 21, item 6).

The GPU machines reach no hub, so the model is TransformerLens's built-in config of the profile's
model (``google/gemma-2-2b``: 26 blocks, d_model 2,304, vocabulary 256,000) with random weights,
cut after the profile's layer (the capture never runs the blocks above it), and the tokens are
random ids after a BOS. The compute is the real run's: the same forward batches through
:class:`saelib.activations.ModelStream`, and every SAE of the profile (5 architectures × 6 levels
at width 16,384) built as the streaming stage builds it (:func:`saelib.stages.streaming.new_cell`:
its knob, and the L0 controller's target) and trained on one stream by
:func:`saelib.sae.train.train_saes` with the profile's training settings (batch 2,048, bfloat16
autocast). What random weights change is only what the SAEs learn, not what a step costs.

It measures, after a warm-up:

* the forward alone (tokens/s through the model to the layer);
* the stream: forward plus every SAE's steps (model tokens/s; the seconds split into the forward
  and each architecture's steps);
* peak GPU memory (allocated) and the host's peak RSS;

and sets them beside :mod:`saelib.plan`'s assumptions for the named hardware class: the FLOPs the
plan counts per token, the utilisation they imply, and the hours of capture and training the
profile's 5·10⁸ tokens take at the measured rate (the issue's goal: ≤ 4 h on one H100-class card).
``--torch-profile N`` adds torch's profiler table over N stream steps (where the time goes).

    python bench/gpu_scale.py [--profile gemma-2-2b] [--seconds 150] [--out gpu_scale.json]
    python bench/gpu_scale.py --tiny      # any machine: a small model and width, for the tests

Last line: ``RESULT gpu_scale tokens_per_s=<x> hours=<h> plan_hours=<p>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saelib import plan  # noqa: E402
from saelib.activations import ModelStream  # noqa: E402
from saelib.profiles import load_profile  # noqa: E402
from saelib.results import peak_rss_mb, provenance  # noqa: E402
from saelib.sae.controller import MIN_STEPS  # noqa: E402
from saelib.sae.train import SAERun, train_saes  # noqa: E402
from saelib.stages import streaming, train  # noqa: E402
from saelib.stages.layout import sae_jobs  # noqa: E402

#: ``--tiny``: the model's config shrunk (same architecture family), width and batch scaled down,
#: the profile's L0 targets scaled by the width ratio; float32 on the CPU.
TINY = {"n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "n_key_value_heads": 2,
        "d_mlp": 128, "d_vocab": 512, "rotary_dim": 16}
TINY_WIDTH, TINY_BATCH, TINY_CONTEXT, TINY_LAYER = 1024, 64, 32, 1


def random_model(hub_id: str, layer: int, device: str, dtype: torch.dtype, tiny: bool):
    """TransformerLens's built-in config of ``hub_id`` (no download), blocks ``0..layer`` only,
    random weights (TransformerLens's GPT-2 initialisation) made on ``device``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    cfg = get_pretrained_model_config(hub_id, dtype=dtype).to_dict()
    full_layers = cfg["n_layers"]
    if tiny:
        cfg.update(TINY)
        layer = TINY_LAYER
    cfg.pop("n_params", None)
    for key in ("attn_types",):  # per-block lists follow the cut
        if cfg.get(key):
            cfg[key] = cfg[key][: layer + 1]
    cfg.update(n_layers=layer + 1, d_vocab_out=cfg["d_vocab"], device=device, init_weights=True,
               tokenizer_name=None, seed=0)
    with torch.device(device):
        tl = HookedTransformer(HookedTransformerConfig.from_dict(cfg))
    tl.eval()
    return tl, layer, full_layers


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TimedStream(ModelStream):
    """A :class:`ModelStream` that adds up the seconds its forward passes take."""

    forward_s = 0.0

    def shard(self, i: int) -> np.ndarray:
        t0 = time.perf_counter()
        out = super().shard(i)
        self.forward_s += time.perf_counter() - t0
        return out


def build_runs(profile, entry, d_model: int, width: int, total: int, cfg, tiny: bool,
               controlled: bool = True):
    """Every SAE of the profile's model as the streaming stage builds it (knob, controller;
    ``controlled=False`` leaves the controller out, for a warm-up shorter than it needs)."""
    runs = []
    for job in (j for j in sae_jobs(profile) if j.model == entry.name):
        cell = streaming.new_cell(profile, job)
        knob, control = cell.next_knob, cell.control
        if tiny and cell.knob_name in ("k", "l0_target"):
            knob = max(1, round(knob * width / profile.grid.width))
        if not controlled:
            control = None
        if tiny and control is not None:
            control = max(1.0, control * width / profile.grid.width)
        runs.append(SAERun(job.arch, d_model, width, knob, total, cfg, seed=profile.seed,
                           target_l0=control))
    return runs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="gemma-2-2b")
    ap.add_argument("--hardware", default=None,
                    help="plan's hardware class to compare with (default: from the GPU's name)")
    ap.add_argument("--seconds", type=float, default=150.0,
                    help="wall seconds the timed stream should take (its tokens are set from the "
                         "warm-up's rate)")
    ap.add_argument("--warmup-steps", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=None, help="timed stream's tokens (overrides "
                    "--seconds)")
    ap.add_argument("--torch-profile", type=int, default=0, metavar="N")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if not args.tiny and args.device is None and not torch.cuda.is_available():
        print("# no CUDA device: the tiny size instead (--tiny); the paper's shape needs a GPU")
        args.tiny = True
    profile = load_profile(args.profile)
    entry = profile.models[0]
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    cfg = dataclasses.replace(train.settings(profile), device=device, progress=False)
    width, context = profile.grid.width, profile.corpus.context
    if args.tiny:
        cfg = dataclasses.replace(cfg, batch_size=TINY_BATCH, dtype="float32")
        width, context = TINY_WIDTH, TINY_CONTEXT
    model_dtype = torch.float32 if args.tiny else getattr(torch, profile.capture.dtype)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    hw_name = args.hardware or _hardware_class(gpu)
    hwd = plan.hardware(hw_name)

    t0 = time.perf_counter()
    tl, layer, full_layers = random_model(entry.name, entry.layer, device, model_dtype, args.tiny)
    _sync(device)
    build_s = time.perf_counter() - t0
    d_model, vocab = tl.cfg.d_model, tl.cfg.d_vocab
    bos = 2 if vocab > 2 else 0
    rng = np.random.default_rng(profile.seed)
    shard_tokens = min(profile.capture.shard_tokens, 1 << 18)
    fwd_batch = profile.capture.batch_size
    print(f"# {entry.name} config, random weights, blocks 0..{layer} of {full_layers}, "
          f"{str(model_dtype).removeprefix('torch.')}, on {gpu or device} ({build_s:.1f} s to build)"
          f"; width {width:,}, batch {cfg.batch_size:,}, context {context:,}", flush=True)

    def tokens(n_tokens: int) -> np.ndarray:
        n_ctx = max(1, math.ceil(n_tokens / (context - 1)))
        toks = rng.integers(0, vocab, size=(n_ctx, context), dtype=np.int64)
        toks[:, 0] = bos
        return toks

    def stream(n_tokens: int) -> TimedStream:
        return TimedStream(tl, tokens(n_tokens), layer, batch_size=fwd_batch,
                           shard_tokens=shard_tokens)

    # the forward alone: shards of a few forward batches, the first one a warm-up
    fwd_tokens = min(shard_tokens, max(4 * fwd_batch * context, 0 if args.tiny else 1 << 16))
    src = TimedStream(tl, tokens(3 * fwd_tokens), layer, batch_size=fwd_batch,
                      shard_tokens=fwd_tokens)
    src.shard(0)
    _sync(device)
    src.forward_s = 0.0
    t0 = time.perf_counter()
    n_fwd = 0
    for i in range(1, src.n_shards):
        n_fwd += src.shard(i).shape[0] * context
    _sync(device)
    forward_tps = n_fwd / max(time.perf_counter() - t0, 1e-9)
    print(f"forward alone: {forward_tps:,.0f} tokens/s ({n_fwd:,} tokens)", flush=True)

    def run_stream(n_tokens: int, profile_steps: int = 0):
        total = n_tokens // cfg.batch_size * cfg.batch_size
        src = stream(total)
        runs = build_runs(profile, entry, d_model, width, total, cfg, args.tiny,
                          controlled=total // cfg.batch_size >= MIN_STEPS)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        if profile_steps:
            from torch.profiler import ProfilerActivity, profile as tprofile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                             if device.startswith("cuda") else [])
            with tprofile(activities=acts) as prof:
                results = train_saes(runs, lambda start: src.iter_batches(
                    cfg.batch_size, seed=profile.seed, max_tokens=total, start_batch=start))
                _sync(device)
            key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)
        else:
            results = train_saes(runs, lambda start: src.iter_batches(
                cfg.batch_size, seed=profile.seed, max_tokens=total, start_batch=start))
        _sync(device)
        return total, time.perf_counter() - t0, src.forward_s, results, runs

    # two warm-ups: the first compiles (cuBLAS, Triton), the second's rate sizes the timed stream
    warm = args.warmup_steps * cfg.batch_size
    for _ in range(2):
        total_w, wall_w, fwd_w, _, _ = run_stream(warm)
        print(f"warm-up: {total_w:,} tokens in {wall_w:.1f} s (forward {fwd_w:.1f} s)", flush=True)
    warm_rate = total_w / max(wall_w - fwd_w, 1e-9)
    if args.torch_profile:
        run_stream(args.torch_profile * cfg.batch_size, profile_steps=args.torch_profile)
    per_token_s = 1 / forward_tps + 1 / warm_rate
    n_tokens = args.tokens or int(args.seconds / per_token_s)
    # the L0 controller's shortest run, unless at this rate it would take over twice the time
    # asked for: then the ReLU and Gated SAEs run without it (one host sync less per step each)
    floor = MIN_STEPS * cfg.batch_size
    if n_tokens < floor and (args.tokens or floor * per_token_s <= 2 * args.seconds):
        n_tokens = floor
    if n_tokens < floor:
        print(f"# {n_tokens // cfg.batch_size} steps, under the L0 controller's {MIN_STEPS}: "
              "ReLU and Gated run without it", flush=True)
    n_tokens = max(n_tokens, 2 * cfg.batch_size)
    total, wall, fwd_s, results, runs = run_stream(n_tokens)
    peak_gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    stream_tps = total / wall
    by_arch: dict[str, float] = {}
    for run, res in zip(runs, results):
        by_arch[run.spec.name] = by_arch.get(run.spec.name, 0.0) + res.seconds
    l0 = {f"{run.spec.name}@{run.sparsity_value:g}": round(float(res.l0), 1)
          for run, res in zip(runs, results)}

    # the plan's view of the same work
    p = plan.build_plan(profile, hwd, mode="streaming")
    cap = next(s for s in p.stages if s.stage == "capture")
    shape = plan.model_shape(entry.name)
    fwd_flops_tok = plan._forward_flops(shape, 1, entry.layer + 1)
    sae_flops_tok = sum(plan.train_flops_per_token(shape.d_model, profile.grid.width, j.arch,
                                                   profile.grid.targets[j.level],
                                                   hwd.cpu_decode)
                        for j in sae_jobs(profile) if j.model == entry.name)
    train_tokens = profile.corpus.train_tokens
    measured_h = train_tokens / stream_tps / 3600
    fwd_rate = hwd.at(hwd.forward, profile.capture.dtype)
    plan_h = train_tokens * (fwd_flops_tok / fwd_rate + sae_flops_tok / hwd.train) / 3600
    out = {
        "profile": profile.name, "model": entry.name, "layer": layer, "blocks_of": full_layers,
        "device": gpu or device, "tiny": args.tiny, "width": width, "batch": cfg.batch_size,
        "dtype": cfg.dtype, "n_saes": len(runs), "build_s": build_s,
        "forward_tokens_per_s": forward_tps,
        "stream": {"tokens": total, "wall_s": wall, "forward_s": fwd_s,
                   "tokens_per_s": stream_tps, "sae_tokens_per_s": stream_tps * len(runs),
                   "step_s_by_arch": by_arch, "final_l0": l0},
        "peak_gpu_bytes": peak_gpu, "peak_host_rss_mb": peak_rss_mb(),
        "plan": {"hardware": hwd.name, "forward_flops_per_token": fwd_flops_tok,
                 "sae_flops_per_token": sae_flops_tok,
                 "hours_capture_train": plan_h, "capture_stage_hours": cap.seconds / 3600,
                 "capture_peak_memory_bytes": cap.peak_memory},
        "hours_at_measured_rate": measured_h,
        "train_tokens": train_tokens,
    }
    if not args.tiny:
        peak = hwd.train / plan._GPU_UTIL["train"] if hwd.name != "cpu-2core" else None
        flops_s = (fwd_flops_tok + sae_flops_tok) * stream_tps
        out["measured_flops_per_s"] = flops_s
        out["utilisation_of_peak"] = flops_s / peak if peak else None
    out["provenance"] = provenance(config={"profile": profile.name, "argv": argv or sys.argv[1:]},
                                   seed=profile.seed)

    print(f"stream: {total:,} tokens in {wall:.1f} s = {stream_tps:,.0f} model tokens/s, "
          f"{stream_tps * len(runs):,.0f} SAE-tokens/s over {len(runs)} SAEs; forward {fwd_s:.1f} s")
    print("  step seconds by architecture: "
          + ", ".join(f"{a} {s:.1f}" for a, s in by_arch.items()))
    print(f"peak GPU memory {peak_gpu / 2**30:.1f} GiB (plan's capture stage: "
          f"{cap.peak_memory / 2**30:.1f} GiB with the whole model); host peak RSS "
          f"{out['peak_host_rss_mb']:,.0f} MB")
    if out.get("utilisation_of_peak") is not None:
        print(f"the plan counts {(fwd_flops_tok + sae_flops_tok) / 1e9:.2f} GFLOP per token: "
              f"{out['measured_flops_per_s'] / 1e12:.0f} TFLOP/s measured, "
              f"{out['utilisation_of_peak']:.0%} of {hwd.name}'s peak (the plan assumes "
              f"{plan._GPU_UTIL['forward']:.0%} forward, {plan._GPU_UTIL['train']:.0%} training)")
    print(f"{train_tokens:.3g} tokens at this rate: {measured_h:.2f} h of capture and training; "
          f"the plan on {hwd.name}: {plan_h:.2f} h"
          + (" (tiny size: not the profile's rate)" if args.tiny else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"RESULT gpu_scale tokens_per_s={stream_tps:.0f} hours={measured_h:.2f} "
          f"plan_hours={plan_h:.2f}")
    return out


def _hardware_class(gpu: str | None) -> str:
    """The plan's hardware class for a device name (an H100 unless the name says otherwise)."""
    if gpu is None:
        return "cpu-2core"
    for name in ("H200", "H100", "A800", "A100"):
        if name in gpu:
            return "A800" if name == "A100" else name
    return "H100"


if __name__ == "__main__":
    main()
