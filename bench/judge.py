"""Throughput of the offline judge (protocol §4's ratings, §3's explain/detect), items/s, and of the
LLM judge (the packaged Qwen2.5-Coder-1.5B through llama.cpp), ratings/s.

What is timed: ``OfflineJudge.rate`` on generation-length outputs (~100 words, like AxBench's
128 new tokens) with the packaged all-MiniLM-L6-v2 already loaded, after calibration; the
embedding of each output dominates. The unsteered model's log-likelihood (``loglik_fn``) is not
included: it is the language model's cost, paid by the steering stage. Explain/detect rates per
latent are printed for information. The texts are built from a fixed sentence bank with a seeded
generator, so every run judges the same items.

LLM judge: the same ``--llm-items`` steered-answer-length items (two sentences, like the default's
32 new tokens) rated with 1 and with 2 threads, each with llama.cpp's prefix reuse (requests in
template order, :class:`saelib.judges.llama.LlamaCppJudge`) and without it (context cleared before
every prompt: one prompt at a time from scratch), interleaved, ``--repeats`` times; medians. No
answer cache. ``--llm-items 0`` skips it.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/judge.py [--n-items 512] [--llm-items 4]

Last line: ``RESULT judge items_per_s=<x> llm_ratings_per_s=<best> llm_prefix_speedup=<x>``.
"""

from __future__ import annotations

import argparse
import random
import statistics
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


def make_items(n: int, rng: random.Random, loop_fraction: float,
               sentences: tuple[int, int] = (6, 10), loop_len: int = 60) -> list[RatingItem]:
    """Outputs of 6–10 sentences (or ``sentences``); ``loop_fraction`` of them one word repeated
    ``loop_len`` times."""
    items = []
    for _ in range(n):
        words = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(*sentences)))
        if rng.random() < loop_fraction:
            words = " ".join([rng.choice(words.split())] * loop_len)
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
    ap.add_argument("--llm-items", type=int, default=4, help="items for the LLM judge (0: skip)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each LLM setting")
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
    result = f"RESULT judge items_per_s={len(items) / rate_s:.1f}"
    if args.llm_items:
        best, speedup = bench_llm(make_items(args.llm_items, rng, 0.25, sentences=(1, 2), loop_len=20),
                                  args.repeats)
        result += f" llm_ratings_per_s={best:.3f} llm_prefix_speedup={speedup:.2f}"
    print(result)


def bench_llm(items: list[RatingItem], repeats: int) -> tuple[float, float]:
    """Ratings/s of the llama.cpp judge per (threads, prefix reuse), interleaved; returns the best
    configuration's median and the median speed-up of prefix reuse at that thread count."""
    from saelib.judges.llama import LlamaCppJudge, load_llama, model_path

    path = model_path(JudgeConfig(backend="llama"))
    models = {t: load_llama(path, t, 4096) for t in (1, 2)}
    rates: dict[tuple[int, bool], list[float]] = {}
    for _ in range(repeats):
        for threads, llm in models.items():
            for prefix in (True, False):
                cfg = JudgeConfig(backend="llama", llama_threads=threads, llama_prefix_cache=prefix,
                                  max_tokens_rating=64)
                llm.reset()
                judge = LlamaCppJudge(cfg, llm=llm)
                t0 = time.perf_counter()
                judge.rate(items)
                rates.setdefault((threads, prefix), []).append(3 * len(items) / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    for (threads, prefix), v in sorted(med.items()):
        print(f"llm judge: {threads} thread(s), prefix reuse {'on ' if prefix else 'off'}: "
              f"{v:.3f} ratings/s (median of {repeats}: {', '.join(f'{x:.3f}' for x in rates[(threads, prefix)])})")
    threads = max((1, 2), key=lambda t: med[(t, True)])
    for llm in models.values():
        llm.close()
    return med[(threads, True)], med[(threads, True)] / med[(threads, False)]


if __name__ == "__main__":
    main()
