"""The scaffolding the row-normalisation kernels share (RMSNorm, LayerNorm).

Both normalise each row of a contiguous ``(N, H)`` input over ``H`` with a whole row per block, keep
fp32 per-row statistics for the backward, and reduce the parameter gradients per persistent backward
program in fp32 before one small sum. Written once here: the block shape, the number of backward
programs, the fp32 partial-gradient buffers and the input checks.
"""

from __future__ import annotations

import torch

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
