"""The offline (rule) judge's throughput: its fluency signal, the unsteered model's mean log-prob of
each answer, on TransformerLens's forward (what every run used before) vs the lean decoder's
packed scoring with float32 and with bfloat16 blocks (``steering.engine`` / ``steering.dtype``),
the latter with the float32 unembedding (before 2026-12-07) and with the bfloat16 one whose
largest logits are recomputed in float32 (``engine.BF16_SCORING_HEAD``), on the same work, side by
side.

The work is one SAE's ratings at the default profile's settings: ``--items`` answers of up to
``--new-tokens`` tokens, generated once (greedy, unsteered, lean bfloat16) to packaged
instructions, each rated for a seeded vocabulary concept. Each engine rates the whole work
(``OfflineJudge.rate``: embeddings, rules and the log-likelihood pass), alternating, ``--repeats``
times; medians are compared. Agreement with the reference (the first engine run) is stated:
the largest and mean absolute difference in mean log-prob, and the share of identical fluency
ratings. Last line: ``RESULT rule_judge ratio=<x>``, the first engine's median over the last's.

    python bench/rule_judge.py [--model smollm2-135m-instruct] [--items 240] [--repeats 3]
        [--engines transformer_lens "lean float32" "lean bfloat16, float32 head" "lean bfloat16"]
"""

from __future__ import annotations

import argparse
import statistics
import time

from contextlib import contextmanager

import numpy as np
import torch

from saelib.data.instructions import load_instructions
from saelib.judges.base import RatingItem
from saelib.judges.config import JudgeConfig
from saelib.judges.factory import make_judge
from saelib.models import load_model
from saelib.steering import engine
from saelib.steering.axbench import SteeringConfig
from saelib.steering.generate import GenerationConfig, generate
from saelib.steering.run import _loglik_fn, calibration_concepts, prompt_ids, stop_and_pad

#: name → (engine, dtype, bfloat16 scoring head)
ENGINES = {"transformer_lens": ("transformer_lens", "float32", False),
           "lean float32": ("lean", "float32", False),
           "lean bfloat16, float32 head": ("lean", "bfloat16", False),
           "lean bfloat16": ("lean", "bfloat16", True)}


@contextmanager
def scoring_head(bf16: bool):
    was = engine.BF16_SCORING_HEAD
    engine.BF16_SCORING_HEAD = bf16
    try:
        yield
    finally:
        engine.BF16_SCORING_HEAD = was


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--items", type=int, default=240)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES),
                    help="engines to run; the first is the reference, the ratio is first / last")
    args = ap.parse_args()
    engines = {name: ENGINES[name] for name in args.engines}

    lm = load_model(args.model)
    tok = lm.tokenizer
    stop_ids, pad_id = stop_and_pad(tok)
    pool = load_instructions("packaged")
    instructions = [pool[i % len(pool)] for i in range(args.items)]
    t0 = time.perf_counter()
    ids = generate(lm.tl, [prompt_ids(tok, i) for i in instructions],
                   GenerationConfig(args.new_tokens, batch_size=args.batch, dtype="bfloat16"),
                   stop_ids=stop_ids, pad_id=pad_id)
    answers = [tok.decode(a, skip_special_tokens=True) for a in ids]
    concepts = calibration_concepts(tok, 16, 0)
    items = [RatingItem(concepts[k % len(concepts)], i, a)
             for k, (i, a) in enumerate(zip(instructions, answers))]
    print(f"work: {len(items)} answers, {sum(map(len, ids))} tokens "
          f"(generated in {time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}")

    judges, fns, logliks = {}, {}, {}
    for name, (engine_name, dtype, bf16_head) in engines.items():
        cfg = SteeringConfig(engine=engine_name, dtype=dtype, batch_size=args.batch)
        fns[name] = _loglik_fn(lm, cfg, pad_id)
        judges[name] = make_judge(JudgeConfig(backend="offline"), loglik_fn=fns[name])
        with scoring_head(bf16_head):
            judges[name].rate(items[:4])  # warm: embedder load, bfloat16 copy
    times: dict[str, list[float]] = {n: [] for n in engines}
    ll_times: dict[str, list[float]] = {n: [] for n in engines}
    ratings = {}
    for _ in range(args.repeats):
        for name, judge in judges.items():
            with scoring_head(engines[name][2]):
                t = time.perf_counter()
                ratings[name] = judge.rate(items)
                times[name].append(time.perf_counter() - t)
                t = time.perf_counter()
                logliks[name] = np.asarray(fns[name](answers))
                ll_times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    ll_med = {n: statistics.median(v) for n, v in ll_times.items()}
    first, last = args.engines[0], args.engines[-1]
    ref = logliks[first]
    finite = np.isfinite(ref)
    for name in engines:
        gap = np.abs(logliks[name][finite] - ref[finite])
        same = np.mean([a.fluency == b.fluency for a, b in
                        zip(ratings[name], ratings[first])])
        print(f"{name:>16}: rate median {med[name]:.2f} s "
              f"({', '.join(f'{t:.2f}' for t in times[name])}), of which the log-likelihood pass "
              f"alone {ll_med[name]:.2f} s; mean log-prob vs reference: "
              f"max |Δ| {gap.max():.4f}, mean |Δ| {gap.mean():.4f} nats "
              f"(reference mean {ref[finite].mean():.3f}); same fluency rating {same:.3f}")
    print(f"RESULT rule_judge ratio={med[first] / med[last]:.2f}")


if __name__ == "__main__":
    main()
