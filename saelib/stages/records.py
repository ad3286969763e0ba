"""Typed stage records and the "is this current" bookkeeping every stage shares.

Each stage's record is a frozen dataclass (SAEBench's typed ``eval_output``): a renamed or missing
key fails where the record is built, in the stage's tests, not when the book renders. Records carry
a ``schema`` number; one written by another schema, or one whose keys do not match, reads as
:class:`StaleRecord` and its stage recomputes it (never a crash). Records written before schemas
were recorded are schema 1.

A later stage's record is a block of the SAE's ``result.json`` and is current when it was computed
from the SAE as saved now (weights checksum), with the profile's current settings, and its row files
still have the checksums it recorded (:func:`block_is_current`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..profiles import Profile
from ..results import (CorruptFileError, files_match, json_default, peak_rss_mb, provenance,
                       read_json, sha256_file, write_json)
from .layout import RESULT, SAE_WEIGHTS, SAEJob, sae_dir

#: The schema a record without a ``schema`` key was written with (before schemas were recorded).
FIRST_SCHEMA = 1

R = TypeVar("R", bound="Record")


class StaleRecord(ValueError):
    """A stored record this version cannot read (another schema, missing or unknown keys): its
    stage recomputes it."""


@dataclass(frozen=True)
class Record:
    """Base of every stage's record: ``to_json`` / ``from_json`` with a schema check."""

    SCHEMA: ClassVar[int] = FIRST_SCHEMA

    def __getitem__(self, name: str) -> Any:
        """A field by name, for notebook tables that list fields by name; an unknown name is a
        ``KeyError`` naming the record's fields."""
        if name not in self.__dataclass_fields__:
            raise KeyError(f"{type(self).__name__} has no field {name!r}; fields: "
                           f"{', '.join(self.__dataclass_fields__)}")
        return getattr(self, name)

    def to_json(self) -> dict[str, Any]:
        return {**json.loads(json.dumps(asdict(self), default=json_default)), "schema": self.SCHEMA}

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        """The record ``data`` holds, or :class:`StaleRecord` naming why it cannot be read."""
        if not isinstance(data, dict):
            raise StaleRecord(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        schema = data.get("schema", FIRST_SCHEMA)
        if schema != cls.SCHEMA:
            raise StaleRecord(f"{cls.__name__}: written with schema {schema}, this version "
                              f"reads schema {cls.SCHEMA}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields) - {"schema"})
        missing = [n for n, f in fields.items() if n not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if unknown or missing:
            raise StaleRecord(f"{cls.__name__}: unknown keys {unknown}, missing keys {missing}")
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclass(frozen=True)
class BlockRecord(Record):
    """A later stage's block of ``result.json``: its own fields plus what ties it to its inputs.

    ``sae_sha256`` the weights it was computed from; ``settings`` the profile's settings it used
    (as they read back from JSON); ``files_sha256`` its row files' checksums; ``seconds`` and
    ``provenance`` (config, seed, versions, commit, timings, peak memory)."""

    BLOCK: ClassVar[str] = ""

    sae_sha256: str
    settings: dict[str, Any]
    files_sha256: dict[str, str]
    seconds: float
    provenance: dict[str, Any]

    def files(self) -> list[str]:
        """The row files this record points to (``rows_file``, ``scores_file`` where set)."""
        return row_files(vars(self))


def row_files(fields: dict[str, Any]) -> list[str]:
    """The row files a record's fields (or a stage's body) name: ``rows_file``, ``scores_file``."""
    return [fields[k] for k in ("rows_file", "scores_file") if fields.get(k)]


def settings_record(**configs: Any) -> dict[str, Any]:
    """Stage settings as they read back from JSON (tuples become lists), so a stored record and
    the profile's current settings compare equal exactly when nothing changed. A value that is
    not a dataclass (e.g. input digests) is stored as it is."""
    return json.loads(json.dumps({name: asdict(cfg) if is_dataclass(cfg) else cfg
                                  for name, cfg in configs.items()}))


def read_result(path: Path) -> dict[str, Any] | None:
    """An SAE's ``result.json``, or None when it is missing or unreadable (truncated, corrupt):
    then every stage of that SAE counts as not done and is recomputed, and the file is named on
    stderr so the user sees why."""
    if not path.exists():
        return None
    try:
        record = read_json(path)
    except CorruptFileError as e:
        print(f"warning: {e}; its SAE's stages will be recomputed", file=sys.stderr)
        return None
    return record if isinstance(record, dict) else None


def read_block(profile: Profile, job: SAEJob, cls: type[R]) -> R | None:
    """Block ``cls.BLOCK`` of the SAE's ``result.json`` as ``cls``, or None when the file or the
    block is missing, unreadable or stale (another schema; its stage recomputes it)."""
    result = read_result(sae_dir(profile, job) / RESULT)
    if result is None or cls.BLOCK not in result:
        return None
    try:
        return cls.from_json(result[cls.BLOCK])
    except StaleRecord as e:
        print(f"note: {sae_dir(profile, job) / RESULT}: {e}; its stage will recompute it",
              file=sys.stderr)
        return None


def sae_weights_sha(profile: Profile, job: SAEJob) -> str:
    """Checksum of the saved SAE's weights: ties a later stage's record to the SAE it scored, so a
    retrained SAE is never reported with the previous one's μ(θ)."""
    return sha256_file(sae_dir(profile, job) / "sae" / SAE_WEIGHTS)


def block_is_current(profile: Profile, job: SAEJob, cls: type[BlockRecord],
                     settings: dict[str, Any]) -> bool:
    """Block ``cls.BLOCK`` was computed from the SAE as saved now with ``settings``, and its row
    files exist with the checksums it recorded (a JSONL log cut at a line boundary still parses:
    only the checksum tells). The caller checks that the SAE is trained."""
    out = sae_dir(profile, job)
    record = read_block(profile, job, cls)
    if record is None or not all((out / name).exists() for name in record.files()):
        return False
    if record.sae_sha256 != sae_weights_sha(profile, job) or record.settings != settings:
        return False
    return files_match(out, record.files_sha256, out / RESULT, "its stage will be recomputed")


def finish_block(profile: Profile, job: SAEJob, cls: type[R], body: dict[str, Any],
                 settings: dict[str, Any], seed: int, timings: dict[str, float]) -> R:
    """Complete a later stage's record from its ``body`` (weights checksum, its row files'
    checksums, settings, seconds, provenance), write it as block ``cls.BLOCK`` of the SAE's
    ``result.json`` keeping every other key, and return it."""
    out = sae_dir(profile, job)
    files = row_files(body)
    record = cls(**body, sae_sha256=sae_weights_sha(profile, job), settings=settings,
                 files_sha256={name: sha256_file(out / name) for name in files},
                 seconds=sum(timings.values()),
                 provenance=provenance(None, seed, timings, profile=profile.name,
                                       peak_rss_mb=peak_rss_mb()))
    write_json(out / RESULT, {**(read_result(out / RESULT) or {}), cls.BLOCK: record.to_json()})
    return record
