"""Benchmark of saelib.kernels against the naive dense paths they replace.

CPU (always): the torch path of each kernel beside the dense path
  * sparse decode of TopK codes: ``embedding_bag`` vs ``codes_BF @ W_dec_FD`` on the same codes
    (forward, and forward + backward as in training), at the CPU profile's width 2,048,
    d_model 640 and the paper's L0 grid {50, 160, 820} / 16,384 scaled to that width;
  * decode of ReLU-like codes (ReLU, Gated: tokens hold different counts, the busiest several
    times the mean) through their non-zeros, as the training SAEs do (``decode_nonzeros``:
    unpadded on the CPU, padded to the busiest token for the Triton kernels on CUDA), vs the dense
    matmul, forward + backward, at the same L0 grid;
  * per-latent top-k over a corpus: ``LatentTopK`` fed in chunks vs materialising tokens × width
    and one ``torch.topk``, with the memory each holds.
CUDA (when a GPU is present): Triton vs the torch path vs dense, at the paper's width 16,384 and
d_model 2,304 (Gemma-2-2B), beside the floor set by memory bandwidth = bytes that must move /
measured device-to-device copy bandwidth.

Timings are medians over ``--repeats`` runs, the compared paths interleaved run by run so that
load from other processes hits both alike. The last line is ``RESULT kernels ratio=<x>``: the
geometric mean, over the L0 grid, of dense / sparse time for the training decode (forward +
backward), the sparse path being Triton on CUDA and torch on CPU.

Run: ``OMP_NUM_THREADS=1 python bench/sae_kernels.py`` (add ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from saelib.kernels import LatentTopK, sparse_decode, topk_encode, triton_available
from saelib.sae.sparse import decode_nonzeros


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, the functions interleaved within each repeat."""
    for fn in fns.values():  # warm-up: allocator, Triton compilation, caches
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s (a clone reads and writes n_bytes each)."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    t = time_side_by_side({"copy": lambda: src.clone()}, repeats=10, device=device)["copy"]
    return 2 * n_bytes / t


