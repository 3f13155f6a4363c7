"""Which gradient path a fused output-head op takes: one strategy list, one memory model, one choice.

- ``"grad_in_forward"``: every token's gradient is formed in the forward pass, 3 products (logits,
  grad-hidden, grad-weight); it needs an objective separable over chunks (whole groups of rows: a pair,
  a KTO row; single tokens for the cross-entropy) and, during the forward, a ``(C, V)`` logits chunk and
  the grad-weight accumulator's helper buffer.
- ``"recompute"``: the logits are recomputed in the backward, 4 products, an ``(M, Vc)`` logits slice.

:func:`choose_strategy` takes the 3-product path with ``"auto"`` when it is possible, a gradient is
wanted, and its extra memory (:func:`grad_in_forward_extra_bytes`, read from shapes: no host sync) is
within ``max_extra_bytes`` and :data:`FREE_MEMORY_FRACTION` of the device memory free now (CUDA), so a
job that fits with the recomputing path keeps fitting.
"""

from __future__ import annotations

import torch

from ..._checks import check_choice, check_int
from ._linear_chunks import chunk_rows
from .grad_weight_sum import GradWeightSum

STRATEGIES = ("auto", "grad_in_forward", "recompute")
#: With ``strategy="auto"``, the 3-product path may use at most this fraction of the free device memory.
FREE_MEMORY_FRACTION = 0.5


def grad_in_forward_extra_bytes(
    tokens: int, weight: torch.Tensor, dtype: torch.dtype, *, group_tokens: int = 1, chunk_bytes: int | None = None,
    weight_grad: bool = True,
) -> int:
    """Upper bound of the memory the 3-product path needs beyond the recomputing one, in bytes.

    ``tokens`` of the call (``N``), computed in ``dtype``; ``group_tokens``: the largest group a chunk must
    hold whole. Its logits chunk (``max(chunk rows, group_tokens)`` tokens, at most ``N``) and, when the
    weight gets a gradient, the grad-weight accumulator's helper buffer; grad-hidden and grad-weight exist
    on both paths.
    """
    vocab, width = weight.shape
    element = torch.empty((), dtype=dtype).element_size()
    chunk = max(chunk_rows(max(tokens, 1), vocab, dtype, chunk_bytes), group_tokens)
    logits = min(chunk, tokens) * vocab * element
    accumulator = GradWeightSum.extra_bytes(vocab, width, weight.dtype, n_chunks=2) if weight_grad else 0
    return logits + accumulator


def free_device_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` (driver-free plus cached-unused), or None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def choose_strategy(
    strategy: str, *, separable: bool, wanted: bool, extra_bytes: int, device: torch.device,
    max_extra_bytes: int | None = None, not_separable: str = "this objective is not separable over chunks",
) -> str:
    """``"grad_in_forward"`` or ``"recompute"`` (module docstring).

    ``strategy`` forces a path; ``"grad_in_forward"`` on a non-separable objective raises ``ValueError``
    with ``not_separable`` (the caller's reason). ``wanted``: whether autograd can ask for a gradient.
    """
    check_choice("strategy", strategy, STRATEGIES)
    if max_extra_bytes is not None:
        max_extra_bytes = check_int("max_extra_bytes", max_extra_bytes, low=0)
    if strategy == "grad_in_forward" and not separable:
        raise ValueError(f"strategy='grad_in_forward': {not_separable}")
    if strategy != "auto":
        return strategy
    if not (separable and wanted):
        return "recompute"
    if max_extra_bytes is not None and extra_bytes > max_extra_bytes:
        return "recompute"
    free = free_device_bytes(device)
    if free is not None and extra_bytes > FREE_MEMORY_FRACTION * free:
        return "recompute"
    return "grad_in_forward"
