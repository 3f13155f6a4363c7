"""The scaffolding the gated-activation kernels share (SwiGLU, GeGLU): ``c = act(a) * b``.

Each op supplies two element-wise Triton kernels (forward ``(a, b) -> c``, backward
``(dc, a, b) -> (da, db)``, both fp32 inside, with extra ``tl.constexpr`` constants) and a plain-torch
twin; the launch, the autograd Function, the input checks and the dispatch are written once here.
Only ``a`` and ``b`` are kept for the backward, which recomputes the activation from ``a``; with
``inplace_backward`` it writes ``da``/``db`` over ``a``/``b``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._dispatch import use_triton

_BLOCK = 2048
_NUM_WARPS = 8


@dataclass(frozen=True)
class GateKernels:
    """The Triton kernels of one gated activation and each one's ``tl.constexpr`` constants (besides ``BLOCK``)."""

    forward: Any
    backward: Any
    forward_constants: tuple[tuple[str, float], ...] = ()
    backward_constants: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GateOptions:
    """The non-tensor argument of :class:`GatedActivationFunction`: which kernels, and whether the backward
    may overwrite ``a`` and ``b``."""

    kernels: GateKernels
    inplace_backward: bool = False


def _grid(n: int) -> tuple[int]:
    return ((n + _BLOCK - 1) // _BLOCK,)


class GatedActivationFunction(torch.autograd.Function):
    """Triton ``act(a) * b`` for contiguous ``a``, ``b`` of one shape and dtype (the kernels in ``opts``).

    Each op subclasses it under its own name (so a launch can be counted per op).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, opts: GateOptions) -> torch.Tensor:
        c = torch.empty_like(a)
        kernels = opts.kernels
        kernels.forward[_grid(a.numel())](
            a, b, c, a.numel(), **dict(kernels.forward_constants), BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
        ctx.save_for_backward(a, b)
        ctx.opts = opts
        return c

    @staticmethod
    def backward(ctx, dc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        opts: GateOptions = ctx.opts
        da, db = (a, b) if opts.inplace_backward else (torch.empty_like(a), torch.empty_like(b))
        kernels = opts.kernels
        kernels.backward[_grid(a.numel())](
            dc, a, b, da, db, a.numel(), **dict(kernels.backward_constants), BLOCK=_BLOCK, num_warps=_NUM_WARPS
        )
        return da, db, None


def gate_torch(act: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ``act(a) * b`` in fp32 (fp64 for fp64), rounded once to ``a``'s dtype."""
    compute = torch.promote_types(a.dtype, torch.float32)
    return (act(a.to(compute)) * b.to(compute)).to(a.dtype)


def check_gate_inputs(a: object, b: object) -> None:
    """``TypeError``/``ValueError`` unless ``a`` and ``b`` are floating-point tensors of one shape, dtype, device."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}"
                            f"{' of dtype ' + str(t.dtype) if isinstance(t, torch.Tensor) else ''}")
    if a.shape != b.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"b must have a's dtype {a.dtype}, got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"b must be on a's device {a.device}, got {b.device}")


def gated_activation(
    a: torch.Tensor, b: torch.Tensor, *, function: type[GatedActivationFunction], kernels: GateKernels | None,
    torch_path: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inplace_backward: bool, impl: str | None,
) -> torch.Tensor:
    """Check the inputs, then run ``function`` with ``kernels`` (the Triton path) or ``torch_path``."""
    check_gate_inputs(a, b)
    if a.numel() == 0 or not use_triton(a, b, impl=impl):
        return torch_path(a, b)
    opts = GateOptions(kernels, bool(inplace_backward))
    return function.apply(a.contiguous(), b.contiguous(), opts)
