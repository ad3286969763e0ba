"""Throughput of the offline judge (protocol §4's ratings, §3's explain/detect), items/s.

What is timed: ``OfflineJudge.rate`` on generation-length outputs (~100 words, like AxBench's
128 new tokens) with the packaged all-MiniLM-L6-v2 already loaded, after calibration; the
embedding of each output dominates. The unsteered model's log-likelihood (``loglik_fn``) is not
included: it is the language model's cost, paid by the steering stage. Explain/detect rates per
latent are printed for information. The texts are built from a fixed sentence bank with a seeded
generator, so every run judges the same items.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/judge.py [--n-items 512]

Last line: ``RESULT judge items_per_s=<x>``.
"""

from __future__ import annotations

import argparse
import random
import time

from saelib.judges import JudgeConfig, MarkedWindow, RatingItem
from saelib.judges.offline import OfflineJudge, load_embedder

SENTENCES = [
    "Practise the talk out loud several times before the day.",
    "The oven should be preheated to a moderate temperature first.",
    "Plants turn sunlight, water and carbon dioxide into sugar.",
    "Compare unit prices and buy store brands to save money.",
    "The river flooded the valley after three days of heavy rain.",
    "A good password is long, random and never reused.",
    "Stretch gently after running to help the muscles recover.",
    "The committee will publish its report at the end of the month.",
    "Cats often sleep for more than twelve hours a day.",
    "Write the failing test first, then the code that makes it pass.",
    "Early maps of the coast were drawn from sailors' descriptions.",
    "Interest rates rose again as inflation stayed high.",
]
INSTRUCTIONS = [
    "How can I improve my public speaking skills?", "Give me a recipe for oatmeal cookies.",
    "Explain how photosynthesis works.", "How do I save money on groceries?",
    "Describe the effects of a flood.", "How should I choose a password?",
    "What should I do after a run?", "Summarise what a committee report contains.",
    "Tell me about the habits of cats.", "What is test-driven development?",
]
CONCEPTS = ["cooking and baking", "the tokens \" cat\", \" cats\"", "finance and interest rates",
            "weather and rain", "computer security", "maps and sailing"]


def make_items(n: int, rng: random.Random, loop_fraction: float) -> list[RatingItem]:
    """Outputs of 6–10 sentences; ``loop_fraction`` of them one word repeated 60 times."""
    items = []
    for _ in range(n):
        words = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(6, 10)))
        if rng.random() < loop_fraction:
            words = " ".join([rng.choice(words.split())] * 60)
        items.append(RatingItem(rng.choice(CONCEPTS), rng.choice(INSTRUCTIONS), words))
    return items


def make_windows(rng: random.Random, n: int) -> list[MarkedWindow]:
    out = []
    for _ in range(n):
        toks = tuple(" " + w for w in rng.choice(SENTENCES).rstrip(".").split())[:21]
        acts = tuple(rng.random() * 5 if t in (" cats", " rain", " oven") else 0.0 for t in toks)
        out.append(MarkedWindow(toks, acts, tuple(a > 0 for a in acts)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-items", type=int, default=512)
    ap.add_argument("--n-latents", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.n_items < 1 or args.n_latents < 1:
        raise ValueError("--n-items and --n-latents must be >= 1")
    rng = random.Random(args.seed)

    t0 = time.perf_counter()
    embed = load_embedder()
    load_s = time.perf_counter() - t0
    judge = OfflineJudge(JudgeConfig(), embed_fn=embed)
    unsteered = make_items(64, rng, loop_fraction=0.0)
    t0 = time.perf_counter()
    judge.calibrate(unsteered)
    calib_s = time.perf_counter() - t0

    items = make_items(args.n_items, rng, loop_fraction=0.15)
    judge.rate(items[:8])
    t0 = time.perf_counter()
    ratings = judge.rate(items)
    rate_s = time.perf_counter() - t0

    latents = [(make_windows(rng, 15), make_windows(rng, 14)) for _ in range(args.n_latents)]
    t0 = time.perf_counter()
    explanations = [judge.explain(expl) for expl, _ in latents]
    explain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for e, (_, scoring) in zip(explanations, latents):
        judge.detect(e, scoring)
    detect_s = time.perf_counter() - t0

    mean = [sum(getattr(r, k) for r in ratings) / len(ratings)
            for k in ("concept", "instruction", "fluency")]
    print(f"embedder load: {load_s:.2f} s; calibration on {len(unsteered)} items: {calib_s:.2f} s")
    print(f"rate: {len(items)} items in {rate_s:.2f} s; mean ratings C/I/F = "
          f"{mean[0]:.2f}/{mean[1]:.2f}/{mean[2]:.2f}")
    print(f"explain: {args.n_latents / explain_s:.0f} latents/s; "
          f"detect: {args.n_latents / detect_s:.0f} latents/s")
    print(f"RESULT judge items_per_s={len(items) / rate_s:.1f}")


if __name__ == "__main__":
    main()
