"""GeGLU's gate (Shazeer, 2020, "GLU Variants Improve Transformer") with the tanh-approximate GELU
(Hendrycks & Gimpel, 2016), as in Gemma's MLP (``gelu_pytorch_tanh``): ``c = gelu_tanh(a) * b``.

In Gemma's MLP ``a = gate_proj(x)``, ``b = up_proj(x)`` and ``down_proj(c)`` follows. With
``k0 = sqrt(2 / pi)``, ``k1 = 0.044715``::

    gelu_tanh(a) = 0.5 * a * (1 + tanh(k0 * (a + k1 * a^3)))

Since ``1 + tanh(u) = 2 * sigmoid(2u)``, with ``s = sigmoid(2 * k0 * (a + k1 * a^3))``::

    gelu_tanh(a)  = a * s
    gelu_tanh'(a) = s + 2 * k0 * a * s * (1 - s) * (1 + 3 * k1 * a^2)
    da = dc * b * gelu_tanh'(a),   db = dc * gelu_tanh(a)

(no ``tanh`` is needed and nothing cancels near 0). The Triton path is one element-wise pass each way,
fp32 inside: the forward reads ``a`` and ``b`` and writes ``c``; the backward recomputes ``s`` from
``a`` (only ``a`` and ``b`` are kept) and writes ``da`` and ``db``. With ``inplace_backward=True`` they
overwrite ``a`` and ``b``: only for callers that own ``a`` and ``b``, as the patched Gemma MLP does.
"""

from __future__ import annotations

import functools
import math

import torch

from .._dispatch import triton_available
from ._gated import GatedActivationFunction, GateKernels, gate_torch, gated_activation

_K0 = math.sqrt(2.0 / math.pi)
_K1 = 0.044715
# Beyond |a| = 20 the term a * s * (1 - s) * (...) is exactly 0 in fp32; clamping it there keeps
# huge inputs from computing inf * 0.
_TAIL_CLAMP = 20.0

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _geglu_fwd_kernel(a_ptr, b_ptr, c_ptr, n_elements, K0: tl.constexpr, K1: tl.constexpr,
                          BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(2.0 * K0 * (a + K1 * a * a * a))
        c = a * s * b
        tl.store(c_ptr + offs, c.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_bwd_kernel(dc_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n_elements, K0: tl.constexpr, K1: tl.constexpr,
                          TAIL_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        dc = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(2.0 * K0 * (a + K1 * a * a * a))
        t = tl.minimum(tl.maximum(a, -TAIL_CLAMP), TAIL_CLAMP)
        dgelu = s + 2.0 * K0 * t * s * (1.0 - s) * (1.0 + 3.0 * K1 * t * t)
        da = dc * b * dgelu
        db = dc * a * s
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=mask)


_KERNELS = GateKernels(
    _geglu_fwd_kernel, _geglu_bwd_kernel, forward_constants=(("K0", _K0), ("K1", _K1)),
    backward_constants=(("K0", _K0), ("K1", _K1), ("TAIL_CLAMP", _TAIL_CLAMP)),
) if triton_available() else None


class GeGLUFunction(GatedActivationFunction):
    """Triton ``gelu_tanh(a) * b`` for contiguous ``a``, ``b`` of one shape and dtype; see :func:`geglu`."""


def geglu_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ``gelu_tanh(a) * b`` with the contract of :func:`geglu` (fp32 math, fp64 for fp64)."""
    return gate_torch(functools.partial(torch.nn.functional.gelu, approximate="tanh"), a, b)


def geglu(
    a: torch.Tensor, b: torch.Tensor, *, inplace_backward: bool = False, impl: str | None = None,
) -> torch.Tensor:
    """``gelu_tanh(a) * b``, the gate of Gemma's MLP (``gelu_pytorch_tanh(gate_proj(x)) * up_proj(x)``).

    Args:
        a: gate pre-activation ``(..., I)``, floating point.
        b: up projection, same shape, dtype and device as ``a``.
        inplace_backward: let the backward write ``da``/``db`` over ``a``/``b`` (Triton path only).
            Only safe when nothing else reads ``a`` or ``b`` after this op.
        impl: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).

    Returns:
        ``(..., I)`` in ``a``'s dtype, computed in fp32 (fp64 for fp64 on the torch path) and rounded once.
    """
    return gated_activation(a, b, function=GeGLUFunction, kernels=_KERNELS, torch_path=geglu_torch,
                            inplace_backward=inplace_backward, impl=impl)
