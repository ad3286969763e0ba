"""Benchmark: SAE training throughput of saelib's path vs sae-lens's default trainer loop.

For each of the paper's five architectures, on the same synthetic activations (d_in 640,
d_sae 2048 by default: Gemma-3-270M's width and the CPU profile's SAE width), this times

* saelib: :func:`saelib.sae.train.train_sae` (re-batching, centring/scaling, sae-lens's
  ``SAETrainer.step``, tail metrics, final fold), seconds as it reports them (training loop only);
* sae-lens: ``SAETrainer(...).fit()`` fed by an iterator of the same batches, wall time.

saelib trains with its subclasses of sae-lens's training SAEs (every architecture's encoder
without the input gradient, :mod:`saelib.sae.encoder`; TopK and BatchTopK also with
:mod:`saelib.sae.sparse`'s embedding-bag decode, and ReLU and Gated once their codes are under
12.5 % non-zero, which these few steps from initialisation do not reach: bench/sae_kernels.py
times that decode on ReLU-like codes); the same ``train_sae`` with
``TrainConfig(sparse_decode=False)`` (sae-lens's own classes) is timed beside it, so the table
shows what the subclasses alone buy ("classes"). Both report tokens/s. The roofline fraction compares saelib's achieved FLOP/s with this machine's
measured float32 matmul FLOP/s (best of a few ``[B, d_in] @ [d_in, d_sae]`` products, counted as
2·M·K·N FLOPs). Training FLOPs per token are taken as 12·d_in·d_sae for every architecture: the
encoder and decoder matmuls are 2·d_in·d_sae FLOPs each forward and twice that backward
(6 multiply-adds per weight, the "6N" rule with N = 2·d_in·d_sae parameters); Gated's extra gate
pass, TopK's top-k and the auxiliary losses are not counted, so their fraction is an underestimate;
with the sparse decode TopK/BatchTopK do fewer FLOPs than counted, so theirs is the *effective*
fraction (dense-equivalent work per second) and can exceed what the matmuls alone reach.

Where the time goes (``--profile-steps``, printed before the result): one ``train_sae`` run per
architecture under ``torch.profiler``, each operator's self CPU time put in one bucket (matmuls,
the sparse decode, the Adam update, activation/top-k, other element-wise and reduction kernels),
plus the Python time between kernels (wall time minus all kernels: sae-lens's trainer loop,
logging and hooks). The matmul bucket's FLOP/s against the measured peak says whether the
matmuls themselves are slow or the time is spent elsewhere, i.e. what a fused kernel would buy.

Last line: ``RESULT train ratio=<geometric mean of saelib/sae-lens tokens/s> roofline=<mean
fraction>`` (saelib with its default, sparse, decode). Each number is the median of ``--repeats``
interleaved runs, the order rotated each repeat (the machine may be shared). Runs in about 4
minutes on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import statistics
import time
import warnings
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # sae-lens's fit() draws its own progress bar

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

from saelib.sae.registry import ARCHITECTURES, get_arch
from saelib.sae.train import TrainConfig, train_sae

KNOB = {"relu": 5.0, "gated": 5.0, "jumprelu": 64, "topk": 64, "batchtopk": 64}


def synthetic_pool(n_batches: int, batch: int, d_in: int, seed: int = 0) -> list[torch.Tensor]:
    """Sparse sums of random unit directions plus a massive constant offset on 3 dimensions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(4 * d_in, d_in, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    offset = torch.zeros(d_in)
    offset[:3] = torch.tensor([1500.0, -1100.0, 2000.0])
    pool = []
    for _ in range(n_batches):
        codes = (torch.rand(batch, 4 * d_in, generator=g) < 0.02).float()
        codes *= torch.rand(batch, 4 * d_in, generator=g) * 4
        pool.append(codes @ dirs + offset)
    return pool


def matmul_flops(batch: int, d_in: int, d_sae: int, device: str, repeats: int = 5) -> float:
    a = torch.randn(batch, d_in, device=device)
    b = torch.randn(d_in, d_sae, device=device)
    best = math.inf
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * batch * d_in * d_sae / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_saelib(arch: str, pool: list[torch.Tensor], steps: int, cfg: TrainConfig,
               d_sae: int) -> float:
    d_in = pool[0].shape[1]
    res = train_sae(arch, d_in, d_sae, KNOB[arch], itertools.cycle(pool), steps * cfg.batch_size,
                    cfg)
    return res.tokens_seen / res.seconds


def run_saelib_dense(arch: str, pool: list[torch.Tensor], steps: int, cfg: TrainConfig,
                     d_sae: int) -> float:
    """saelib's path with sae-lens's own training classes (``sparse_decode=False``)."""
    return run_saelib(arch, pool, steps, dataclasses.replace(cfg, sparse_decode=False), d_sae)


def run_sae_lens(arch: str, pool: list[torch.Tensor], steps: int, cfg: TrainConfig,
                 d_sae: int) -> float:
    spec = get_arch(arch)
    d_in = pool[0].shape[1]
    sched = cfg.schedule(steps)
    torch.manual_seed(0)
    sae = spec.training_class(sparse_decode=False)(spec.make_config(d_in, d_sae, KNOB[arch],
                                                 sched.sparsity_warm_up_steps, cfg))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr, lr_end=cfg.lr, lr_warm_up_steps=sched.lr_warm_up_steps,
        lr_decay_steps=sched.lr_decay_steps,
        device=cfg.device, dead_feature_window=sched.dead_feature_window)
    provider = (b.to(cfg.device) for b in itertools.cycle(pool))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
    _sync(cfg.device)
    t0 = time.perf_counter()
    trainer.fit()
    _sync(cfg.device)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


