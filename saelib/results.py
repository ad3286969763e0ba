"""Result records: atomic writes, checksums and the provenance block every result file carries.

Why: the grid runs for hours; a crash mid-write must never leave a half-written file that a
rerun mistakes for a finished one (write to a temporary file, then ``os.replace``), and every
number in the book must say where it came from (config, seed, library versions, git commit,
timings), as SAEBench's result JSONs do.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

#: Libraries whose versions go into every provenance block.
TRACKED_PACKAGES = (
    "saelib", "torch", "transformers", "transformer-lens", "sae-lens", "numpy", "scipy",
    "papermill", "triton",
)


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: Path | None = None) -> str | None:
    """The current commit (with ``-dirty`` if the work tree has changes), or None outside git."""
    cwd = str(repo or Path(__file__).resolve().parent.parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(config: Any = None, seed: int | None = None, timings: dict[str, float] | None = None,
               **extra: Any) -> dict[str, Any]:
    """The provenance block: what produced a result, so a reader can reproduce it."""
    return {
        "config": config,
        "seed": seed,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()} ({os.cpu_count()} cpus)",
        "created_unix": time.time(),
        "timings_s": timings or {},
        **extra,
    }


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The temporary file lives in the same folder so that ``os.replace`` is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; the artefact gets a normal file's mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def json_default(obj: Any) -> Any:
    """JSON for what ``json`` cannot write: arrays, tensors and numpy scalars, paths, dataclasses."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=json_default, allow_nan=True) + "\n")
    return path


def read_json(path: str | Path) -> Any:
    """Read JSON, naming the file in the error if it is truncated or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e}); delete it to recompute") from e


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write a list of records as JSON lines, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=json_default) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
    return rows


class CorruptFileError(RuntimeError):
    """An artefact on disk is truncated, corrupt or not what its manifest says."""


def first_mismatch(folder: str | Path, sha256s: dict[str, str]) -> Path | None:
    """The first of ``sha256s``' files (names under ``folder``) that is missing or whose checksum
    differs from the one recorded for it, or None when all match: the one check behind every
    manifest, checkpoint pointer and result block that lists its files' checksums."""
    folder = Path(folder)
    for name, sha in sha256s.items():
        path = folder / name
        if not path.exists() or sha256_file(path) != sha:
            return path
    return None


def files_match(folder: str | Path, sha256s: dict[str, str], recorded_in: str | Path,
                then: str) -> bool:
    """:func:`first_mismatch` for a caller that recomputes what fails: a missing or differing
    file is named on stderr with where its checksum was recorded and what happens ``then``."""
    bad = first_mismatch(folder, sha256s)
    if bad is not None:
        print(f"warning: {bad} is missing or differs from its checksum in {recorded_in} "
              f"(truncated or corrupt); {then}", file=sys.stderr)
    return bad is None


def write_npy(path: str | Path, arr: Any) -> str:
    """Save an array as ``.npy`` (never pickled), atomically; return its sha256 for a manifest."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
    return sha256_file(path)


def read_npy(path: str | Path, sha256: str | None = None, mmap: bool = False) -> Any:
    """Load a ``.npy`` written by :func:`write_npy`, refusing pickled objects, and one whose
    checksum differs from its manifest's ``sha256`` (a truncated or replaced file)."""
    path = Path(path)
    if sha256 is not None and sha256_file(path) != sha256:
        raise CorruptFileError(f"{path}: checksum differs from its manifest; it is truncated or "
                               "was replaced; it will be recomputed")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise CorruptFileError(f"{path}: not a readable .npy array ({e})") from e


class Timer:
    """Collects named wall-clock timings: ``with timer("train"): ...``; ``timer.timings``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's ``VmHWM`` (the current address space's
    high-water mark, which a warm kernel restarts per job, :func:`saelib.warm.reset_kernel`), else
    ``getrusage``. Why not ``ru_maxrss`` first: at ``exec`` Linux folds the forked parent's peak
    into it, so a kernel started by a large process reported that process's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
