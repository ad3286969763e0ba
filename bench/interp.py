"""Benchmark: wall time of AutoInterp (protocol §3) for one SAE with the offline judge.

Why: the grid runs AutoInterp once per SAE (30 SAEs per model in the default profile), so its
time per SAE decides whether the interpretability stage fits the budget. Setup: a random ReLU SAE
(d_in 640, width 2048, encoder bias chosen for L0 ≈ 50) on synthetic eval activations — 100k
tokens in contexts of 128, each activation the embedding of a Zipf-distributed token plus noise,
so that latents fire on token identities as real ones do. Judge: ``saelib.judges.offline``'s
``OfflineJudge`` with the synthetic corpus's token frequencies. Everything the real stage runs is
timed: both streaming passes (top-k scan over all latents, windows of the scored latents) and
the judge's explanation and detection calls for 1,000 latents.

Prints the timing breakdown; the last line is ``RESULT interp seconds_per_sae=<x>``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch

from saelib.evals.autointerp import AutoInterpConfig, run_autointerp
from saelib.evals.windows import EncodedCodes
from saelib.judges.offline import OfflineJudge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=100_000, help="eval corpus size in tokens")
    p.add_argument("--context", type=int, default=128, help="context length L")
    p.add_argument("--d-in", type=int, default=640)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--n-latents", type=int, default=1000, help="latents scored")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--chunk-contexts", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    N, L, D, F = max(1, args.tokens // args.context), args.context, args.d_in, args.width

    # Synthetic corpus: BOS (id 0) at position 0, then Zipf-distributed tokens.
    ranks = np.arange(1, args.vocab)
    zipf = 1.0 / ranks
    tokens_NL = rng.choice(ranks, size=(N, L), p=zipf / zipf.sum())
    tokens_NL[:, 0] = 0
    vocab = ["<bos>"] + [f" w{i}" for i in range(1, args.vocab)]
    counts = Counter(tokens_NL[:, 1:].ravel().tolist())
    token_freq = {vocab[t]: c / sum(counts.values()) for t, c in counts.items()}

    emb_VD = torch.randn(args.vocab, D, generator=gen)
    tokens_t = torch.as_tensor(tokens_NL)

    def acts_chunks():
        for c0 in range(0, N, args.chunk_contexts):
            tok = tokens_t[c0:c0 + args.chunk_contexts]
            g = torch.Generator().manual_seed(args.seed * 100_003 + c0)
            yield emb_VD[tok] + 0.5 * torch.randn(*tok.shape, D, generator=g)

    # Random ReLU SAE: unit-norm encoder columns, pre-activations ~ N(0, 1.25); bias for L0 ≈ 50.
    W_enc_DF = torch.randn(D, F, generator=gen)
    W_enc_DF /= W_enc_DF.norm(dim=0, keepdim=True)
    W_enc_DF = W_enc_DF.to(args.device)
    b_enc_F = torch.full((F,), -2.25, device=args.device)

    def encode(acts_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu(acts_BD.float() @ W_enc_DF + b_enc_F)

    source = EncodedCodes(encode, acts_chunks, context_len=L, width=F, device=args.device)
    config = AutoInterpConfig(n_latents=args.n_latents, n_concepts=min(100, args.n_latents),
                              seed=args.seed)
    judge = OfflineJudge(token_freq=token_freq)

    t0 = time.perf_counter()
    res = run_autointerp(source, tokens_NL, vocab.__getitem__, judge, config,
                         special_ids=[0], bos_at_start=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0

    with torch.inference_mode():
        l0 = float(sum((encode(a.reshape(-1, D).to(args.device)) > 0).sum().item()
                       for a in acts_chunks()) / (N * L))
    print(f"device={args.device} tokens={N * L} context={L} d_in={D} width={F} L0={l0:.1f}")
    print(f"judge={res.judge_name} n_live={res.n_live} n_scored={len(res.scored)} "
          f"n_concept100={len(res.concept100)} partial={res.partial} mu={res.mu}")
    print("timings_s " + " ".join(f"{k}={v:.2f}" for k, v in sorted(res.timings.items())))
    print(f"example explanation (latent {res.records[0].latent}): {res.records[0].explanation!r}")
    print(f"RESULT interp seconds_per_sae={seconds:.2f}")


if __name__ == "__main__":
    main()
