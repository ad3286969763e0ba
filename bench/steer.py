"""Steered generation throughput: batched with a key/value cache (what saelib does) vs one
generation at a time (the same cached loop, batch 1), on the same work.

The work is a slice of the AxBench grid (protocol §4): ``--concepts`` steering directions ×
``--instructions`` packaged instructions × ``--factors`` factors, greedy, ``--new-tokens`` new
tokens each, on a real packaged model. The directions are random unit vectors scaled to the
residual stream's typical norm at the layer (the timing does not depend on what the direction
means). Both paths run the whole work, alternating, ``--repeats`` times; medians are compared and
the outputs checked token for token. Last line: ``RESULT steer ratio=<x>``.

With ``--sweep B1 B2 …`` it instead times the batched path at each batch size, and at the first
one with TransformerLens's own weight layout (``saelib.models.store_transposed`` undone), all
alternating ``--repeats`` times: the profile's ``steering.batch_size`` and the re-laid weights are
chosen from these medians. Last line: ``RESULT steer_sweep best_batch=<b> relaid_ratio=<x>``.

    python bench/steer.py [--model smollm2-135m-instruct] [--layer 14] [--repeats 3]
    python bench/steer.py --sweep 36 24 72 --factors 1 1.5 2 --instructions 6 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saelib.data.instructions import load_instructions
from saelib.models import load_model
from saelib.steering.run import prompt_ids
from saelib.steering.generate import GenerationConfig, generate
from saelib.steering.intervene import make_hook


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--concepts", type=int, default=2)
    ap.add_argument("--instructions", type=int, default=5)
    ap.add_argument("--factors", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", type=int, nargs="+", help="batch sizes to compare (see above)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = load_model(args.model)
    print(f"model load: {time.perf_counter() - t0:.1f} s")
    tok = lm.tokenizer
    hook_name = lm.hook_name(args.layer)
    instructions = load_instructions("packaged")[: args.instructions]
    base_prompts = [prompt_ids(tok, i) for i in instructions]
    with torch.inference_mode():
        _, cache = lm.tl.run_with_cache(torch.tensor([base_prompts[0]]), names_filter=hook_name)
    scale = float(cache[hook_name][0, 1:].norm(dim=-1).median())
    g = torch.Generator().manual_seed(0)
    W_dec_FD = torch.randn(args.concepts, lm.d_model, generator=g)
    W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
    plan = [(c, p, a) for c in range(args.concepts) for p in range(len(base_prompts)) for a in args.factors]
    prompts = [base_prompts[p] for _, p, _ in plan]
    stop = [i for i in (tok.eos_token_id,) if i is not None]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stop[0] if stop else 0)

    def hooks_for(rows):
        return [(hook_name, make_hook("add", W_dec_FD=W_dec_FD, latents_B=[plan[r][0] for r in rows],
                                      max_acts_B=[0.1 * scale] * len(rows),
                                      alphas_B=[plan[r][2] for r in rows]))]

    def run(batch: int) -> list[list[int]]:
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=batch)
        return generate(lm.tl, prompts, cfg, hooks_for=hooks_for, stop_ids=stop, pad_id=pad)

    if args.sweep:
        sweep(lm, run, args, len(plan))
        return
    times: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, batch in (("batched", args.batch), ("one_at_a_time", 1)):
            t = time.perf_counter()
            outputs[name] = run(batch)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tok = sum(len(o) for o in outputs["batched"])
    for k, v in med.items():
        print(f"{k:14s} median {v:.2f} s  ({n_tok / v:,.1f} new tokens/s)  runs: "
              + ", ".join(f"{x:.2f}" for x in times[k]))
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["one_at_a_time"]))
    print(f"model {args.model}, layer {args.layer}; {len(plan)} generations "
          f"({args.concepts} concepts × {len(base_prompts)} instructions × {len(args.factors)} factors), "
          f"{n_tok} new tokens; batch {args.batch}; {torch.get_num_threads()} threads")
    print(f"identical greedy outputs (batched vs one at a time): {same}/{len(plan)}")
    print(f"RESULT steer ratio={med['one_at_a_time'] / med['batched']:.2f}")


def sweep(lm, run, args, n_generations: int) -> None:
    """Batch sizes, and the first one without the re-laid weights; outputs must match."""
    from saelib.models import store_transposed

    relaid = {n: p.data for n, p in lm.tl.named_parameters()}
    plain = {n: d.contiguous() for n, d in relaid.items()}  # TransformerLens's own layout

    def layout(weights) -> None:
        for n, p in lm.tl.named_parameters():
            p.data = weights[n]

    cases = [(f"batch {b}", b, relaid) for b in args.sweep]
    cases.append((f"batch {args.sweep[0]}, TL layout", args.sweep[0], plain))
    times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    outputs = {}
    for _ in range(args.repeats):
        for name, batch, weights in cases:
            layout(weights)
            t = time.perf_counter()
            outputs[name] = run(batch)
            times[name].append(time.perf_counter() - t)
    layout(relaid)
    assert store_transposed(lm.tl) == 0
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        same = sum(a == b for a, b in zip(outputs[k], outputs[cases[0][0]]))
        print(f"{k:22s} median {v:7.2f} s  runs: " + ", ".join(f"{x:.2f}" for x in times[k])
              + f"  outputs identical to {cases[0][0]}: {same}/{n_generations}")
    best = min(args.sweep, key=lambda b: med[f"batch {b}"])
    ratio = med[f"batch {args.sweep[0]}, TL layout"] / med[f"batch {args.sweep[0]}"]
    print(f"{n_generations} generations, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(f"RESULT steer_sweep best_batch={best} relaid_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
