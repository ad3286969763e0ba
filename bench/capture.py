"""Activation capture throughput: stop-at-layer (what saelib does) vs a full Hugging Face forward.

Both paths process the same batches of the same corpus contexts, interleaved, several repeats; the
ratio of medians is printed. Last line: ``RESULT capture ratio=<x>``.

With ``--threads N`` it instead times the stop-at-layer path on one torch thread and on N,
alternating: what the grid gains by giving the capture kernel every core
(``saelib.grid.capture_threads``). Last line: ``RESULT capture_threads ratio=<x>``.

    python bench/capture.py [--model smollm2-135m-instruct] [--layer 14] [--contexts 32] [--repeats 5]
    python bench/capture.py --model smollm2-135m-instruct --layer 14 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saelib.activations import residual_at
from saelib.data.corpus import build_token_splits
from saelib.models import cache_dir, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--contexts", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, help="compare 1 torch thread with this many")
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = load_model(args.model, keep_hf=True)
    print(f"model load (cached safetensors): {time.perf_counter() - t0:.1f} s")
    n_tok = args.contexts * args.context
    splits = build_token_splits(cache_dir() / "bench" / f"tokens-{args.model}", lm.tokenizer,
                                context=args.context, train_tokens=n_tok, eval_tokens=args.context,
                                tokenizer_name=args.model)
    toks = torch.as_tensor(splits.train_NL[: args.contexts], dtype=torch.long)
    batches = list(torch.split(toks, args.batch))

    def stop_at_layer() -> None:
        for b in batches:
            residual_at(lm.tl, b, args.layer)

    def full_hf() -> None:
        with torch.no_grad():
            for b in batches:
                lm.hf(b)

    def timed(cases: dict, width: int) -> dict:
        """Run the cases interleaved ``--repeats`` times; print and return their medians."""
        times: dict = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:{width}s} median {v:.3f} s  ({n_tok / v:,.0f} tokens/s)  runs: "
                  + ", ".join(f"{x:.2f}" for x in times[k]))
        return med

    def on_threads(n: int):
        return lambda: (torch.set_num_threads(n), stop_at_layer())

    if args.threads:
        stop_at_layer()  # warm-up
        med = timed({"1 thread(s)": on_threads(1), f"{args.threads} thread(s)": on_threads(args.threads)}, 0)
        print(f"model {args.model}, layer {args.layer} of {lm.n_layers}, {n_tok} tokens per run")
        print(f"RESULT capture_threads ratio={med['1 thread(s)'] / med[f'{args.threads} thread(s)']:.2f}")
        return
    stop_at_layer(), full_hf()  # warm-up
    med = timed({"stop_at_layer": stop_at_layer, "full_hf": full_hf}, 14)
    print(f"model {args.model}, layer {args.layer} of {lm.n_layers}, {n_tok} tokens per run, "
          f"{torch.get_num_threads()} threads")
    print(f"RESULT capture ratio={med['full_hf'] / med['stop_at_layer']:.2f}")

if __name__ == "__main__":
    main()
