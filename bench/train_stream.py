"""Streaming multi-SAE training vs the cached path, same SAEs and same tokens, side by side.

* cached (``training.mode: cached``): capture the training contexts to disk shards
  (:func:`saelib.activations.capture`), then train the SAEs one at a time from the cache
  (:func:`saelib.sae.train.train_sae` on ``ActivationStore.iter_batches``).
* streaming (``training.mode: streaming``): one :class:`saelib.activations.ModelStream` over the
  same contexts feeds every SAE at once (:func:`saelib.sae.train.train_saes`).

Both include the model's forward. The two paths alternate for ``--repeats`` rounds; the ratio of
median wall times is printed, with tokens per second summed over all SAEs, and the SAEs of both
paths are checked to be the same bytes. Last line: ``RESULT train_stream ratio=<x>``.

    python bench/train_stream.py [--model smollm2-135m-instruct] [--layer 14] [--contexts 128]
        [--width 2048] [--archs relu gated jumprelu topk batchtopk] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saelib.activations import ActivationStore, ModelStream, capture
from saelib.data.corpus import build_token_splits
from saelib.models import cache_dir, load_model
from saelib.sae.train import SAERun, TrainConfig, train_sae, train_saes

KNOB = {"relu": 2.0, "gated": 2.0, "jumprelu": 20.0, "topk": 20, "batchtopk": 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--contexts", type=int, default=128)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--archs", nargs="+", default=list(KNOB))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lm = load_model(args.model)
    n_tok = args.contexts * args.context
    splits = build_token_splits(cache_dir() / "bench" / f"tokens-{args.model}-{args.context}",
                                lm.tokenizer, context=args.context, train_tokens=n_tok,
                                eval_tokens=args.context, tokenizer_name=args.model)
    tokens = splits.train_NL[: args.contexts]
    shard_tokens, fwd_batch = 32 * args.context, 8
    cfg = TrainConfig(batch_size=args.batch, lr=3e-3, progress=False)
    d = lm.d_model
    total = args.contexts * (args.context - 1) // args.batch * args.batch
    mean_D = torch.zeros(d)

    def cached() -> list:
        root = Path(tempfile.mkdtemp(prefix="bench-cache-"))
        try:
            capture(lm.tl, tokens, args.layer, root, batch_size=fwd_batch,
                    shard_tokens=shard_tokens, progress=False)
            store = ActivationStore.open(root)
            return [train_sae(a, d, args.width, KNOB[a],
                              store.iter_batches(args.batch, seed=0, max_tokens=total), total, cfg,
                              mean_D=mean_D, seed=i) for i, a in enumerate(args.archs)]
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def streaming() -> list:
        source = ModelStream(lm.tl, tokens, args.layer, batch_size=fwd_batch,
                             shard_tokens=shard_tokens)
        runs = [SAERun(a, d, args.width, KNOB[a], total, cfg, seed=i)
                for i, a in enumerate(args.archs)]
        return train_saes(runs, lambda start: source.iter_batches(
            args.batch, seed=0, max_tokens=total, start_batch=start), mean_D)

    times: dict[str, list[float]] = {"cached": [], "streaming": []}
    out: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, fn in (("cached", cached), ("streaming", streaming)):
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    same = all(torch.equal(a.sae.state_dict()[k], b.sae.state_dict()[k])
               for a, b in zip(out["cached"], out["streaming"]) for k in a.sae.state_dict())
    summed = len(args.archs) * total
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:9s} median {med:7.2f} s  {summed / med:9,.0f} SAE-tokens/s  "
              f"runs: {', '.join(f'{t:.2f}' for t in ts)}")
    print(f"{len(args.archs)} SAEs ({', '.join(args.archs)}), width {args.width}, {total:,} tokens "
          f"each, {args.model} layer {args.layer}, {torch.get_num_threads()} thread(s); "
          f"same SAE bytes in both paths: {same}")
    ratio = statistics.median(times["cached"]) / statistics.median(times["streaming"])
    print(f"RESULT train_stream ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
