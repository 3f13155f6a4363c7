"""The 3-product ops' stored gradients: kept from the forward, scaled in place by the upstream 0-d gradient.

The 3-product ops form their gradients in the forward pass and multiply them by the loss's upstream
gradient in the backward. ``t.mul_(g)`` with a 0-d CUDA tensor ``g`` broadcasts a stride-0 operand,
which keeps PyTorch off its vectorised kernel (measured on an H200: 0.68 ms for a bf16 ``(128256, 2048)``
grad-weight, 2.7x the copy bound); the Triton kernel here loads ``g`` once per program and streams ``t``.
"""

from __future__ import annotations

import torch

from .._dispatch import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _scale_kernel(x_ptr, s_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        s = tl.load(s_ptr).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(x_ptr + offsets, (x * s).to(x_ptr.dtype.element_ty), mask=inside)


_BLOCK = 8192


def scale_(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t *= scale`` in place (``scale`` 0-d, any float dtype; the product in fp32, rounded once); returns ``t``."""
    if t.is_cuda and scale.is_cuda and t.is_contiguous() and triton_available() and t.numel():
        _scale_kernel[(triton.cdiv(t.numel(), _BLOCK),)](t, scale.reshape(()), t.numel(), BLOCK=_BLOCK)
        return t
    return t.mul_(scale.to(t.dtype))


def save_gradients(ctx, grads: tuple[torch.Tensor | None, ...]) -> None:
    """Keep the gradients a 3-product forward formed (None where not wanted) for :func:`scaled_gradients`."""
    ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
    ctx.has_grad = tuple(g is not None for g in grads)


def scaled_gradients(ctx, grad_loss: torch.Tensor | None, op: str) -> list[torch.Tensor | None]:
    """The saved gradients scaled in place by the upstream 0-d ``grad_loss``: once per forward.

    Scaling in place keeps no second copy of grad-weight, so a second backward (``retain_graph=True``)
    would be silently wrong: it raises, naming ``op`` and the strategy that allows it.
    """
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            f"{op} with strategy='grad_in_forward' supports one backward per forward; "
            "use strategy='recompute' to backpropagate through the same loss more than once"
        )
    ctx.consumed = True
    if grad_loss is None:
        return [None] * len(ctx.has_grad)
    return [scale_(g, grad_loss) if has else None for g, has in zip(ctx.saved_tensors, ctx.has_grad)]
