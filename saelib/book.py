"""``python -m saelib.book --profile NAME``: render a profile's executed notebooks as the HTML book.

The book never executes code (``_config.yml``: execution off). This copies the papermill outputs of
``runs/<profile>/executed/`` into ``book/executed/`` (git-ignored), rewrites the table of contents
when the stages changed, and runs Jupyter Book 1; the result is ``_build/html/index.html``. The
run's profile, judge and environment are tables on its summary pages (``saelib.report.run_table``,
``environment_table``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from . import stages
from .profiles import ProfileError
from .stages.layout import as_profile

ROOT = Path(__file__).resolve().parent.parent
BOOK_EXECUTED = ROOT / "book" / "executed"
TOC = ROOT / "_toc.yml"


def toc_text() -> str:
    """The book's table of contents, from :data:`saelib.stages.STAGES`: the profile-wide
    summaries (observations first) as results, the methods page, then every executed notebook
    grouped by stage in the pipeline's order."""
    summaries = sorted((s for s in stages.STAGES if s.scope == "profile"),
                       key=lambda s: s.name != stages.analysis.OBSERVATIONS)
    lines = ["# Table of contents, written by `python -m saelib.book --toc` from saelib.stages.STAGES.",
             "# book/executed/ is filled by `python -m saelib.book` from the papermill runs.",
             "format: jb-book", "root: book/intro", "parts:", "  - caption: Results", "    chapters:"]
    lines += [f"      - file: book/executed/{s.name}/{s.name}" for s in summaries]
    lines += ["  - caption: Methods", "    chapters:", "      - file: book/methods",
              "  - caption: Executed notebooks", "    chapters:", "      - file: book/runs",
              "        sections:"]
    lines += [f"          - glob: book/executed/{s.name}/*" for s in stages.STAGES if s.scope != "profile"]
    return "\n".join(lines) + "\n"


def stage_notebooks(profile) -> Path:
    """Copy the executed notebooks (and files they wrote, e.g. CSVs) into the book tree."""
    src = profile.run_root() / "executed"
    if not (src / "analysis" / "analysis.ipynb").exists():
        raise FileNotFoundError(f"{src}/analysis/analysis.ipynb is missing: run "
                                f"`python -m saelib.grid --profile {profile.name}` first")
    shutil.rmtree(BOOK_EXECUTED, ignore_errors=True)
    shutil.copytree(src, BOOK_EXECUTED, ignore=shutil.ignore_patterns(".*", "*.error.txt"))
    return BOOK_EXECUTED


def build(profile, builder: str = "html") -> Path:
    """Build the book of ``profile`` from scratch. ``_build/`` goes first: Sphinx never deletes a
    page whose source is gone, so a book built after another profile's (e.g. the smoke profile's
    after the default's) would still hold the other grid's pages; the executed notebooks are
    copied anew each time, so an incremental build would redo every page anyway."""
    profile = as_profile(profile)
    stage_notebooks(profile)
    if TOC.read_text() != toc_text():  # the stages changed since the committed table of contents
        TOC.write_text(toc_text())
    shutil.rmtree(ROOT / "_build", ignore_errors=True)
    cmd = [sys.executable, "-m", "jupyter_book", "build", str(ROOT), "--builder", builder]
    jb = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    if jb:
        cmd = [jb, "build", str(ROOT), "--builder", builder]
    subprocess.run(cmd, check=True, cwd=ROOT)
    index = ROOT / "_build" / "html" / "index.html"
    if not index.exists():
        raise RuntimeError(f"the book build finished but {index} is missing")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saelib.book", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--toc", action="store_true", help="only write _toc.yml from the stage table")
    args = ap.parse_args(argv)
    if args.toc:
        TOC.write_text(toc_text())
        print(f"wrote {TOC}")
        return 0
    try:
        index = build(args.profile)
    except (ProfileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"book: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