def _decode_case(B: int, F: int, D: int, k: int, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    pre_BF = torch.randn(B, F, generator=g).to(device)
    codes = topk_encode(pre_BF, k)
    codes_BF = codes.to_dense(F)
    W_dec_FD = (torch.randn(F, D, generator=g) / math.sqrt(D)).to(device)
    b_dec_D = torch.zeros(D, device=device)
    return codes.idx_BK.contiguous(), codes.vals_BK.contiguous(), codes_BF, W_dec_FD, b_dec_D


def _train_step(decode: Callable[..., torch.Tensor], args: tuple, grad_BD: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of a decode, gradients for the codes' values and the decoder."""
    leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]

    def step() -> None:
        for leaf in leaves:
            if leaf.is_floating_point():
                leaf.grad = None
        decode(*leaves).backward(grad_BD)

    return step


def bench_decode(device: torch.device, B: int, F: int, D: int, ks: list[int], repeats: int, bw: float | None):
    """Rows of (k, path, forward s, forward+backward s) and the dense/sparse train ratios."""
    sparse_backend = "triton" if device.type == "cuda" else "torch"
    print(f"\n## sparse decode, {device.type}: B={B} tokens, width F={F}, d_model D={D}")
    header = f"{'k':>5} {'path':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'dense/path fwd':>15} {'dense/path train':>17}"
    if bw is not None:
        header += f" {'fwd floor ms':>13}"
    print(header)
    ratios = []
    for k in ks:
        idx_BK, vals_BK, codes_BF, W_dec_FD, b_dec_D = _decode_case(B, F, D, k, device, seed=k)
        grad_BD = torch.randn(B, D, device=device)
        paths: dict[str, tuple[Callable[..., torch.Tensor], tuple]] = {
            "dense": (lambda c, W, b: c @ W + b, (codes_BF, W_dec_FD, b_dec_D)),
            "torch": (lambda v, W, b: sparse_decode(idx_BK, v, W, b, backend="torch"), (vals_BK, W_dec_FD, b_dec_D)),
        }
        if device.type == "cuda" and triton_available():
            paths["triton"] = (
                lambda v, W, b: sparse_decode(idx_BK, v, W, b, backend="triton"),
                (vals_BK, W_dec_FD, b_dec_D),
            )
        fwd = time_side_by_side(
            {name: (lambda f=f, a=a: f(*a)) for name, (f, a) in paths.items()}, repeats, device
        )
        train = time_side_by_side(
            {name: _train_step(f, a, grad_BD) for name, (f, a) in paths.items()}, repeats, device
        )
        # Forward floor: the k gathered rows (at most F distinct), the ids and values, the output.
        fwd_bytes = 4 * (min(B * k, F) * D + 3 * B * k + B * D)
        for name in paths:
            line = (
                f"{k:>5} {name:>8} {fwd[name] * 1e3:>9.3f} {train[name] * 1e3:>11.3f} "
                f"{fwd['dense'] / fwd[name]:>15.2f} {train['dense'] / train[name]:>17.2f}"
            )
            if bw is not None:
                line += f" {fwd_bytes / bw * 1e3:>13.4f}"
            print(line)
        ratios.append(train["dense"] / train[sparse_backend])
    return ratios


def _relu_code(B: int, F: int, l0: int, device: torch.device, seed: int) -> torch.Tensor:
    """A ReLU code of mean L0 ``l0`` whose tokens differ in how many latents fire: Gaussian
    pre-activations with a per-token shift (σ 0.3), cut at the (1 − l0/F) quantile."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pre_BF = torch.randn(B, F, generator=g) + 0.3 * torch.randn(B, 1, generator=g)
    sample = pre_BF.flatten()[torch.randperm(B * F, generator=g)[: 1 << 20]]
    return torch.relu(pre_BF - torch.quantile(sample, 1 - l0 / F)).to(device)


def bench_relu_decode(device: torch.device, B: int, F: int, D: int, l0s: list[int], repeats: int):
    """Rows of (L0, busiest token, path, forward+backward ms, dense/path) for ReLU-like codes."""
    from types import SimpleNamespace

    print(f"\n## ReLU / Gated decode through the non-zeros, {device.type}: B={B}, F={F}, D={D}")
    print(f"{'L0':>5} {'busiest':>8} {'path':>8} {'fwd+bwd ms':>11} {'dense/path':>11}")
    g = torch.Generator(device="cpu").manual_seed(1)
    W_dec_FD = (torch.randn(F, D, generator=g) / math.sqrt(D)).to(device)
    b_dec_D = torch.zeros(D, device=device)
    grad_BD = torch.randn(B, D, device=device)
    forms = {"ragged": False} if device.type == "cpu" else {"ragged": False, "padded": True}

    def nonzeros(padded: bool) -> Callable[..., torch.Tensor]:
        def decode(c, W, b):
            out = decode_nonzeros(SimpleNamespace(W_dec=W, b_dec=b), c, True, padded=padded)
            return c @ W + b if out is None else out
        return decode

    paths = {"dense": lambda c, W, b: c @ W + b}
    paths.update({name: nonzeros(padded) for name, padded in forms.items()})
    for l0 in l0s:
        codes_BF = _relu_code(B, F, l0, device, seed=l0)
        busiest = int((codes_BF > 0).sum(1).max())
        train = time_side_by_side(
            {name: _train_step(f, (codes_BF, W_dec_FD, b_dec_D), grad_BD) for name, f in paths.items()},
            repeats, device)
        for name in paths:
            print(f"{l0:>5} {busiest:>8} {name:>8} {train[name] * 1e3:>11.3f} "
                  f"{train['dense'] / train[name]:>11.2f}")


def bench_latent_topk(device: torch.device, N: int, F: int, k: int, chunk: int, repeats: int, bw: float | None):
    """Streaming LatentTopK vs materialising all N×F activations and one topk over tokens."""
    print(f"\n## per-latent top-k, {device.type}: N={N} tokens, width F={F}, k={k}, chunk={chunk}")
    g = torch.Generator(device="cpu").manual_seed(0)
    # SAE-like codes: mostly zeros, a few positive activations per token.
    chunks = [torch.relu(torch.randn(chunk, F, generator=g) - 2.0).to(device) for _ in range(N // chunk)]

    def dense() -> None:
        acts_NF = torch.cat(chunks)  # what a non-streaming collector would hold
        torch.topk(acts_NF, k, dim=0)

    def streaming(backend: str) -> Callable[[], None]:
        def run() -> None:
            table = LatentTopK(F, k, device=device, backend=backend)
            for c in chunks:
                table.update(c)
            table.result()

        return run

    fns = {"dense": dense, "torch": streaming("torch")}
    if device.type == "cuda" and triton_available():
        fns["triton"] = streaming("triton")
    t = time_side_by_side(fns, repeats, device)
    held = {"dense": N * F * 4, "torch": chunk * F * 4 + 2 * k * F * 12, "triton": chunk * F * 4 + 2 * k * F * 12}
    for name in fns:
        line = f"{name:>8} {t[name] * 1e3:>9.2f} ms   dense/path {t['dense'] / t[name]:>6.2f}   holds {held[name] / 2**20:>8.1f} MiB"
        if bw is not None:
            line += f"   read floor {N * F * 4 / (bw / 2) * 1e3:.3f} ms"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (smoke run)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, triton available: {triton_available()}")

    # CPU profile: width 2,048, d_model 640 (Gemma-3-270M); L0 grid {50, 160, 820}/16,384 × 2,048.
    B = 256 if args.quick else 1024
    ratios = bench_decode(cpu, B=B, F=2048, D=640, ks=[6, 20, 102], repeats=repeats, bw=None)
    bench_relu_decode(cpu, B=B // 2, F=2048, D=640, l0s=[6, 20, 102], repeats=repeats)
    bench_latent_topk(cpu, N=4096 if args.quick else 32768, F=2048, k=252, chunk=1024 if args.quick else 4096,
                      repeats=repeats, bw=None)

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        bw = copy_bandwidth(gpu)
        print(f"\n# GPU: {torch.cuda.get_device_name(gpu)}, measured copy bandwidth {bw / 1e9:.0f} GB/s")
        # Paper scale: width 16,384, Gemma-2-2B d_model 2,304, SAE batch 2,048, L0 {50, 160, 820}.
        ratios = bench_decode(gpu, B=2048, F=16384, D=2304, ks=[50, 160, 820], repeats=repeats, bw=bw)
        bench_relu_decode(gpu, B=2048, F=16384, D=2304, l0s=[50, 160, 820], repeats=repeats)
        bench_latent_topk(gpu, N=65536, F=16384, k=252, chunk=8192, repeats=repeats, bw=bw)

    print(f"\nRESULT kernels ratio={math.exp(statistics.mean(math.log(r) for r in ratios)):.2f}")


if __name__ == "__main__":
    main()
