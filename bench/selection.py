"""ΔC_k feature scoring: the fast path (prefix cached, last position recomputed from layer L + 1
for a batch of features) vs the naive reference (a full forward of the prefix per feature).

Both score the same features on a real packaged model; the amplified next-token logits and ΔC_k
of the two are compared. The SAE is a saved one (``--sae FOLDER``) or, by default, a random one of
the CPU profile's width with unit-norm decoder rows (the timing does not depend on what the
features mean). Paths alternate, ``--repeats`` times; medians of the per-feature time are
compared. Last line: ``RESULT select ratio=<x> maxdiff=<d>`` (maxdiff: the largest |ΔC_k| gap).
(Named ``selection.py``, not ``select.py``: a script's folder comes first on ``sys.path``, and a
``bench/select.py`` would shadow the standard library's ``select`` for every bench script.)

    python bench/selection.py [--model smollm2-135m-instruct] [--layer 14] [--features 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saelib.models import ids_with_bos, load_model
from saelib.selection.amplify import amplified_logits_fast, amplified_logits_naive, prefix_state
from saelib.selection.confidence import delta_topk_confidence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--sae", help="a saved SAE folder (default: a random SAE of --width)")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--features", type=int, default=64, help="features scored by both paths")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prefix", default="From my experience,")
    ap.add_argument("--alpha", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lm = load_model(args.model)
    tok = lm.tokenizer
    if args.sae:
        from saelib.sae.io import load_sae

        sae = load_sae(args.sae)
        W_dec_FD, b_dec_D, encode = sae.W_dec.detach(), sae.b_dec.detach(), sae.encode
    else:
        g = torch.Generator().manual_seed(0)
        W_dec_FD = torch.randn(args.width, lm.d_model, generator=g)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        W_enc_DF = W_dec_FD.T.clone()
        b_dec_D = torch.zeros(lm.d_model)
        encode = lambda x: torch.relu(x @ W_enc_DF)  # noqa: E731
    ids = ids_with_bos(tok, args.prefix)
    state = prefix_state(lm.tl, encode, ids, args.layer)
    feats = list(range(args.features))

    times: dict[str, list[float]] = {"fast": [], "naive": []}
    out = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        out["fast"] = amplified_logits_fast(lm.tl, state, W_dec_FD, b_dec_D, feats, args.alpha,
                                            batch_size=args.batch)
        times["fast"].append(time.perf_counter() - t)
        t = time.perf_counter()
        out["naive"] = amplified_logits_naive(lm.tl, state, W_dec_FD, b_dec_D, feats, args.alpha)
        times["naive"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:6s} median {v:.3f} s for {len(feats)} features ({1e3 * v / len(feats):.2f} ms/feature)"
              f"  runs: " + ", ".join(f"{x:.2f}" for x in times[k]))
    logit_diff = (out["fast"] - out["naive"]).abs().max().item()
    dc = [delta_topk_confidence(out[k], state.base_logits_V, k=1) for k in ("fast", "naive")]
    maxdiff = (dc[0] - dc[1]).abs().max().item()
    whole = med["fast"] / len(feats) * W_dec_FD.shape[0]
    print(f"model {args.model}, layer {args.layer} of {lm.n_layers}, prefix {args.prefix!r} "
          f"({len(ids)} tokens), {torch.get_num_threads()} threads; max |logit gap| {logit_diff:.2e}")
    print(f"fast path for all {W_dec_FD.shape[0]} features of this SAE: ~{whole:.1f} s")
    print(f"RESULT select ratio={med['naive'] / med['fast']:.2f} maxdiff={maxdiff:.2e}")


if __name__ == "__main__":
    main()
