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
dtype. The plain-PyTorch path computes the same formula (in fp32, or fp64 for fp64 inputs) with autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import triton_available, use_triton
from ._norm import backward_programs, check_norm_inputs, launch_shape, partial_grad

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd_kernel(
        x_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, y_stride, n_rows, n_cols, eps, offset,
        BLOCK_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_COLS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        y = x * rstd[:, None] * w[None, :]
        tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _rms_norm_bwd_kernel(
        dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
        dy_stride, x_stride, dx_stride, n_rows, n_cols, rows_per_program, offset,
        BLOCK_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr, COMPUTE_DW: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_COLS)
        col_ok = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        dw_acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        last = tl.minimum(first + rows_per_program, n_rows)
        for start in range(first, last, BLOCK_ROWS):
            rows = start + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < last
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            g = dy * w[None, :]
            mean_gx = tl.sum(g * xhat, axis=1) / n_cols
            dx = (g - xhat * mean_gx[:, None]) * rstd[:, None]
            tl.store(dx_ptr + rows[:, None] * dx_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * xhat
        if COMPUTE_DW:
            tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


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
        n_rows, n_cols = x.shape
        y = torch.empty((n_rows, n_cols), device=x.device, dtype=opts.out_dtype)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block_cols, block_rows, num_warps = launch_shape(n_cols)
        grid = (triton.cdiv(n_rows, block_rows),)
        _rms_norm_fwd_kernel[grid](
            x, weight, y, rstd, x.stride(0), y.stride(0), n_rows, n_cols, opts.eps, opts.offset,
            BLOCK_COLS=block_cols, BLOCK_ROWS=block_rows, num_warps=num_warps,
        )
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = opts.offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        compute_dw = ctx.needs_input_grad[1]
        programs = backward_programs(x.device, n_rows)
        rows_per_program = triton.cdiv(n_rows, programs)
        dw_partial = partial_grad(compute_dw, programs, n_cols, rstd)
        block_cols, block_rows, num_warps = launch_shape(n_cols)
        _rms_norm_bwd_kernel[(programs,)](
            dy, x, weight, rstd, dx, dw_partial,
            dy.stride(0), x.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program, ctx.offset,
            BLOCK_COLS=block_cols, BLOCK_ROWS=block_rows, COMPUTE_DW=compute_dw, num_warps=num_warps,
        )
        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        return (dx if ctx.needs_input_grad[0] else None), dw, None


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
