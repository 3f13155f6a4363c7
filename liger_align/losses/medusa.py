"""Medusa's multi-head objective on the fused cross-entropy: no ``(K+1, B, T, V)`` logits.

Medusa (Cai et al., 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
Heads") puts K heads on the last hidden state ``h (B, T, H)``; head k predicts the token at ``t+k+1``
(head 0, the model's own head, predicts ``t+1``). With labels ``y (B, T)`` (``ignore_index`` where no
loss), head k's loss is the mean cross-entropy of its output on ``h[:, : T-1-k]`` against
``y[:, 1+k:]``, and the objective is

    L = sum_{k=0..K} lambda_k * L_k,    lambda_0 for the model's head,
    lambda_k = heads_coefficient * decay_coefficient**k * schedule(progress)   (k >= 1),

with Medusa-2's schedules of ``progress = step / max_steps``: ``"constant"`` 1, ``"linear"``
``progress``, ``"sine"`` ``sin(progress * pi / 2)``, and ``"sine_<r>"`` (``sin(progress / r * pi / 2)``
until ``progress = r``, then 1).

How it runs (see :func:`fused_linear_medusa_loss`): one host read gives every head's valid-target
count; per head with ``lambda_k != 0`` the rows whose target is valid are gathered (masked tokens
never reach a product), the head's own module runs its ResBlocks on them (ordinary autograd) and
calls the fused cross-entropy inside its output projection's call (so FSDP/ZeRO-3 gather that weight),
with the top-1 read from the same row pass. A head of weight 0 is not run at all; a frozen weight gets
no grad-weight work. Only per-head ``(M_k, H)`` tensors in the compute dtype stay alive until backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .._tokens import IGNORE_INDEX
from ..kernels import DEFAULT_CHUNK_BYTES, STRATEGIES, fused_linear_cross_entropy
from ..kernels.head.grad_weight_sum import GradWeightSum
from ._medusa_weights import SCHEDULERS, check_scheduler, medusa_loss_weights, medusa_schedule

__all__ = [
    "SCHEDULERS", "HeadFn", "HeadRunner", "LigerFusedLinearMedusaLoss", "MedusaLossOutput", "check_scheduler",
    "fused_linear_medusa_loss", "medusa_loss_weights", "medusa_schedule", "tensor_head",
]

#: ``fn(x (M, H), weight (V, H), bias (V,) | None) -> (loss, is_top1)``: what a head runs on its output.
HeadFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], Any]
#: ``run(rows (M, H), fn) -> fn(transformed rows, weight, bias)``: a head applies its own layers to the rows
#: (Medusa's ResBlocks; none for the model's head) and calls ``fn`` with its output weight, inside its own
#: module call (see :func:`liger_align.models.head_call.call_through_head`).
HeadRunner = Callable[[torch.Tensor, HeadFn], Any]


class MedusaLossOutput(NamedTuple):
    """What :func:`fused_linear_medusa_loss` returns; every per-head tensor is ``(K+1,)``, index 0 = model head.

    ``loss``: 0-d fp32, differentiable. Detached: ``head_losses`` (fp32, each head's mean CE; 0 where
    not computed), ``head_top1`` (fp32, fraction of the head's valid targets that are its argmax; 0 where
    none), ``head_correct`` and ``head_counts`` (int64: argmax hits and valid targets, for aggregating
    over steps and ranks), ``computed`` (bool: the head ran, i.e. its weight was not 0).
    """

    loss: torch.Tensor
    head_losses: torch.Tensor
    head_top1: torch.Tensor
    head_correct: torch.Tensor
    head_counts: torch.Tensor
    computed: torch.Tensor


def _check_inputs(hidden, labels, heads, weights, num_items_in_batch, strategy) -> torch.Tensor | None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float tensor (B, T, H), got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (B, T), got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must have shape (B, T) = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    n_heads = len(heads)
    if n_heads < 2:
        raise ValueError(f"heads must hold the model's head and at least one Medusa head (K >= 1), got {n_heads}")
    if len(weights) != n_heads:
        raise ValueError(f"weights must have one value per head (K + 1 = {n_heads}), got {len(weights)}")
    for k, w in enumerate(weights):
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"weights[{k}] must be a finite number >= 0, got {w!r}")
    length, k_max = hidden.shape[1], n_heads - 1
    if length < k_max + 1:
        raise ValueError(
            f"labels: sequences of length T={length} are shorter than K + 1 = {k_max + 1} (head k needs T > k)"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if num_items_in_batch is None:
        return None
    items = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    if items.dim() == 0:
        return items.expand(n_heads)
    if items.shape != (n_heads,):
        raise ValueError(
            f"num_items_in_batch must be a scalar or hold one count per head ({n_heads},), got {tuple(items.shape)}"
        )
    return items


def _single_chunk_bytes(rows: int, weight: torch.Tensor, compute: torch.dtype, needs_grad: bool) -> int | None:
    """The logits budget that fits all ``rows`` in one chunk, when that needs less memory than chunking.

    Chunked, grad-weight is summed over token chunks by :class:`GradWeightSum` (its extra buffer, e.g.
    the bf16 residual of the compensated sum); in one chunk it is a single product, rounded once (plus an
    fp32 temporary when the weight's dtype differs from the compute dtype). The single chunk is also the
    faster one.
    """
    vocab, hidden_size = weight.shape
    elt = torch.empty((), dtype=compute).element_size()
    single = rows * vocab * elt
    if not needs_grad or single <= DEFAULT_CHUNK_BYTES:
        return None
    chunked_extra = DEFAULT_CHUNK_BYTES + GradWeightSum.extra_bytes(vocab, hidden_size, weight.dtype, n_chunks=2)
    single_extra = single + (0 if weight.dtype == compute else vocab * hidden_size * 4)
    return single if single_extra <= chunked_extra else None


def fused_linear_medusa_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    heads: Sequence[HeadRunner],
    weights: Sequence[float],
    *,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: int | torch.Tensor | Sequence[int] | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_bytes: int | None = None,
    strategy: str = "auto",
    impl: str | None = None,
    materialize_logits: bool = False,
) -> MedusaLossOutput:
    """Medusa's weighted multi-head cross-entropy (module docstring) without materialising any logits.

    Args:
        hidden: ``(B, T, H)`` last hidden states (any float dtype; under autocast the gathered rows are
            cast to the autocast dtype first, so what is kept for backward is in that dtype).
        labels: ``(B, T)`` integer, *not* shifted; ``ignore_index`` where no loss.
        heads: ``K + 1`` :data:`HeadRunner` s: the model's head, then Medusa heads 1..K.
        weights: ``K + 1`` numbers >= 0 (:func:`medusa_loss_weights`); a head of weight 0 is not run.
        num_items_in_batch: denominator of each head's loss (Hugging Face's convention for exact gradient
            accumulation): a scalar for every head or a ``(K+1,)`` sequence of per-head counts; default:
            each head's own valid-target count in this batch.
        softcap, logit_scale: the model's logit transform, applied to head 0 only (Medusa heads are linear).
        chunk_bytes, strategy, impl: as in :func:`~liger_align.kernels.head.fused_linear_cross_entropy`;
            ``chunk_bytes=None`` puts a head's valid rows in one chunk when that needs less memory than
            token chunks with :class:`GradWeightSum`'s buffer (:func:`_single_chunk_bytes`).
        materialize_logits: compute every head's loss from its ``(M_k, V)`` logits and an fp32
            log-softmax instead (Medusa's own way: the same model and loss, for comparison).

    Returns:
        :class:`MedusaLossOutput`. A head whose targets are all ignored contributes 0 (its module is still
        called, on one ignored row, so every rank of a sharded model runs the same collectives); with every
        weight 0 the loss is a zero that requires grad.
    """
    items = _check_inputs(hidden, labels, heads, weights, num_items_in_batch, strategy)
    n_heads = len(heads)
    batch, length, size = hidden.shape
    device = hidden.device
    valid = labels != ignore_index
    counts = torch.stack([valid[:, 1 + k:].sum() for k in range(n_heads)])
    active = [k for k in range(n_heads) if weights[k] != 0]
    host_counts = counts.tolist() if active else [0] * n_heads  # the one host read of this loss
    flat_hidden = hidden.reshape(batch * length, size)
    positions = torch.arange(batch * length, device=device).view(batch, length)
    autocast = torch.is_autocast_enabled(device.type)
    compute = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
    grad_on = torch.is_grad_enabled()

    zero = torch.zeros((), device=device, dtype=torch.float32)
    total = zero
    losses, correct = [zero] * n_heads, [torch.zeros((), device=device, dtype=torch.int64)] * n_heads
    for k in active:
        span = length - 1 - k
        if host_counts[k]:
            picked = torch.nonzero_static(valid[:, 1 + k:].reshape(-1), size=host_counts[k]).squeeze(1)
            rows = positions[:, :span].reshape(-1).index_select(0, picked)
            target = labels[:, 1 + k:].reshape(-1).index_select(0, picked)
        else:  # one ignored row: the head still runs (same collectives on every rank), contributes 0
            rows = positions.new_zeros(1)
            target = labels.new_full((1,), ignore_index)
        rows_hidden = flat_hidden.index_select(0, rows)
        if rows_hidden.dtype != compute:
            rows_hidden = rows_hidden.to(compute)
        logit_kwargs = {"softcap": softcap, "logit_scale": logit_scale} if k == 0 else {}
        denominator = None if items is None else items[k]

        if materialize_logits:
            head_fn = functools.partial(_logits_head_loss, target=target, denominator=denominator,
                                        ignore_index=ignore_index, **logit_kwargs)
            loss_k, is_top1 = heads[k](rows_hidden, head_fn)
            total, losses[k], correct[k] = total + weights[k] * loss_k.to(device), loss_k.detach().to(device), (
                is_top1.sum().to(device))
            continue

        def head_fn(x, weight, bias, target=target, denominator=denominator, logit_kwargs=logit_kwargs):
            needs_grad = grad_on and weight.requires_grad
            if not grad_on:  # no gradient work in evaluation (the Function computes them in its forward)
                x, weight = x.detach(), weight.detach()
                bias = None if bias is None else bias.detach()
            budget = chunk_bytes if chunk_bytes is not None else _single_chunk_bytes(
                x.shape[0], weight, compute, needs_grad
            )
            return fused_linear_cross_entropy(
                x, weight, target.to(weight.device), bias, ignore_index=ignore_index, reduction="mean",
                num_items_in_batch=denominator, chunk_bytes=budget, strategy=strategy, impl=impl,
                return_top1=True, **logit_kwargs,
            )

        loss_k, is_top1 = heads[k](rows_hidden, head_fn)
        loss_k = loss_k.to(device)
        total = total + weights[k] * loss_k
        losses[k] = loss_k.detach()
        correct[k] = is_top1.sum().to(device)
    if not active:
        total = torch.zeros((), device=device, dtype=torch.float32, requires_grad=True)
    head_losses = torch.stack(losses)
    head_correct = torch.stack(correct)
    computed = torch.tensor([w != 0 for w in weights], device=device)
    head_top1 = head_correct.float() / counts.clamp(min=1).float()
    return MedusaLossOutput(total, head_losses, head_top1, head_correct, counts, computed)


def _logits_head_loss(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, target: torch.Tensor,
    denominator: torch.Tensor | None, ignore_index: int, softcap: float | None = None, logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean CE, is_top1)`` of one head from its materialised logits ``(M, V)`` (fp32 log-softmax)."""
    logits = nn.functional.linear(x, weight, bias).float() * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    target = target.to(logits.device)
    valid = target != ignore_index
    total = nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    count = valid.sum().clamp(min=1).float() if denominator is None else denominator.to(logits.device)
    return total / count, (logits.argmax(-1) == target) & valid


def tensor_head(weight: torch.Tensor, bias: torch.Tensor | None = None,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> HeadRunner:
    """A :data:`HeadRunner` from plain tensors: ``fn(transform(rows), weight, bias)`` (for custom loops and tests).

    Use it only where ``weight`` is an ordinary tensor; a sharded model's heads must be called through their
    modules (:func:`liger_align.models.medusa.medusa_head_runners`).
    """

    def run(rows: torch.Tensor, fn: HeadFn) -> Any:
        return fn(rows if transform is None else transform(rows), weight, bias)

    return run


class LigerFusedLinearMedusaLoss(nn.Module):
    """Medusa's multi-head loss with its weighting held as settings (see :func:`fused_linear_medusa_loss`).

    ``loss_fn(hidden, labels, heads, *, progress=1.0, num_items_in_batch=None)`` with hidden ``(B, T, H)``,
    labels ``(B, T)`` unshifted and ``heads`` the ``K + 1`` head runners (model head first). Weights:
    ``model_head_weight`` for head 0 (0 in Medusa-1, where the model is frozen), ``heads_coefficient *
    decay_coefficient**k * schedule(progress)`` for head k.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        heads_coefficient: float = 1.0,
        decay_coefficient: float = 1.0,
        scheduler: str = "constant",
        model_head_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        chunk_bytes: int | None = None,
        strategy: str = "auto",
        impl: str | None = None,
    ) -> None:
        super().__init__()
        self.weighting = dict(
            heads_coefficient=heads_coefficient, decay_coefficient=decay_coefficient, scheduler=scheduler,
            model_head_weight=model_head_weight,
        )
        medusa_loss_weights(num_heads, **self.weighting)  # checks the settings now
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.num_heads = num_heads
        self.options = dict(
            ignore_index=ignore_index, softcap=softcap, logit_scale=logit_scale, chunk_bytes=chunk_bytes,
            strategy=strategy, impl=impl,
        )

    def weights(self, progress: float = 1.0) -> list[float]:
        """``[lambda_0, ..., lambda_K]`` at ``progress = step / max_steps``."""
        return medusa_loss_weights(self.num_heads, progress=progress, **self.weighting)

    def forward(
        self, hidden: torch.Tensor, labels: torch.Tensor, heads: Sequence[HeadRunner], *, progress: float = 1.0,
        num_items_in_batch: int | torch.Tensor | Sequence[int] | None = None,
    ) -> MedusaLossOutput:
        if len(heads) != self.num_heads + 1:
            raise ValueError(f"heads must hold num_heads + 1 = {self.num_heads + 1} runners, got {len(heads)}")
        return fused_linear_medusa_loss(
            hidden, labels, heads, self.weights(progress), num_items_in_batch=num_items_in_batch, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {"num_heads": self.num_heads, **self.weighting}.items())
