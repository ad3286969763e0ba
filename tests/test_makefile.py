"""The Makefile's llama.cpp wheel: built for this CPU by default and cached under a folder named by
the CPU's instruction-set flags, so that a machine with other flags never installs a wheel that
would die on an illegal instruction (a dry run, ``make -n``: nothing is built)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPUINFO = Path("/proc/cpuinfo")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry_run(tmp_path: Path, *extra: str) -> str:
    out = subprocess.run(["make", "-n", "-B", "venv", f"VENV={tmp_path / 'venv'}",
                          f"WHEELS={tmp_path / 'wheels'}", *extra],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout


def _flags_tag() -> str:
    line = next(ln for ln in CPUINFO.read_text().splitlines() if ln.startswith("flags"))
    return hashlib.sha256((line + "\n").encode()).hexdigest()[:12]


@pytest.mark.skipif(not CPUINFO.exists(), reason="no /proc/cpuinfo")
def test_the_default_wheel_is_built_for_this_cpu_into_a_folder_named_by_its_flags(tmp_path):
    text = _dry_run(tmp_path)
    folder = tmp_path / "wheels" / f"native-{_flags_tag()}"
    assert 'CMAKE_ARGS="-DGGML_NATIVE=ON"' in text
    # pip's own cache would hand back a wheel built with other CMAKE_ARGS
    assert re.search(r"pip wheel [^\n]*--no-cache-dir", text)
    assert f"-w {folder} " in text
    assert f"--find-links {folder} --only-binary llama-cpp-python" in text
    assert re.search(r"native-[0-9a-f]{12}", text)


def test_llama_native_0_builds_the_portable_wheel_into_the_shared_folder(tmp_path):
    text = _dry_run(tmp_path, "LLAMA_NATIVE=0")
    wheels = tmp_path / "wheels"
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in text and "GGML_NATIVE=ON" not in text
    assert f"-w {wheels} " in text and "native-" not in text
    assert f"--find-links {wheels} --only-binary llama-cpp-python" in text
