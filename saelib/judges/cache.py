"""Judge answers cached on disk by content hash, shared by the chat back-ends (OpenAI-compatible,
llama.cpp).

Why: an LLM judge is the slow or paid part of a stage (protocol §3–4; the paper reports ≈ $5 of
judge fees per SAE, and the llama.cpp judge here takes seconds per rating on two cores). Keyed by
sha256 of (model, messages, sampling parameters), a rerun sends no request it has answered before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from saelib.results import CorruptFileError, read_json, write_json

Messages = list[dict[str, str]]


class ResponseCache:
    """A folder of JSON files, one per request, named by the request's sha256 (two-level fan-out).

    Writes are atomic (``saelib.results.write_json``), so a crash never leaves a half answer; a
    corrupt file is treated as a miss and rewritten.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(model: str, messages: Messages, params: dict[str, Any]) -> str:
        blob = json.dumps({"model": model, "messages": messages, "params": params},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            record = read_json(path)
        except CorruptFileError:
            return None
        return record if isinstance(record, dict) and isinstance(record.get("text"), str) else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        write_json(self.path(key), record)
