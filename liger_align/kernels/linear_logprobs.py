"""Fused linear -> per-token target log-probability, without materialising the ``(N, V)`` logits.

The shared base of every loss in liger-align. Forward: for each chunk of valid tokens, one product
``h @ W.T`` into a reused ``(C, V)`` buffer and one row pass for the log-sum-exp; only the log-sum-exp
``(M,)`` is kept. Backward recomputes each chunk's logits (4 products in all: logits twice, then
grad-hidden and grad-weight), turns them into the logits' gradient in place, and accumulates
grad-weight in fp32. Masked tokens are dropped before any product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._dispatch import use_triton
from ._linear_chunks import (
    LinearGrads, check_linear_inputs, chunk_rows, compute_dtype, project, valid_token_index,
)
from ._row_softmax import row_grad_, row_stats


@dataclass(frozen=True)
class LogitOptions:
    """How logits are formed and chunked. ``z = (softcap * tanh(logit_scale * raw / softcap)) / temperature``."""

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0
    chunk_bytes: int | None = None
    impl: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature!r}")
        if self.softcap is not None and not (self.softcap > 0 and math.isfinite(self.softcap)):
            raise ValueError(f"softcap must be a positive finite number or None, got {self.softcap!r}")
        if not math.isfinite(self.logit_scale) or self.logit_scale == 0:
            raise ValueError(f"logit_scale must be a finite non-zero number, got {self.logit_scale!r}")

    def row_kwargs(self, triton_path: bool) -> dict:
        return dict(logit_scale=self.logit_scale, softcap=self.softcap, temperature=self.temperature, triton_path=triton_path)


class LinearLogProbs(NamedTuple):
    """Outputs of :func:`linear_logprobs`, each ``(N,)`` fp32 and 0 where the target is ignored.

    ``logps``: log-probability of the target token (differentiable).
    ``logit_mean``: mean over the vocabulary of the (transformed) logits (no gradient), for metrics.
    """

    logps: torch.Tensor
    logit_mean: torch.Tensor


class LinearTokenObjectiveFunction(torch.autograd.Function):
    """Per-token ``alpha * log p[target] + beta * mean_v log p``, shape ``(N,)``, and the logit mean ``(N,)``.

    ``alpha=1, beta=0`` is the target log-prob; ``alpha=-(1-eps), beta=-eps`` is the label-smoothed
    cross-entropy. Backward recomputes the logits chunk by chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, opts: LogitOptions, alpha: float, beta: float):
        triton_path = use_triton(hidden, weight, impl=opts.impl)
        dtype = compute_dtype(hidden, weight)
        rows_all = valid_token_index(target, opts.ignore_index, weight.shape[0])
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        vocab = weight.shape[0]
        value = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        logit_mean = torch.zeros_like(value)
        lse_all = torch.empty(rows_all.shape[0], device=hidden.device, dtype=torch.float32)
        per_chunk = chunk_rows(rows_all.shape[0], vocab, dtype, opts.chunk_bytes)
        buffer = torch.empty((per_chunk, vocab), device=hidden.device, dtype=dtype) if rows_all.numel() else None
        for start in range(0, rows_all.shape[0], per_chunk):
            rows = rows_all[start : start + per_chunk]
            logits = project(hidden.index_select(0, rows).to(dtype), w, b, buffer[: rows.shape[0]])
            lse, z_target, z_sum = row_stats(logits, target.index_select(0, rows), **opts.row_kwargs(triton_path))
            lse_all[start : start + rows.shape[0]] = lse
            z_mean = z_sum / vocab
            value.index_copy_(0, rows, alpha * (z_target - lse) + beta * (z_mean - lse))
            logit_mean.index_copy_(0, rows, z_mean)
        ctx.save_for_backward(hidden, weight, bias, target, rows_all, lse_all)
        ctx.opts, ctx.alpha, ctx.beta, ctx.dtype, ctx.triton_path = opts, alpha, beta, dtype, triton_path
        ctx.mark_non_differentiable(logit_mean)
        return value, logit_mean

    @staticmethod
    def backward(ctx, grad_value, _grad_logit_mean):
        hidden, weight, bias, target, rows_all, lse_all = ctx.saved_tensors
        grads = LinearGrads.allocate(hidden, weight, bias, ctx.needs_input_grad[:3])
        if grad_value is not None and rows_all.numel():
            opts, dtype = ctx.opts, ctx.dtype
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            upstream = grad_value.float().index_select(0, rows_all)
            per_chunk = chunk_rows(rows_all.shape[0], weight.shape[0], dtype, opts.chunk_bytes)
            buffer = torch.empty((per_chunk, weight.shape[0]), device=hidden.device, dtype=dtype)
            for start in range(0, rows_all.shape[0], per_chunk):
                rows = rows_all[start : start + per_chunk]
                stop = start + rows.shape[0]
                h_chunk = hidden.index_select(0, rows).to(dtype)
                logits = project(h_chunk, w, b, buffer[: rows.shape[0]])
                g = upstream[start:stop]
                row_grad_(
                    logits, target.index_select(0, rows), lse_all[start:stop], ctx.alpha * g, ctx.beta * g,
                    **opts.row_kwargs(ctx.triton_path),
                )
                grads.add_chunk(logits, h_chunk, rows, w)
        grad_hidden, grad_weight, grad_bias = grads.as_inputs(weight, bias)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def linear_token_objective(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None, *,
    alpha: float, beta: float, opts: LogitOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked entry to :class:`LinearTokenObjectiveFunction`; returns ``(value (N,), logit_mean (N,))``."""
    check_linear_inputs(hidden, weight, target, bias)
    return LinearTokenObjectiveFunction.apply(hidden, weight, bias, target.long(), opts, float(alpha), float(beta))


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_bytes: int | None = None,
    impl: str | None = None,
) -> LinearLogProbs:
    """Per-token ``log softmax(transform(hidden @ weight.T + bias))[target]`` without the ``(N, V)`` logits.

    Args:
        hidden: ``(N, H)`` fp32, bf16 or fp16, any strides.
        weight: ``(V, H)``, same dtype as ``hidden`` (or any, under autocast).
        target: ``(N,)`` integer; values in ``[0, V)`` or ``ignore_index``.
        bias: ``(V,)`` or None.
        ignore_index: targets with this value are dropped before any product; their outputs are 0.
        temperature, softcap, logit_scale: ``z = softcap * tanh(logit_scale * raw / softcap) / temperature``
            (no tanh when ``softcap`` is None).
        chunk_bytes: memory budget of one chunk's ``(C, V)`` logits (default 256 MiB).
        impl: ``"triton"`` or ``"torch"`` to force a path; by default Triton on CUDA tensors.

    Returns:
        :class:`LinearLogProbs` of ``(N,)`` fp32 tensors: ``logps`` (differentiable with respect to
        hidden, weight and bias) and ``logit_mean`` (no gradient).
    """
    opts = LogitOptions(ignore_index, temperature, softcap, logit_scale, chunk_bytes, impl)
    logps, logit_mean = linear_token_objective(hidden, weight, target, bias, alpha=1.0, beta=0.0, opts=opts)
    return LinearLogProbs(logps, logit_mean)
