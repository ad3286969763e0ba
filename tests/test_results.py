"""Result records: atomic writes, corrupt-file errors naming the path, and the provenance block.

Why it matters: the grid resumes from what is on disk, so a crash mid-write must never leave a
half file that a rerun mistakes for a finished one (``saelib/results.py``).
"""

from __future__ import annotations

import json
import time

import pytest

from saelib.results import (TRACKED_PACKAGES, CorruptFileError, Timer, atomic_path, provenance,
                            read_json, read_jsonl, sha256_file, write_json, write_jsonl)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_json_round_trips_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "deep" / "r.json"
    record = {"l0": 10.5, "ok": True, "shape": (3, 4), "where": tmp_path, "nan": float("nan")}
    write_json(path, record)
    back = read_json(path)
    assert back["l0"] == 10.5 and back["shape"] == [3, 4] and back["where"] == str(tmp_path)
    assert back["nan"] != back["nan"]
    assert leftovers(path.parent) == []


def test_numpy_and_torch_values_are_serialised(tmp_path):
    import numpy as np
    import torch

    write_json(tmp_path / "x.json", {"a": np.float32(1.5), "b": np.arange(3), "c": torch.tensor([1, 2])})
    assert read_json(tmp_path / "x.json") == {"a": 1.5, "b": [0, 1, 2], "c": [1, 2]}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(tmp_path / "y.json", {"bad": object()})
    assert not (tmp_path / "y.json").exists() and leftovers(tmp_path) == []


def test_exception_inside_atomic_path_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"version": 1})
    with pytest.raises(RuntimeError, match="crash mid-write"):
        with atomic_path(path) as tmp:
            tmp.write_text('{"version": 2, "half')
            raise RuntimeError("crash mid-write")
    assert read_json(path) == {"version": 1}
    assert leftovers(tmp_path) == []


def test_exception_before_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "new.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_temp_file_sits_beside_the_target(tmp_path):
    """``os.replace`` is only atomic within one file system, hence the same folder."""
    path = tmp_path / "sub" / "a.npy"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".a.npy.")
        tmp.write_bytes(b"x")
    assert path.read_bytes() == b"x"


def test_read_json_on_a_truncated_file_names_the_path(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"core": {"l0": 1.0, "mse": 2.0}})
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CorruptFileError, match=rf"{path}: not valid JSON .*delete it to recompute"):
        read_json(path)


def test_jsonl_round_trip_and_corrupt_line(tmp_path):
    rows = [{"i": i, "text": f"row {i}"} for i in range(3)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert read_jsonl(path) == rows
    path.write_text(path.read_text() + '{"i": 3, "te\n')
    with pytest.raises(CorruptFileError, match=r"rows\.jsonl: line 4 is not valid JSON"):
        read_jsonl(path)


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_provenance_records_config_seed_versions_commit_and_timings():
    prov = provenance({"width": 256}, 7, {"train": 1.5}, profile="smoke")
    assert prov["config"] == {"width": 256} and prov["seed"] == 7
    assert prov["timings_s"] == {"train": 1.5} and prov["profile"] == "smoke"
    assert set(prov["versions"]) == set(TRACKED_PACKAGES)
    assert prov["versions"]["torch"] and prov["versions"]["numpy"]
    assert prov["git_commit"] is None or len(prov["git_commit"].removesuffix("-dirty")) == 40
    assert abs(prov["created_unix"] - time.time()) < 60
    json.dumps(prov)  # a provenance block is always plain JSON


def test_timer_accumulates_named_timings():
    timer = Timer()
    for _ in range(2):
        with timer("step"):
            time.sleep(0.01)
    with pytest.raises(ValueError):
        with timer("failing"):
            raise ValueError("boom")
    assert timer.timings["step"] >= 0.02
    assert "failing" in timer.timings


def test_atomic_writes_get_a_normal_file_mode(tmp_path):
    """mkstemp creates 0600 files; a result or book download must be readable like any file
    (the mode the umask gives), not only by its owner."""
    import os

    from saelib.results import write_json

    path = write_json(tmp_path / "r.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
