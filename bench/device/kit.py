"""The wheels a GPU machine's image lacks for ``bench/device/check.sh``, at this venv's versions.

The lent GPU machines reach no package index; their image holds torch, triton, transformers,
numpy, pandas, scipy and the like, but not sae-lens, TransformerLens and what those import. This
downloads those (``--no-deps``: the image has the rest) for the machine's Python into ``.whl/``
(ignored by git), at the versions installed here, so the GPU runs the code the tests ran. The
folder travels with the call (``carry``), and the check installs it with ``pip --no-index``.

    python bench/device/kit.py [--dest .whl] [--python-version 3.12]

The list was read off the modules that ``saelib.stages.streaming``, ``saelib.plan`` and
TransformerLens's model configs import, less the image's package list (2026-11-17).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

#: Distributions the image lacks that the check imports (sae-lens and TransformerLens, with
#: wandb, which TransformerLens imports at start, and their imports).
MISSING = (
    "sae-lens", "transformer-lens", "better-abc", "fancy-einsum", "typeguard", "beartype",
    "datasets", "dill", "multiprocess", "docstring-parser", "simple-parsing",
    "wandb", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "platformdirs",
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto",
    "opentelemetry-semantic-conventions", "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-exporter-otlp-proto-common", "opentelemetry-exporter-http-transport",
    "opentelemetry-exporter-otlp-common", "googleapis-common-protos", "zstandard",
)
#: What may travel beside the working tree (the device call carries 64 MiB in all).
MAX_BYTES = 48 * 2**20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def requirements() -> list[str]:
    """``name==version`` of each distribution as installed here (a missing one is an error)."""
    out = []
    for name in MISSING:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in this environment: run `make venv` "
                             "first") from None
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=".whl")
    ap.add_argument("--python-version", default="3.12",
                    help="the GPU machine's Python (3.12 on the lent machines)")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    reqs = requirements()
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", args.python_version, "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + reqs, check=True)
    wanted = {tuple(r.replace("-", "_").lower().split("==")) for r in reqs}
    for w in dest.glob("*.whl"):  # an earlier kit's: two versions of one package stop the install
        if tuple(w.name.lower().split("-")[:2]) not in wanted:
            w.unlink()
    size = sum(w.stat().st_size for w in dest.glob("*.whl"))
    (dest / "requirements.txt").write_text("\n".join(reqs) + "\n")
    print(f"{len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest}/")
    if size > MAX_BYTES:
        raise SystemExit(f"the kit is {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB "
                         "that can travel beside the working tree")


if __name__ == "__main__":
    main()
