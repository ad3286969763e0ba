"""A planted API key and a byte-level grep: shared by the secrets tests."""

from __future__ import annotations

from pathlib import Path

CANARY = "sk-canary-0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def files_containing(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``secret`` (binary files included)."""
    needle = secret.encode()
    return [str(p) for p in Path(root).rglob("*") if p.is_file() and needle in p.read_bytes()]
