"""Fused linear -> per-token target log-probability, without materialising the ``(N, V)`` logits.

The shared base of every loss in liger-align. Masked tokens are dropped before any product; the
``M`` valid tokens are processed in vocabulary slices. Forward: per slice, one product
``h @ W[slice].T`` into a reused ``(M, Vc)`` buffer and one row pass that folds an online
log-sum-exp; only the log-sum-exp ``(M,)`` is kept. Backward recomputes each slice's logits (4
products in all), turns them into the logits' gradient in place, and then: grad-weight of the slice
is complete in one product (fp32 accumulation inside the GEMM, rounded once, no ``(V, H)`` fp32
buffer); grad-hidden is summed over slices in an ``(M, H)`` fp32 buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..._checks import check_count, check_ignore_index, check_optional_positive, check_positive, check_real
from ..._tokens import IGNORE_INDEX
from .._dispatch import _IMPLS, use_triton
from ._linear_chunks import (
    addmm_fp32_,
    check_linear_inputs,
    compute_dtype,
    mm_into_,
    project,
    slice_cols,
    valid_token_index,
)
from ._row_softmax import RowPasses, RowStats

if TYPE_CHECKING:
    from ._cross_entropy_options import CrossEntropyTerms




@dataclass(frozen=True)
class LogitOptions:
    """How logits are formed and chunked. ``z = (softcap * tanh(logit_scale * raw / softcap)) / temperature``.

    The gradient path (``strategy``) is an argument of each op, not an option of the logits.
    """

    ignore_index: int = IGNORE_INDEX
    temperature: float = 1.0
    softcap: float | None = None
    logit_scale: float = 1.0
    chunk_bytes: int | None = None
    impl: str | None = None

    def __post_init__(self) -> None:
        # Checked and normalised to Python numbers (numpy scalars and 0-d tensors are accepted).
        values = dict(
            ignore_index=check_ignore_index(self.ignore_index),
            temperature=check_positive("temperature", self.temperature),
            softcap=check_optional_positive("softcap", self.softcap),
            logit_scale=check_real("logit_scale", self.logit_scale),
            chunk_bytes=None if self.chunk_bytes is None else check_count("chunk_bytes", self.chunk_bytes),
        )
        if values["logit_scale"] == 0:
            raise ValueError(f"logit_scale must be a finite non-zero number, got {self.logit_scale!r}")
        if self.impl not in _IMPLS:
            raise ValueError(f"impl must be one of {list(_IMPLS)}, got {self.impl!r}")
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def row_passes(self, triton: bool) -> RowPasses:
        """The row passes of one call with these logit options, on the Triton path or not (picked once)."""
        return RowPasses(triton, self.logit_scale, self.softcap, self.temperature)


class LinearLogProbs(NamedTuple):
    """Outputs of :func:`linear_logprobs`, each ``(N,)`` and 0 (False) where the target is ignored.

    ``logps``: fp32 log-probability of the target token (differentiable).
    ``logit_mean``: fp32 mean over the vocabulary of the (transformed) logits (no gradient), for metrics.
    With ``distribution_stats=True`` (else None), without gradient: ``entropy`` (fp32),
    ``log_sum_sq_probs`` (fp32, ``log sum_v p_v^2``) and ``is_top1`` (bool: the target is the argmax).
    """

    logps: torch.Tensor
    logit_mean: torch.Tensor
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def _vocab_slices(vocab: int, width: int):
    return [(start, min(start + width, vocab)) for start in range(0, vocab, width)]


@dataclass(frozen=True)
class TokenObjective:
    """What :class:`LinearTokenObjectiveFunction` computes, besides its tensors.

    Per valid token, ``target_weight * log p[target] + mean_weight * mean_v log p`` (``1, 0``: the
    target log-prob; ``-(1 - eps), -eps``: the label-smoothed cross-entropy), with the logits formed by
    ``opts``; ``distribution``: also the entropy, ``log sum_v p_v^2`` and top-1 (no gradient); ``terms``:
    the fused cross-entropy's class weights and z-loss, which replace the value and gradient by their own.
    """

    opts: LogitOptions
    target_weight: float = 1.0
    mean_weight: float = 0.0
    distribution: bool = False
    terms: CrossEntropyTerms | None = None


class LinearTokenObjectiveFunction(torch.autograd.Function):
    """Per-token objective of :class:`TokenObjective`, shape ``(N,)``, and metrics without gradient.

    Outputs: ``(value, logit_mean, entropy, log_sum_sq_probs, is_top1, z_loss, predicted)``, each
    ``(N,)``; entropy and log_sum_sq_probs are empty unless ``distribution`` is True, is_top1 unless it is
    or ``terms.want_top1``, z_loss unless ``terms.want_z``, predicted (int64 argmax ids, -1 where ignored)
    unless ``terms.want_argmax``. With ``terms.token_scaling`` value and z_loss are scaled by the detached
    target probability, and so is the gradient. Backward recomputes the logits slice by slice.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, spec: TokenObjective, num_items: torch.Tensor | None = None):
        opts, distribution, terms = spec.opts, spec.distribution, spec.terms
        alpha, beta = spec.target_weight, spec.mean_weight
        passes = opts.row_passes(use_triton(hidden, weight, impl=opts.impl))
        dtype = compute_dtype(hidden, weight)
        rows = valid_token_index(target, opts.ignore_index, weight.shape[0], num_items=num_items)
        vocab, n_valid = weight.shape[0], rows.shape[0]
        value = torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        logit_mean = torch.zeros_like(value)
        metric_rows = hidden.shape[0] if distribution else 0
        entropy = value.new_zeros(metric_rows)
        log_sum_sq = value.new_zeros(metric_rows)
        top1 = distribution or (terms is not None and terms.want_top1)
        is_top1 = torch.zeros(hidden.shape[0] if top1 else 0, device=hidden.device, dtype=torch.bool)
        z_loss = value.new_zeros(hidden.shape[0] if terms is not None and terms.want_z else 0)
        want_argmax = terms is not None and terms.want_argmax
        predicted = torch.full((hidden.shape[0] if want_argmax else 0,), -1, device=hidden.device, dtype=torch.int64)
        lse = torch.zeros(n_valid, device=hidden.device, dtype=torch.float32)
        scale = lse.new_zeros(0)
        if n_valid:
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            h = hidden.index_select(0, rows).to(dtype)
            valid_target = target.index_select(0, rows)
            stats = RowStats(n_valid, hidden.device, distribution=distribution, weighted=bool(
                terms is not None and terms.weighted_smoothing), argmax=want_argmax)
            fold_extra = {} if terms is None else terms.fold_kwargs()
            width = slice_cols(n_valid, vocab, dtype, opts.chunk_bytes)
            buffer = torch.empty(n_valid * width, device=hidden.device, dtype=dtype)
            for start, stop in _vocab_slices(vocab, width):
                out = buffer[: n_valid * (stop - start)].view(n_valid, stop - start)
                logits = project(h, w[start:stop], None if b is None else b[start:stop], out)
                passes.fold(stats, logits, valid_target, start, **fold_extra)
            lse = stats.lse()
            z_mean = stats.logit_sum / vocab
            if terms is None:
                value.index_copy_(0, rows, alpha * (stats.target_logit - lse) + beta * (z_mean - lse))
            else:
                token_scale = terms.token_scale(stats, lse)
                token_value = terms.value(stats, lse, valid_target, vocab)
                z_token = terms.z_scale * lse * lse if terms.want_z else None
                if token_scale is not None:
                    token_value = token_value * token_scale
                    z_token = None if z_token is None else z_token * token_scale
                value.index_copy_(0, rows, token_value)
                if z_token is not None:
                    z_loss.index_copy_(0, rows, z_token)
                if want_argmax:
                    predicted.index_copy_(0, rows, stats.argmax)
                if token_scale is not None:
                    scale = token_scale
            logit_mean.index_copy_(0, rows, z_mean)
            if distribution:
                entropy.index_copy_(0, rows, stats.entropy())
                log_sum_sq.index_copy_(0, rows, stats.log_sum_sq_probs())
            if top1:
                is_top1.index_copy_(0, rows, stats.is_top1())
        ctx.save_for_backward(hidden, weight, bias, target, rows, lse, scale)
        ctx.spec, ctx.dtype, ctx.passes = spec, dtype, passes
        ctx.mark_non_differentiable(logit_mean, entropy, log_sum_sq, is_top1, z_loss, predicted)
        return value, logit_mean, entropy, log_sum_sq, is_top1, z_loss, predicted

    @staticmethod
    def backward(ctx, grad_value, *_grad_metrics):
        hidden, weight, bias, target, rows, lse, scale = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        vocab, n_valid = weight.shape[0], rows.shape[0]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        if grad_value is None or n_valid == 0:
            return grad_hidden, grad_weight, grad_bias, None, None, None
        spec, dtype = ctx.spec, ctx.dtype
        opts = spec.opts
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        h = hidden.index_select(0, rows).to(dtype)
        valid_target = target.index_select(0, rows)
        upstream = grad_value.float().index_select(0, rows)
        if scale.numel():  # token scaling: the detached target probability scales the gradient too
            upstream = upstream * scale
        if spec.terms is None:
            a_coef, b_coef, grad_extra = spec.target_weight * upstream, spec.mean_weight * upstream, {}
        else:
            a_coef, b_coef, grad_extra = spec.terms.grad_coefficients(valid_target, lse, upstream)
        grad_h = None
        if need_hidden:
            grad_h = torch.zeros(n_valid, hidden.shape[1], device=hidden.device, dtype=torch.float32)
        width = slice_cols(n_valid, vocab, dtype, opts.chunk_bytes)
        buffer = torch.empty(n_valid * width, device=hidden.device, dtype=dtype)
        for start, stop in _vocab_slices(vocab, width):
            w_slice = w[start:stop]
            out = buffer[: n_valid * (stop - start)].view(n_valid, stop - start)
            logits = project(h, w_slice, None if b is None else b[start:stop], out)
            ctx.passes.grad(logits, valid_target, lse, a_coef, b_coef, vocab_start=start, vocab=vocab, **grad_extra)
            if need_weight:
                mm_into_(grad_weight[start:stop], logits.t(), h)
            if need_bias:
                grad_bias[start:stop] = logits.sum(0, dtype=torch.float32)
            if need_hidden:
                addmm_fp32_(grad_h, logits, w_slice)
        if need_hidden:
            grad_hidden.index_copy_(0, rows, grad_h.to(hidden.dtype))
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_token_objective(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None, *,
    target_weight: float, mean_weight: float, opts: LogitOptions, distribution: bool = False,
    num_items: torch.Tensor | None = None, terms: CrossEntropyTerms | None = None,
) -> tuple[torch.Tensor, ...]:
    """Checked entry to :class:`LinearTokenObjectiveFunction`.

    Returns ``(value, logit_mean, entropy, log_sum_sq_probs, is_top1, z_loss, predicted)``, each ``(N,)``; the
    metrics are empty unless asked for (``distribution``, ``terms``: see the Function). ``num_items``: a
    0-d accelerator tensor checked ``> 0`` in the op's one host synchronisation (see
    :func:`._linear_chunks.valid_token_index`). A caller that names its inputs otherwise checks them
    first (:func:`._linear_chunks.check_linear_inputs` with its names).
    """
    if not isinstance(opts, LogitOptions):
        raise TypeError(f"opts must be a LogitOptions, got {type(opts).__name__}")
    check_linear_inputs(hidden, weight, target, bias)
    use_triton(hidden, weight, impl=opts.impl)  # a path that cannot run is refused here, before any product
    spec = TokenObjective(opts, float(target_weight), float(mean_weight), bool(distribution), terms)
    return LinearTokenObjectiveFunction.apply(hidden, weight, bias, target.long(), spec, num_items)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_bytes: int | None = None,
    impl: str | None = None,
    distribution_stats: bool = False,
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
        chunk_bytes: memory budget of one slice's ``(M, Vc)`` logits (default 512 MiB; slices are
            at least 256 columns wide).
        impl: ``"triton"`` or ``"torch"`` to force a path; by default Triton on CUDA tensors.
        distribution_stats: also return the entropy, ``log sum_v p_v^2`` and whether the target is the
            argmax, folded in the same row pass (no extra product).

    Returns:
        :class:`LinearLogProbs` of ``(N,)`` tensors: ``logps`` (differentiable with respect to hidden,
        weight and bias), ``logit_mean`` and, on request, the distribution statistics (no gradient).
    """
    opts = LogitOptions(ignore_index, temperature, softcap, logit_scale, chunk_bytes, impl)
    logps, logit_mean, entropy, log_sum_sq, is_top1, *_ = linear_token_objective(
        hidden, weight, target, bias, target_weight=1.0, mean_weight=0.0, opts=opts, distribution=distribution_stats
    )
    if not distribution_stats:
        return LinearLogProbs(logps, logit_mean)
    return LinearLogProbs(logps, logit_mean, entropy, log_sum_sq, is_top1)
