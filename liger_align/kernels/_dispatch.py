"""Choose between the Triton path and the plain-PyTorch path of an op.

The Triton path runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
``triton`` was imported (Triton's interpreter, used to test the kernels without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

_IMPLS = (None, "triton", "torch")
# Triton builds a kernel for its interpreter or for a GPU when the kernel is defined (``@triton.jit``,
# at the import of this package), from the TRITON_INTERPRET seen then: setting it later changes nothing.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_interpreted() -> bool:
    """True when this package's Triton kernels were built for the interpreter (they can run on CPU tensors)."""
    return _INTERPRET_AT_IMPORT and triton_available()


def use_triton(*tensors: torch.Tensor, impl: str | None = None) -> bool:
    """Whether an op on ``tensors`` runs its Triton kernels.

    ``impl="triton"`` or ``impl="torch"`` forces a path; ``None`` picks Triton when every tensor is on
    CUDA, or when the interpreter is switched on (``TRITON_INTERPRET=1``) and Triton is installed.
    ``impl="triton"`` raises ``ValueError`` (before any kernel runs) when Triton is not installed, or
    for CPU tensors when the kernels were not built for the interpreter.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {list(_IMPLS)}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        check_triton_runs(*tensors)
        return True
    if not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_enabled() and kernels_interpreted()


def check_triton_runs(*tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` saying what to do when the Triton kernels cannot run on ``tensors``."""
    if not triton_available():
        raise ValueError("impl='triton' needs the triton package, which is not installed; use impl='torch' or None")
    devices = sorted({str(t.device) for t in tensors if not t.is_cuda})
    if devices and not kernels_interpreted():
        raise ValueError(
            f"impl='triton' got tensors on {devices}: Triton runs on CUDA tensors, or on CPU tensors through its "
            "interpreter, which must be switched on with TRITON_INTERPRET=1 in the environment before triton (and "
            "liger_align) is imported; otherwise use impl='torch' (or impl=None) or move the tensors to a CUDA device"
        )
