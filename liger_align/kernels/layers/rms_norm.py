"""RMSNorm (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization"), as in Llama and Gemma.

For a row ``x`` of length ``H`` and a constant ``offset`` (0 for Llama, 1 for Gemma's ``(1 + weight)``)::

    rstd = 1 / sqrt(mean_j x_j^2 + eps)
    y    = (offset + weight) * x * rstd

Backward, with ``xhat = x * rstd`` and ``g = (offset + weight) * dy``::

    dx     = rstd * (g - xhat * mean_j(g_j * xhat_j))
    dweight = sum_rows dy * xhat

The Triton path reads ``x`` once and writes ``y`` once in the forward (plus one fp32 ``rstd`` per row,
kept for the backward); the backward reads ``dy`` and ``x`` once, writes ``dx`` once and reduces
``dweight`` per program in fp32 before one small sum. All arithmetic is fp32 whatever the storage
dtype (the kernels, shared by RMSNorm and LayerNorm, live in :mod:`._norm`). The plain-PyTorch path
computes the same formula (in fp32, or fp64 for fp64 inputs) with autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._dispatch import use_triton
from ._norm import check_norm_inputs, norm_backward, norm_forward


@dataclass(frozen=True)
class RMSNormOptions:
    """The non-tensor argument of :class:`RMSNormFunction`: ``eps``, the weight ``offset`` and the output dtype."""

    eps: float
    offset: float
    out_dtype: torch.dtype


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm over the last dimension of a contiguous ``(N, H)`` input; see :func:`rms_norm`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, opts: RMSNormOptions) -> torch.Tensor:
        y, _, rstd = norm_forward(x, weight, None, eps=opts.eps, offset=opts.offset, out_dtype=opts.out_dtype,
                                  centred=False)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = opts.offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        dx, dw, _ = norm_backward(dy, x, weight, None, rstd, offset=ctx.offset,
                                  compute_dw=ctx.needs_input_grad[1], compute_db=False)
        return (dx if ctx.needs_input_grad[0] else None), (None if dw is None else dw.to(weight.dtype)), None


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-PyTorch RMSNorm with the contract of :func:`rms_norm` (autograd gives the gradients)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    scale = weight.to(compute) + offset if offset else weight.to(compute)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps) * scale
    return y.to(out_dtype or torch.promote_types(x.dtype, weight.dtype))


def _check(x: object, weight: object, eps: object, offset: object, out_dtype: object) -> None:
    check_norm_inputs(x, eps, weight=weight)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset must be a float (0.0 for Llama, 1.0 for Gemma), got {offset!r}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, offset: float = 0.0,
    out_dtype: torch.dtype | None = None, impl: str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dimension: ``y = (offset + weight) * x / sqrt(mean(x^2, -1) + eps)``.

    Args:
        x: ``(..., H)`` floating point (fp32, bf16, fp16, fp64); any leading shape.
        weight: ``(H,)`` floating point, on ``x``'s device.
        eps: added to the mean square (Llama uses ``config.rms_norm_eps``, 1e-5 or 1e-6).
        offset: added to ``weight`` in fp32 before scaling: 0.0 (Llama) or 1.0 (Gemma's ``1 + weight``,
            whose weights are stored centred on 0). The gradient of ``weight`` is unchanged by it.
        out_dtype: the result's dtype; ``None`` gives ``promote_types(x.dtype, weight.dtype)`` (what
            ``LlamaRMSNorm`` returns); Gemma's ``GemmaRMSNorm`` returns ``x.dtype``.
        impl: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).

    Returns:
        ``(..., H)`` in ``out_dtype``. The math runs in fp32 (fp64 for fp64 inputs on the torch path),
        ``x`` normalised and multiplied by ``offset + weight`` before one rounding (Gemma's order).
    """
    _check(x, weight, eps, offset, out_dtype)
    out_dtype = out_dtype or torch.promote_types(x.dtype, weight.dtype)
    if not use_triton(x, weight, impl=impl) or x.numel() == 0:
        return rms_norm_torch(x, weight, eps=eps, offset=float(offset), out_dtype=out_dtype)
    shape = x.shape
    opts = RMSNormOptions(eps=float(eps), offset=float(offset), out_dtype=out_dtype)
    y = RMSNormFunction.apply(x.reshape(-1, shape[-1]).contiguous(), weight.contiguous(), opts)
    return y.view(shape)
