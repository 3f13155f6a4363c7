"""Fused linear cross-entropy: ``CE(hidden @ weight.T + bias, target)`` without the ``(N, V)`` logits.

Two strategies, picked with ``strategy=``:

- ``"grad_in_forward"`` (``reduction="mean"``/``"sum"`` only): every token's gradient is known in the
  forward pass, so each chunk of valid tokens costs 3 products (logits, grad-hidden, grad-weight);
  grad-weight is summed over token chunks by :class:`~.grad_weight_sum.GradWeightSum` (fp32-equivalent
  accuracy; for bf16 weights a ``(V, H)`` bf16 residual buffer, none when the valid tokens fit one
  chunk), and the backward only scales the stored gradients by the upstream scalar. Fastest; the
  residual buffer and the ``(C, V)`` logits chunk are its memory cost.
- ``"recompute"``: the per-token loss goes through the recomputing base
  (:class:`~liger_align.kernels.head.linear_logprobs.LinearTokenObjectiveFunction`): 4 products, and only
  an ``(M, Vc)`` logits slice and an ``(M, H)`` fp32 buffer of extra memory.

``"auto"`` takes ``"grad_in_forward"`` when the reduction allows it and its extra memory (the logits
chunk and the grad-weight accumulator's buffer) fits ``max_extra_bytes`` and half the free device memory
(:mod:`._strategy`, the same choice as the sequence losses').
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._checks import check_choice, check_flag, check_num_items, check_real
from ..._tokens import IGNORE_INDEX
from .._dispatch import use_triton
from ._cross_entropy_options import (
    CrossEntropyOutput,
    CrossEntropyTerms,
    check_ce_weight,
    check_lse_square_scale,
)
from ._linear_chunks import (
    check_linear_inputs,
    chunk_rows,
    compute_dtype,
    project,
    valid_token_index,
)
from ._scale import save_gradients, scaled_gradients
from ._strategy import STRATEGIES, choose_strategy, grad_in_forward_extra_bytes
from .grad_weight_sum import GradWeightSum
from .linear_logprobs import LogitOptions, linear_token_objective

REDUCTIONS = ("mean", "sum", "none")
__all__ = ["CrossEntropyOutput", "FusedLinearCrossEntropyFunction", "fused_linear_cross_entropy"]


class TokenChunkGrads:
    """Gradients of hidden ``(N, H)``, weight ``(V, H)`` and bias ``(V,)``, summed over token chunks.

    Grad-weight goes through :class:`~.grad_weight_sum.GradWeightSum` (one product written in the
    weight's dtype for one chunk; for several, a bf16 compensated pair or in-place fp32: fp32-equivalent
    accuracy without a ``(V, H)`` fp32 buffer). Bias sums in fp32. A gradient whose input does not
    require grad is not computed (None).
    """

    def __init__(
        self, hidden, weight, bias, needs: tuple[bool, bool, bool], *, n_chunks: int, chunk_dtype: torch.dtype,
        triton_path: bool,
    ) -> None:
        self.hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if needs[0] else None
        self.weight = None
        if needs[1]:
            self.weight = GradWeightSum(
                weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device,
                n_chunks=max(n_chunks, 1), triton_path=triton_path, chunk_dtype=chunk_dtype,
            )
        self.bias = None
        if needs[2] and bias is not None:
            self.bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32)

    def add_chunk(
        self, grad_logits: torch.Tensor, h_chunk: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor
    ) -> None:
        """Add one chunk: ``grad_logits (C, V)`` of the tokens ``rows (C,)`` with hidden states ``h_chunk (C, H)``."""
        if self.hidden is not None:
            self.hidden.index_copy_(0, rows, torch.mm(grad_logits, weight).to(self.hidden.dtype))
        if self.weight is not None:
            self.weight.add_(grad_logits, h_chunk)
        if self.bias is not None:
            self.bias += grad_logits.sum(0, dtype=self.bias.dtype)

    def as_inputs(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """``(grad_hidden, grad_weight, grad_bias)`` in the dtypes of the inputs they belong to."""
        grad_weight = None if self.weight is None else self.weight.result()
        grad_bias = None if self.bias is None or bias is None else self.bias.to(bias.dtype)
        return self.hidden, grad_weight, grad_bias


@dataclass(frozen=True)
class CrossEntropyPass:
    """What :class:`FusedLinearCrossEntropyFunction` needs besides its tensors.

    ``opts``: how logits are formed and chunked; ``terms``: label smoothing, class weights, z-loss;
    ``wanted``: whether autograd can ask for the gradient of ``(hidden, weight, bias)`` (read outside the
    Function: ``needs_input_grad`` is True under ``torch.no_grad()`` too); ``want_accuracy``: also the
    token accuracy.
    """

    opts: LogitOptions
    terms: CrossEntropyTerms
    wanted: tuple[bool, bool, bool]
    want_accuracy: bool = False


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Scalar ``sum_i loss_i / denominator`` with gradients computed in the forward pass.

    ``loss_i``: see :mod:`._cross_entropy_options` (``CE_i = lse_i - (1 - eps) * z_i[target_i] - eps *
    mean_v z_iv`` without class weights and z-loss); ``denominator`` is a 0-d fp32 tensor (the valid
    tokens' count or weight sum, ``num_items_in_batch`` or 1). Also returns, without gradient,
    ``is_top1 (N,)`` bool from the same row pass (False where ignored), the z-loss part ``sum_i s lse_i^2
    / denominator`` (None unless ``terms.want_z``), the token accuracy (None unless ``want_accuracy``) and
    the argmax ids ``(N,)`` int64, -1 where ignored (None unless ``terms.want_argmax``). With
    ``terms.token_scaling`` each ``loss_i`` (and its z-loss part, and its gradient) is scaled by the
    detached target probability.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, denominator, deferred_num_items, spec: CrossEntropyPass):
        opts, terms, wanted, want_accuracy = spec.opts, spec.terms, spec.wanted, spec.want_accuracy
        passes = opts.row_passes(use_triton(hidden, weight, impl=opts.impl))
        dtype = compute_dtype(hidden, weight)
        rows_all = valid_token_index(target, opts.ignore_index, weight.shape[0], num_items=deferred_num_items)
        vocab = weight.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        per_chunk = chunk_rows(rows_all.shape[0], vocab, dtype, opts.chunk_bytes)
        n_chunks = -(-rows_all.shape[0] // per_chunk)
        per_chunk = -(-rows_all.shape[0] // max(n_chunks, 1)) if rows_all.shape[0] else per_chunk  # equal chunks
        # ``needs_input_grad`` is True under ``torch.no_grad()`` too: ``wanted`` (read outside) says
        # whether autograd will ever ask for these gradients.
        needs = tuple(n and w_ for n, w_ in zip(ctx.needs_input_grad[:3], wanted))
        grads = TokenChunkGrads(
            hidden, weight, bias, needs, n_chunks=n_chunks, chunk_dtype=dtype, triton_path=passes.triton
        )
        inv_denominator = 1.0 / denominator.to(device=hidden.device, dtype=torch.float32)
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        z_total = torch.zeros_like(total) if terms.want_z else None
        is_top1 = torch.zeros(target.shape[0], device=hidden.device, dtype=torch.bool)
        predicted = None
        if terms.want_argmax:
            predicted = torch.full((target.shape[0],), -1, device=hidden.device, dtype=torch.int64)
        buffer = torch.empty((per_chunk, vocab), device=hidden.device, dtype=dtype) if rows_all.numel() else None
        any_grad = any(needs)
        for start in range(0, rows_all.shape[0], per_chunk):
            rows = rows_all[start : start + per_chunk]
            h_chunk = hidden.index_select(0, rows).to(dtype)
            chunk_target = target.index_select(0, rows)
            logits = project(h_chunk, w, b, buffer[: rows.shape[0]])
            stats = terms.row_stats(rows.shape[0], hidden.device)
            passes.fold(stats, logits, chunk_target, 0, **terms.fold_kwargs())
            lse = stats.lse()
            is_top1.index_copy_(0, rows, stats.is_top1())
            if predicted is not None:
                predicted.index_copy_(0, rows, stats.argmax)
            scale = terms.token_scale(stats, lse)  # None unless use_token_scaling: no extra op on the plain path
            value = terms.value(stats, lse, chunk_target, vocab)
            total += (value if scale is None else value * scale).sum()
            if z_total is not None:
                z_total += (lse.square() if scale is None else lse.square() * scale).sum()
            if any_grad:
                upstream = inv_denominator if scale is None else inv_denominator * scale
                a, b_coef, options = terms.grad_coefficients(chunk_target, lse, upstream)
                passes.grad(logits, chunk_target, lse, a, b_coef, vocab_start=0, vocab=vocab, **options)
                grads.add_chunk(logits, h_chunk, rows, w)
        grad_hidden, grad_weight, grad_bias = grads.as_inputs(weight, bias)
        save_gradients(ctx, (grad_hidden, grad_weight, grad_bias))
        if z_total is not None:
            z_total = z_total * (terms.z_scale * inv_denominator)
        accuracy = is_top1.sum() / max(rows_all.shape[0], 1) if want_accuracy else None
        ctx.mark_non_differentiable(*(t for t in (is_top1, z_total, accuracy, predicted) if t is not None))
        ctx.set_materialize_grads(False)  # no zero tensors for the metrics' (unused) gradients
        return total * inv_denominator, is_top1, z_total, accuracy, predicted

    @staticmethod
    def backward(ctx, grad_loss, *_grad_metrics):
        grads = scaled_gradients(ctx, grad_loss, "fused_linear_cross_entropy")
        return grads[0], grads[1], grads[2], None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ce_weight: torch.Tensor | None = None,
    lse_square_scale: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    chunk_bytes: int | None = None,
    impl: str | None = None,
    strategy: str = "auto",
    max_extra_bytes: int | None = None,
    return_top1: bool = False,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    use_token_scaling: bool = False,
    return_predicted_tokens: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CrossEntropyOutput:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``target``, matching ``F.cross_entropy``.

    Per valid token (formula in :mod:`._cross_entropy_options`), with ``c = ce_weight`` (1 without it):
    ``loss_i = (1 - eps) c_y (lse_i - z_iy) + (eps / V) sum_v c_v (lse_i - z_iv) + s lse_i^2``.

    Args:
        hidden: ``(N, H)`` or ``(B, T, H)``; target ``(N,)`` or ``(B, T)`` (already shifted by the caller).
        weight: ``(V, H)``; bias ``(V,)`` or None.
        reduction: ``"mean"``: ``sum_i loss_i / D`` with ``D`` the number of valid tokens, or with
            ``ce_weight`` the sum of the valid targets' weights ``sum_i c_{y_i}`` (as ``F.cross_entropy``),
            or ``num_items_in_batch`` when given (Hugging Face's convention for exact gradient
            accumulation; it replaces ``D`` as given, weights or not: pass the global sum of the valid
            targets' weights to get the weighted mean over accumulated micro-batches). ``D = 0`` (all
            tokens ignored, or all valid targets of weight 0) counts as 1. ``"sum"``; ``"none"`` (per
            token, 0 where ignored, shaped like ``target``).
        label_smoothing: ``eps`` in ``[0, 1]``, as in ``F.cross_entropy`` (weighted by ``ce_weight`` too).
        ce_weight: per-class weights ``(V,)`` float, finite and ``>= 0``, on the weight's device, as
            ``F.cross_entropy(weight=...)``; no gradient flows to it.
        lse_square_scale: ``s >= 0``, the z-loss ``s * lse_i^2`` per valid token (PaLM), unweighted by
            ``ce_weight`` and reduced with the loss's ``D``; included in the loss. (Liger-Kernel divides
            it by the number of valid tokens even with ``ce_weight``; without ``ce_weight`` they agree.)
        softcap, temperature, logit_scale, impl: as in :func:`linear_logprobs`.
        chunk_bytes: budget of one logits buffer (default 512 MiB): ``(C, V)`` token chunks with
            ``"grad_in_forward"``, ``(M, Vc)`` vocabulary slices with ``"recompute"``.
        strategy: ``"auto"``, ``"grad_in_forward"`` or ``"recompute"`` (module docstring).
        max_extra_bytes: with ``"auto"``, the most memory ``"grad_in_forward"`` may need beyond
            ``"recompute"`` (logits chunk and accumulator buffer; default: no fixed cap, half the free memory).
        return_top1: also return ``is_top1`` (bool, shaped like target, False where ignored): whether
            the target is the argmax of its logits, read from the same row pass (no extra product).
        return_z_loss: also return the z-loss part (reduced as the loss, without gradient).
        return_token_accuracy: also return the 0-d fraction of valid tokens whose target is the argmax
            (a target tied with the maximum counts as a hit; Liger-Kernel takes the first maximal index).
        use_token_scaling: multiply each token's loss (z-loss included) by its target probability
            ``p_i[y_i] = exp(z_iy - lse_i)``, detached (Liger-Kernel's option; ``p`` here is of the
            transformed logits: scale, softcap and temperature). The denominator is unchanged.
        return_predicted_tokens: also return each token's argmax vocabulary id (int64, shaped like target,
            the first maximal id, ``-1`` where ignored), from the same row pass.

    Returns:
        the loss; ``(loss, is_top1)`` with ``return_top1`` alone; with ``return_z_loss``,
        ``return_token_accuracy`` or ``return_predicted_tokens``, a :class:`CrossEntropyOutput` ``(loss,
        z_loss, token_accuracy, is_top1, predicted_tokens)`` whose fields not asked for are None.

    A batch whose tokens are all ignored gives 0 and zero gradients (``F.cross_entropy`` gives NaN).
    """
    check_choice("reduction", reduction, REDUCTIONS)
    label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    lse_square_scale = check_lse_square_scale(lse_square_scale)
    for name, flag in (("return_top1", return_top1), ("return_z_loss", return_z_loss),
                       ("return_token_accuracy", return_token_accuracy), ("use_token_scaling", use_token_scaling),
                       ("return_predicted_tokens", return_predicted_tokens)):
        check_flag(name, flag)
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch applies to reduction='mean' only, got reduction={reduction!r}")
    if isinstance(hidden, torch.Tensor) and isinstance(target, torch.Tensor) and hidden.dim() == 3:
        if target.shape != hidden.shape[:2]:
            raise ValueError(f"target must have shape (B, T) = {tuple(hidden.shape[:2])}, got {tuple(target.shape)}")
        out_shape = target.shape
        hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    else:
        out_shape = getattr(target, "shape", None)
    check_choice("strategy", strategy, STRATEGIES)
    check_linear_inputs(hidden, weight, target, bias)
    class_weight = check_ce_weight(ce_weight, weight)
    opts = LogitOptions(ignore_index, temperature, softcap, logit_scale, chunk_bytes, impl)
    use_triton(hidden, weight, impl=opts.impl)  # a path that cannot run is refused here, before any product
    # Which gradients autograd can ask for: none under torch.no_grad() or for inputs that need none.
    wanted = tuple(
        torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    strategy = choose_strategy(
        strategy, separable=reduction != "none", wanted=any(wanted), device=hidden.device,
        extra_bytes=grad_in_forward_extra_bytes(
            hidden.shape[0], weight, compute_dtype(hidden, weight), chunk_bytes=chunk_bytes, weight_grad=wanted[1]
        ),
        max_extra_bytes=max_extra_bytes, not_separable="needs reduction 'mean' or 'sum', got reduction='none'",
    )
    deferred = None
    if reduction != "mean":
        denominator = torch.ones((), device=hidden.device)
    elif num_items_in_batch is not None:
        denominator, deferred = check_num_items(num_items_in_batch, hidden.device)
    elif class_weight is not None:
        valid = target != opts.ignore_index
        picked = class_weight.index_select(0, torch.where(valid, target, 0).clamp(0, weight.shape[0] - 1))
        denominator = torch.where(valid, picked, 0.0).sum()
        denominator = torch.where(denominator > 0, denominator, 1.0)
    else:
        denominator = (target != opts.ignore_index).sum().clamp(min=1).float()
    terms = CrossEntropyTerms(
        -(1.0 - label_smoothing), -label_smoothing, class_weight, lse_square_scale, return_z_loss,
        return_top1 or return_token_accuracy, bool(use_token_scaling), bool(return_predicted_tokens),
    )
    z_loss = accuracy = None
    if strategy == "recompute":
        plain = class_weight is None and not lse_square_scale and not (
            terms.want_top1 or terms.token_scaling or terms.want_argmax)
        per_token, _, _, _, is_top1, z_token, predicted = linear_token_objective(
            hidden, weight, target, bias, target_weight=terms.alpha, mean_weight=terms.beta, opts=opts,
            num_items=deferred,
            terms=None if plain else terms,
        )
        loss = per_token.reshape(out_shape) if reduction == "none" else per_token.sum() / denominator
        if return_z_loss:
            z_loss = z_token.reshape(out_shape) if reduction == "none" else z_token.sum() / denominator
        if return_token_accuracy:
            accuracy = is_top1.sum() / (target != opts.ignore_index).sum().clamp(min=1)
    else:
        loss, is_top1, z_loss, accuracy, predicted = FusedLinearCrossEntropyFunction.apply(
            hidden, weight, bias, target.long(), denominator, deferred,
            CrossEntropyPass(opts, terms, wanted, bool(return_token_accuracy)),
        )
    if return_z_loss or return_token_accuracy or return_predicted_tokens:
        top1 = is_top1.reshape(out_shape) if return_top1 else None
        tokens = predicted.reshape(out_shape) if return_predicted_tokens else None
        return CrossEntropyOutput(loss, z_loss, accuracy, top1, tokens)
    return (loss, is_top1.reshape(out_shape)) if return_top1 else loss
