"""The row-normalisation kernels RMSNorm and LayerNorm share, written once.

Both normalise each row of a contiguous ``(N, H)`` input over ``H`` with a whole row per block, keep
fp32 per-row statistics for the backward (``rstd``, and the ``mean`` when centred), and reduce the
parameter gradients per persistent backward program in fp32 before one small sum. One forward and one
backward Triton kernel serve both: ``CENTRED`` (LayerNorm) subtracts the row mean and may add a bias;
``offset`` is added to the weight (Gemma's ``1 + weight``; 0 otherwise). With ``xhat`` the normalised
row and ``g = (offset + weight) * dy``::

    dx = rstd * (g - mean_j(g_j) - xhat * mean_j(g_j * xhat_j))     (no mean_j(g_j) term for RMSNorm)
    dweight = sum_rows dy * xhat,   dbias = sum_rows dy

Here too: the block shape, the number of backward programs, the fp32 partial-gradient buffers and the
input checks. All arithmetic is fp32 whatever the storage dtype.
"""

from __future__ import annotations

import torch

from .._dispatch import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, x_stride, y_stride, n_rows, n_cols, eps, offset,
        CENTRED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = tl.arange(0, BLOCK_COLS)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if CENTRED:
            mean = tl.sum(x, axis=1) / n_cols
            x = tl.where(mask, x - mean[:, None], 0.0)
            tl.store(mean_ptr + rows, mean, mask=row_ok)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        y = x * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _norm_bwd_kernel(
        dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
        dy_stride, x_stride, dx_stride, n_rows, n_cols, rows_per_program, offset,
        CENTRED: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr, COMPUTE_DW: tl.constexpr,
        COMPUTE_DB: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_COLS)
        col_ok = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
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
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            if CENTRED:
                mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
                x = tl.where(mask, x - mean[:, None], 0.0)
            xhat = x * rstd[:, None]
            g = dy * w[None, :]
            mean_gx = tl.sum(g * xhat, axis=1) / n_cols
            if CENTRED:
                g = g - (tl.sum(g, axis=1) / n_cols)[:, None]
            dx = (g - xhat * mean_gx[:, None]) * rstd[:, None]
            tl.store(dx_ptr + rows[:, None] * dx_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy
        if COMPUTE_DW:
            tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if COMPUTE_DB:
            tl.store(db_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_ok)

#: The widest row one block holds (``H`` above it is refused before any kernel runs).
MAX_BLOCK_COLS = 65536


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def launch_shape(n_cols: int) -> tuple[int, int, int]:
    """``(BLOCK_COLS, BLOCK_ROWS, num_warps)``: a whole row per block, about 4096 elements per program."""
    block_cols = _next_power_of_2(n_cols)
    block_rows = max(1, 4096 // block_cols)
    elements = block_cols * block_rows
    num_warps = 4 if elements <= 4096 else 8 if elements <= 8192 else 16
    return block_cols, block_rows, num_warps


def backward_programs(device: torch.device, n_rows: int) -> int:
    """Number of persistent backward programs: a few per SM on CUDA, a handful under the interpreter."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))


def partial_grad(wanted: bool, programs: int, n_cols: int, like: torch.Tensor) -> torch.Tensor:
    """An fp32 ``(programs, H)`` buffer for per-program parameter gradients, or ``like`` (a placeholder
    pointer the kernel never writes) when that gradient is not wanted."""
    return torch.empty((programs, n_cols), device=like.device, dtype=torch.float32) if wanted else like


def norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, eps: float, offset: float,
    out_dtype: torch.dtype, centred: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(y (N, H) in out_dtype, mean (N,) fp32 or None, rstd (N,) fp32)`` of contiguous ``x (N, H)``."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=out_dtype)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    mean = torch.empty(n_rows, device=x.device, dtype=torch.float32) if centred else None
    block_cols, block_rows, num_warps = launch_shape(n_cols)
    _norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, weight, weight if bias is None else bias, y, rstd if mean is None else mean, rstd, x.stride(0),
        y.stride(0), n_rows, n_cols, float(eps), float(offset), CENTRED=centred, HAS_BIAS=bias is not None,
        BLOCK_COLS=block_cols, BLOCK_ROWS=block_rows, num_warps=num_warps,
    )
    return y, mean, rstd


def norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor, *,
    offset: float, compute_dw: bool, compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dweight fp32 or None, dbias fp32 or None)`` for the statistics :func:`norm_forward` kept."""
    n_rows, n_cols = x.shape
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    programs = backward_programs(x.device, n_rows)
    dw_partial = partial_grad(compute_dw, programs, n_cols, rstd)
    db_partial = partial_grad(compute_db, programs, n_cols, rstd)
    block_cols, block_rows, num_warps = launch_shape(n_cols)
    _norm_bwd_kernel[(programs,)](
        dy, x, weight, rstd if mean is None else mean, rstd, dx, dw_partial, db_partial,
        dy.stride(0), x.stride(0), dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, programs), float(offset),
        CENTRED=mean is not None, BLOCK_COLS=block_cols, BLOCK_ROWS=block_rows, COMPUTE_DW=compute_dw,
        COMPUTE_DB=compute_db, num_warps=num_warps,
    )
    return dx, (dw_partial.sum(0) if compute_dw else None), (db_partial.sum(0) if compute_db else None)


def check_norm_inputs(x: object, eps: object, **params: object) -> None:
    """``TypeError``/``ValueError`` naming the argument unless ``x`` is a floating-point ``(..., H)`` tensor
    (``0 < H <= MAX_BLOCK_COLS``), each of ``params`` (``None`` allowed) a floating-point ``(H,)`` tensor on
    ``x``'s device, and ``eps`` a number ``>= 0``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (..., H), got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., H) with H > 0, got {tuple(x.shape)}")
    for name, t in params.items():
        if t is None and name != "weight":
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (H,), got {type(t).__name__}"
                            f"{'' if not isinstance(t, torch.Tensor) else ' of dtype ' + str(t.dtype)}")
        if t.shape != (x.shape[-1],):
            raise ValueError(f"{name} must have shape (H,) = ({x.shape[-1]},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if x.shape[-1] > MAX_BLOCK_COLS:
        raise ValueError(f"x's last dimension H must be <= {MAX_BLOCK_COLS}, got {x.shape[-1]}")
