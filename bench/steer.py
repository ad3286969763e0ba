"""Steered generation throughput: the lean decoder (``steering.engine: lean``), with float32 and
with bfloat16 blocks (``steering.dtype``), vs the reference loop over TransformerLens's forward and
cache (``transformer_lens``, what every run used before), on the same work, side by side.

The work is one SAE's share of the AxBench grid (protocol §4) at the default profile's settings:
``--concepts`` steering directions, each with its own ``--instructions`` packaged instructions (as
the steering stage samples them per concept), × ``--factors``, greedy, ``--new-tokens`` new tokens,
in batches of ``--batch``, on a real packaged model. The directions are random unit vectors
scaled to the residual stream's typical norm at the layer (the timing does not depend on what a
direction means). Both engines run the whole work, alternating, ``--repeats`` times; medians are
compared and the outputs checked token for token: float32 lean against the reference (identical
but for exact near-ties), bfloat16 lean against float32 (its greedy agreement: identical
generations, and the mean share of each generation's tokens before the first difference). Last
line: ``RESULT steer ratio=<x>``, the reference's median over the lean engine's at ``--dtype``.

With ``--sweep B1 B2 …`` it instead times the lean engine at each batch size, alternating
``--repeats`` times (the profile's ``steering.batch_size`` is chosen from these medians). Last
line: ``RESULT steer_sweep best_batch=<b>``.

    python bench/steer.py [--model smollm2-135m-instruct] [--layer 14] [--repeats 3]
    python bench/steer.py --sweep 36 72 144 --repeats 2 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saelib.data.instructions import load_instructions
from saelib.models import load_model
from saelib.steering.run import stop_and_pad, prompt_ids
from saelib.steering.generate import GenerationConfig, generate
from saelib.steering.intervene import make_hook


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--concepts", type=int, default=4)
    ap.add_argument("--instructions", type=int, default=6)
    ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=36)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", type=int, nargs="+", help="batch sizes to compare (see above)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="the lean engine's dtype the RESULT ratio (and a sweep) is for")
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = load_model(args.model)
    print(f"model load: {time.perf_counter() - t0:.1f} s")
    tok = lm.tokenizer
    hook_name = lm.hook_name(args.layer)
    pool = load_instructions("packaged")
    if len(pool) < args.concepts * args.instructions:
        raise SystemExit(f"the packaged pool has {len(pool)} instructions; "
                         f"--concepts × --instructions needs {args.concepts * args.instructions}")
    prompt_of = [prompt_ids(tok, i) for i in pool[: args.concepts * args.instructions]]
    with torch.inference_mode():
        _, cache = lm.tl.run_with_cache(torch.tensor([prompt_of[0]]), names_filter=hook_name)
    scale = float(cache[hook_name][0, 1:].norm(dim=-1).median())
    g = torch.Generator().manual_seed(0)
    W_dec_FD = torch.randn(args.concepts, lm.d_model, generator=g)
    W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
    plan = [(c, c * args.instructions + k, a) for c in range(args.concepts)
            for k in range(args.instructions) for a in args.factors]
    prompts = [prompt_of[p] for _, p, _ in plan]
    stop_ids, pad_id = stop_and_pad(tok)

    def hooks_for(rows):
        return [(hook_name, make_hook("add", W_dec_FD=W_dec_FD, latents_B=[plan[r][0] for r in rows],
                                      max_acts_B=[0.1 * scale] * len(rows),
                                      alphas_B=[plan[r][2] for r in rows]))]

    def run(engine: str, batch: int, dtype: str = "float32") -> list[list[int]]:
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=batch, engine=engine,
                               dtype=dtype)
        return generate(lm.tl, prompts, cfg, hooks_for=hooks_for, stop_ids=stop_ids, pad_id=pad_id)

    describe = (f"model {args.model}, layer {args.layer}; {len(plan)} generations ({args.concepts} "
                f"concepts × {args.instructions} instructions × {len(args.factors)} factors), "
                f"{args.new_tokens} new tokens at most; {torch.get_num_threads()} threads")
    if args.sweep:
        sweep(run, args, describe)
        return
    variants = {"transformer_lens": ("transformer_lens", "float32"), "lean": ("lean", "float32"),
                "lean-bfloat16": ("lean", "bfloat16")}
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs = {}
    for _ in range(args.repeats):
        for name, (engine, dtype) in variants.items():
            t = time.perf_counter()
            outputs[name] = run(engine, args.batch, dtype)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        n_tok = sum(len(o) for o in outputs[k])
        print(f"{k:17s} median {v:7.2f} s  ({n_tok / v:,.1f} new tokens/s)  runs: "
              + ", ".join(f"{x:.2f}" for x in times[k]))
    print(f"{describe}; batch {args.batch}")
    same, prefix = agreement(outputs["lean"], outputs["transformer_lens"])
    print(f"identical greedy outputs (lean vs transformer_lens): {same}/{len(plan)}")
    same, prefix = agreement(outputs["lean-bfloat16"], outputs["lean"])
    print(f"identical greedy outputs (lean bfloat16 vs float32): {same}/{len(plan)}; "
          f"mean share of tokens before the first difference {prefix:.3f}")
    print(f"ratio lean float32 {med['transformer_lens'] / med['lean']:.2f}, "
          f"lean bfloat16 {med['transformer_lens'] / med['lean-bfloat16']:.2f} (over transformer_lens)")
    chosen = "lean" if args.dtype == "float32" else "lean-bfloat16"
    print(f"RESULT steer ratio={med['transformer_lens'] / med[chosen]:.2f}")


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """Identical generations, and the mean share of a generation's tokens (the longer of the
    two) before the first difference."""
    shares = []
    for x, y in zip(a, b):
        n = max(len(x), len(y), 1)
        k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        shares.append(k / n)
    return sum(x == y for x, y in zip(a, b)), statistics.mean(shares)


def sweep(run, args, describe: str) -> None:
    """The lean engine at each batch size; outputs must match the first."""
    times: dict[int, list[float]] = {b: [] for b in args.sweep}
    outputs = {}
    for _ in range(args.repeats):
        for b in args.sweep:
            t = time.perf_counter()
            outputs[b] = run("lean", b, args.dtype)
            times[b].append(time.perf_counter() - t)
    med = {b: statistics.median(v) for b, v in times.items()}
    for b, v in med.items():
        same = sum(x == y for x, y in zip(outputs[b], outputs[args.sweep[0]]))
        print(f"batch {b:4d} median {v:7.2f} s  runs: " + ", ".join(f"{x:.2f}" for x in times[b])
              + f"  outputs identical to batch {args.sweep[0]}: {same}/{len(outputs[b])}")
    print(f"{describe}; lean engine, {args.dtype}")
    print(f"RESULT steer_sweep best_batch={min(args.sweep, key=med.get)}")


if __name__ == "__main__":
    main()
