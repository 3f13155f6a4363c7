"""SwiGLU's gate (Shazeer, 2020, "GLU Variants Improve Transformer"): ``c = silu(a) * b``.

In Llama's MLP ``a = gate_proj(x)``, ``b = up_proj(x)`` and ``down_proj(c)`` follows. With
``sigma = sigmoid(a)`` and ``silu(a) = a * sigma``::

    da = dc * b * sigma * (1 + a * (1 - sigma))
    db = dc * silu(a)

The Triton path is one element-wise pass each way, fp32 inside: the forward reads ``a`` and ``b`` and
writes ``c``; the backward recomputes ``sigma`` from ``a`` (nothing but ``a`` and ``b`` is kept, where
eager PyTorch keeps ``silu(a)`` too) and writes ``da`` and ``db``. With ``inplace_backward=True`` they
overwrite ``a`` and ``b`` (no new memory in the backward): only for callers that own ``a`` and ``b``,
as the patched Llama MLP does.
"""

from __future__ import annotations

import torch

from .._dispatch import triton_available
from ._gated import GatedActivationFunction, GateKernels, gate_torch, gated_activation

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_fwd_kernel(a_ptr, b_ptr, c_ptr, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = a * tl.sigmoid(a) * b
        tl.store(c_ptr + offs, c.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(dc_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        dc = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sigma = tl.sigmoid(a)
        silu = a * sigma
        da = dc * b * sigma * (1.0 + a * (1.0 - sigma))
        db = dc * silu
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=mask)


_KERNELS = GateKernels(_swiglu_fwd_kernel, _swiglu_bwd_kernel) if triton_available() else None


class SwiGLUFunction(GatedActivationFunction):
    """Triton ``silu(a) * b`` for contiguous ``a``, ``b`` of one shape and dtype; see :func:`swiglu`."""


def swiglu_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ``silu(a) * b`` with the contract of :func:`swiglu` (fp32 math, fp64 for fp64)."""
    return gate_torch(torch.nn.functional.silu, a, b)


def swiglu(
    a: torch.Tensor, b: torch.Tensor, *, inplace_backward: bool = False, impl: str | None = None,
) -> torch.Tensor:
    """``silu(a) * b``, the gate of Llama's MLP (``silu(gate_proj(x)) * up_proj(x)``).

    Args:
        a: gate pre-activation ``(..., I)``, floating point.
        b: up projection, same shape, dtype and device as ``a``.
        inplace_backward: let the backward write ``da``/``db`` over ``a``/``b`` (Triton path only).
            Only safe when nothing else reads ``a`` or ``b`` after this op.
        impl: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).

    Returns:
        ``(..., I)`` in ``a``'s dtype, computed in fp32 and rounded once.
    """
    return gated_activation(a, b, function=SwiGLUFunction, kernels=_KERNELS, torch_path=swiglu_torch,
                            inplace_backward=inplace_backward, impl=impl)
