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
arithmetic is fp32 whatever the storage dtype. The plain-PyTorch path computes the same formula (in
fp32, or fp64 for fp64 inputs) with autograd.
"""

from __future__ import annotations

import torch

from ._dispatch import triton_available, use_triton
from ._norm import backward_programs, check_norm_inputs, launch_shape, partial_grad

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _layer_norm_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, x_stride, y_stride, n_rows, n_cols, eps,
        HAS_BIAS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_COLS)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _layer_norm_bwd_kernel(
        dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
        dy_stride, x_stride, dx_stride, n_rows, n_cols, rows_per_program,
        BLOCK_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_COLS)
        col_ok = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        last = tl.minimum(first + rows_per_program, n_rows)
        for start in range(first, last, BLOCK_ROWS):
            rows = start + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < last
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * w[None, :]
            mean_g = tl.sum(g, axis=1) / n_cols
            mean_gx = tl.sum(g * xhat, axis=1) / n_cols
            dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
            tl.store(dx_ptr + rows[:, None] * dx_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy
        if COMPUTE_DW:
            tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if COMPUTE_DB:
            tl.store(db_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_ok)


class LayerNormFunction(torch.autograd.Function):
    """Triton LayerNorm over the last dimension of a contiguous ``(N, H)`` input; see :func:`layer_norm`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        n_rows, n_cols = x.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), device=x.device, dtype=out_dtype)
        mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block_cols, block_rows, num_warps = launch_shape(n_cols)
        _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
            x, weight, weight if bias is None else bias, y, mean, rstd, x.stride(0), y.stride(0), n_rows, n_cols,
            float(eps), HAS_BIAS=bias is not None, BLOCK_COLS=block_cols, BLOCK_ROWS=block_rows, num_warps=num_warps,
        )
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        compute_dw = ctx.needs_input_grad[1]
        compute_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        programs = backward_programs(x.device, n_rows)
        dw_partial = partial_grad(compute_dw, programs, n_cols, rstd)
        db_partial = partial_grad(compute_db, programs, n_cols, rstd)
        block_cols, block_rows, num_warps = launch_shape(n_cols)
        _layer_norm_bwd_kernel[(programs,)](
            dy, x, weight, mean, rstd, dx, dw_partial, db_partial,
            dy.stride(0), x.stride(0), dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, programs),
            BLOCK_COLS=block_cols, BLOCK_ROWS=block_rows, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            num_warps=num_warps,
        )
        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        db = db_partial.sum(0).to(ctx.bias_dtype) if compute_db else None
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
