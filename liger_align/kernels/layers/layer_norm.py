"""LayerNorm (Ba, Kiros & Hinton, 2016, "Layer Normalization"), as in ViT-style vision towers (Qwen2-VL).

For a row ``x`` of length ``H``::

    mean = mean_j x_j
    rstd = 1 / sqrt(mean_j (x_j - mean)^2 + eps)
    xhat = (x - mean) * rstd
    y    = weight * xhat + bias            (bias optional)

Backward, with ``g = weight * dy``::

    dx      = rstd * (g - mean_j(g_j) - xhat * mean_j(g_j * xhat_j))
    dweight = sum_rows dy * xhat
    dbias   = sum_rows dy

The Triton path reads ``x`` once and writes ``y`` once in the forward (plus one fp32 ``mean`` and
``rstd`` per row, kept for the backward); the backward reads ``dy`` and ``x`` once, writes ``dx`` once
and reduces ``dweight`` and ``dbias`` per persistent program in fp32 before one small sum. All
arithmetic is fp32 whatever the storage dtype (the kernels, shared by RMSNorm and LayerNorm,
live in :mod:`._norm`). The plain-PyTorch path
computes the same formula (in
fp32, or fp64 for fp64 inputs) with autograd.
"""

from __future__ import annotations

import torch

from .._dispatch import use_triton
from ._norm import check_norm_inputs, norm_backward, norm_forward


class LayerNormFunction(torch.autograd.Function):
    """Triton LayerNorm over the last dimension of a contiguous ``(N, H)`` input; see :func:`layer_norm`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y, mean, rstd = norm_forward(x, weight, bias, eps=eps, offset=0.0, out_dtype=out_dtype, centred=True)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = norm_backward(
            dy, x, weight, mean, rstd, offset=0.0, compute_dw=ctx.needs_input_grad[1],
            compute_db=ctx.bias_dtype is not None and ctx.needs_input_grad[2],
        )
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(ctx.bias_dtype)
        return (dx if ctx.needs_input_grad[0] else None), dw, db, None


def layer_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, eps: float = 1e-5
) -> torch.Tensor:
    """Plain-PyTorch LayerNorm with the contract of :func:`layer_norm` (autograd gives the gradients)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    y = torch.nn.functional.layer_norm(
        x.to(compute), (x.shape[-1],), weight.to(compute), None if bias is None else bias.to(compute), eps
    )
    return y.to(torch.promote_types(x.dtype, weight.dtype))


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, eps: float = 1e-5,
    impl: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension: ``y = weight * (x - mean) / sqrt(var + eps) + bias``.

    Args:
        x: ``(..., H)`` floating point (fp32, bf16, fp16, fp64); any leading shape.
        weight: ``(H,)`` floating point, on ``x``'s device.
        bias: ``(H,)`` or ``None`` (no shift).
        eps: added to the (biased) variance; ``nn.LayerNorm``'s ``eps`` (Qwen2-VL's vision tower: 1e-6).
        impl: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).

    Returns:
        ``(..., H)`` in ``promote_types(x.dtype, weight.dtype)`` (bf16 for a bf16 model; fp32 for fp32
        weights, as ``nn.LayerNorm`` gives under autocast). The math runs in fp32; the result is rounded once.
    """
    check_norm_inputs(x, eps, weight=weight, bias=bias)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not use_triton(*tensors, impl=impl) or x.numel() == 0:
        return layer_norm_torch(x, weight, bias, eps=eps)
    shape = x.shape
    y = LayerNormFunction.apply(
        x.reshape(-1, shape[-1]).contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        float(eps),
    )
    return y.view(shape)