#: Profiler buckets: the first whose name fragment an operator contains wins (checked in order).
BUCKETS = [("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
           ("sparse decode", ("embedding_bag", "index_select", "aten::gather", "aten::scatter",
                              "aten::nonzero", "index_add")),
           ("adam update", ("_foreach", "addcdiv", "addcmul", "lerp", "aten::sqrt")),
           ("activation / top-k", ("relu", "threshold", "aten::topk", "heaviside", "sigmoid",
                                   "aten::gt", "aten::ge", "aten::where", "aten::sort")),
           ("element-wise / reductions", ("aten::",))]


def where_time_goes(arch: str, pool: list[torch.Tensor], steps: int, cfg: TrainConfig,
                    d_sae: int, peak: float) -> dict[str, float]:
    """Share of one training run's wall time per bucket, and the matmuls' achieved FLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    d_in = pool[0].shape[1]
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        train_sae(arch, d_in, d_sae, KNOB[arch], itertools.cycle(pool), steps * cfg.batch_size, cfg)
        wall = time.perf_counter() - t0
    times = {name: 0.0 for name, _ in BUCKETS}
    mm_flops = 0.0
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") and ev.self_cpu_time_total > 0:
            for name, frags in BUCKETS:
                if any(f in ev.key for f in frags):
                    times[name] += ev.self_cpu_time_total / 1e6
                    if name == "matmul":
                        mm_flops += ev.flops or 0
                    break
    kernels = sum(times.values())
    out = {name: t / wall for name, t in times.items()}
    out["python / trainer loop"] = max(0.0, wall - kernels) / wall
    # the profiler's own FLOP count of each mm/addmm (2·M·K·N), so the sparse decode's skipped
    # work is not counted as done
    out["matmul GFLOP/s"] = mm_flops / max(times["matmul"], 1e-9) / 1e9
    out["matmul / peak"] = out["matmul GFLOP/s"] * 1e9 / peak
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3,
                        help="median of this many interleaved runs per path (shared machines)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="steps of the per-architecture profile of where time goes (0: skip)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cfg = TrainConfig(batch_size=args.batch, device=args.device, progress=False,
                      norm_estimate_batches=2, metrics_tail_batches=1)
    pool = synthetic_pool(4, args.batch, args.d_in)
    peak = matmul_flops(args.batch, args.d_in, args.d_sae, args.device)
    flops_per_token = 12 * args.d_in * args.d_sae
    print(f"device={args.device} threads={torch.get_num_threads()} d_in={args.d_in} "
          f"d_sae={args.d_sae} batch={args.batch} steps={args.steps}")
    print(f"measured float32 matmul: {peak / 1e9:.1f} GFLOP/s; "
          f"training FLOPs/token counted: {flops_per_token:.3g}")
    print(f"{'arch':10s} {'saelib tok/s':>13s} {'sl-class tok/s':>16s} {'sae-lens tok/s':>15s} "
          f"{'ratio':>6s} {'classes':>13s} {'roofline':>9s}")
    # one untimed warm-up step so allocator and thread-pool start-up hit neither side
    run_saelib("relu", pool, 1, cfg, args.d_sae)
    ratios, fractions = [], []
    for arch in ARCHITECTURES:
        paths: list[Callable[..., float]] = [run_saelib, run_sae_lens]
        if get_arch(arch).sae_lens_training_sae_cls is not None:
            paths.append(run_saelib_dense)
        tps: dict[Callable[..., float], list[float]] = {fn: [] for fn in paths}
        for rep in range(args.repeats):
            for i in range(len(paths)):
                fn = paths[(rep + i) % len(paths)]
                tps[fn].append(fn(arch, pool, args.steps, cfg, args.d_sae))
        ours, theirs = statistics.median(tps[run_saelib]), statistics.median(tps[run_sae_lens])
        frac = ours * flops_per_token / peak
        ratios.append(ours / theirs)
        fractions.append(frac)
        if run_saelib_dense in tps:
            dense = statistics.median(tps[run_saelib_dense])
            dense_s, speedup_s = f"{dense:16.0f}", f"{ours / dense:13.2f}"
        else:
            dense_s, speedup_s = f"{'-':>16s}", f"{'-':>13s}"
        print(f"{arch:10s} {ours:13.0f} {dense_s} {theirs:15.0f} {ours / theirs:6.2f} "
              f"{speedup_s} {frac:9.3f}")
    if args.profile_steps and args.device == "cpu":
        cols = [name for name, _ in BUCKETS] + ["python / trainer loop"]
        print("\nwhere saelib's training time goes (share of wall time; torch.profiler self CPU time):")
        print(f"{'arch':10s} " + " ".join(f"{c[:14]:>14s}" for c in cols) + f" {'mm GFLOP/s':>11s} {'mm/peak':>8s}")
        for arch in ARCHITECTURES:
            share = where_time_goes(arch, pool, args.profile_steps, cfg, args.d_sae, peak)
            print(f"{arch:10s} " + " ".join(f"{share[c]:14.1%}" for c in cols)
                  + f" {share['matmul GFLOP/s']:11.1f} {share['matmul / peak']:8.2f}")
    ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"RESULT train ratio={ratio:.3f} roofline={sum(fractions) / len(fractions):.3f}")


if __name__ == "__main__":
    main()
