"""Which implementation a kernel call runs: Triton on CUDA tensors, torch elsewhere.

Why a separate module: every entry point in ``saelib.kernels`` takes the same
``backend='auto'|'torch'|'triton'`` argument and must resolve it the same way. Triton is an
optional dependency (``pip install saelib[triton]``), so it is imported here lazily and only
once; without it every call runs the torch path. The Triton kernels themselves live in
``triton_*.py`` modules that are imported only when first needed, because ``@triton.jit`` reads
``TRITON_INTERPRET`` when the kernel is *defined*: a test that sets ``TRITON_INTERPRET=1`` before
the first Triton call gets the interpreter, which runs the same kernels on CPU tensors.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when the optional ``triton`` package imports (a broken install counts as absent)."""
    try:
        import triton  # noqa: F401  (the probe itself: is Triton installed?)
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``).

    The interpreter executes kernels with numpy on CPU tensors; it is how the Triton paths are
    tested on machines without a GPU (issue item 4).
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> Literal["torch", "triton"]:
    """Turn the user's ``backend`` choice into the implementation to run.

    ``auto`` picks Triton only when it is installed and every tensor is on CUDA; ``triton`` on CPU
    tensors is allowed only under the interpreter. Raises ``ValueError`` naming the problem.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' needs the optional 'triton' package; it is not importable")
    if not on_cuda and not triton_interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {devices}); on CPU set TRITON_INTERPRET=1 "
            "before the first Triton call to run the kernels under Triton's interpreter"
        )
    return "triton"


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes and ``tl.sort`` lengths must be powers of 2)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
