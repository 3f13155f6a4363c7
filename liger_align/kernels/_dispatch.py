"""Choose between the Triton path and the plain-PyTorch path of an op.

The Triton path runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
``triton`` was imported (Triton's interpreter, used to test the kernels without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

_IMPLS = (None, "triton", "torch")


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor, impl: str | None = None) -> bool:
    """Whether an op on ``tensors`` runs its Triton kernels.

    ``impl="triton"`` or ``impl="torch"`` forces a path; ``None`` picks Triton when every tensor is on
    CUDA, or when the interpreter is switched on (``TRITON_INTERPRET=1``) and Triton is installed.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl is not None:
        return impl == "triton"
    if not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_enabled()
