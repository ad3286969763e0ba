"""``python -m saelib.prepare --profile NAME``: dequantise the packaged models and tokenise the corpus.

Run once per profile before the grid (``make prepare``); later runs reuse the caches in seconds.
"""

from __future__ import annotations

import argparse
import sys

from .stages.capture import prepare
from .profiles import ProfileError, load_profile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saelib.prepare", description=__doc__)
    ap.add_argument("--profile", default="default", help="params/<NAME>.yaml or a path")
    args = ap.parse_args(argv)
    try:
        profile = load_profile(args.profile)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for model, info in prepare(profile).items():
        print(f"{model}: train {info['train']}, eval {info['eval']} ({info['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
