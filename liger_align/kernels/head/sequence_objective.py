"""Fused linear -> per-sequence objective with the gradient formed in the forward pass: 3 products.

For a loss ``L(s, n, m)`` of per-row statistics of ``R`` rows of ``T`` tokens — ``s_r`` the sum over the
row's valid tokens of ``log p(target)``, ``n_r`` its valid-token count, ``m_r`` its sum of vocabulary-mean
logits (metrics) — every token's gradient is ``dL/ds_r * (onehot - p)``, so it is known as soon as the
row's ``s_r`` is. When ``L`` is *separable* over groups of rows (``dL/ds_r`` depends only on the
statistics of the rows of ``r``'s group: a preference pair's chosen and rejected rows, a KTO row with
a precomputed KL, ORPO's chosen row with its NLL rows), the valid tokens are processed in chunks of
whole groups. Per chunk: the logits ``(C, V)`` (product 1), one row pass for the log-sum-exp and the
target logit, ``dL/ds`` of the chunk's rows (autograd on ``(R,)`` tensors, rows not yet seen filled
with a finite placeholder that separability makes irrelevant), the logits' gradient in place, then
grad-hidden (product 2) and grad-weight (product 3, summed over chunks by
:class:`~liger_align.kernels.head.grad_weight_sum.GradWeightSum`: fp32-equivalent accuracy without a
``(V, H)`` fp32 buffer). The backward only scales the stored gradients by the upstream scalar, so one
forward serves one backward (a second one raises).

Compared with the recomputing base (:mod:`.linear_logprobs`, 4 products) this keeps, between forward
and backward, grad-hidden ``(N, H)`` and grad-weight ``(V, H)`` in the inputs' dtypes, and needs during
the forward a ``(C, V)`` logits chunk of at least one whole group and the accumulator's helper buffer.
:func:`sequence_strategy` picks the path by that memory (:mod:`._strategy`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._dispatch import use_triton
from ._linear_chunks import chunk_rows, compute_dtype, mm_fp32, project, raise_bad_targets
from ._row_softmax import RowStats
from ._scale import save_gradients, scaled_gradients
from ._strategy import choose_strategy, grad_in_forward_extra_bytes
from .grad_weight_sum import GradWeightSum
from .linear_logprobs import LogitOptions

#: ``L(sum_logps (R,), n_tokens (R,), logit_sum (R,)) -> 0-d loss``, all fp32; must be separable over groups.
RowObjective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SequenceObjective:
    """What the 3-product op needs besides the tensors.

    ``objective``: the separable loss of per-row statistics (:data:`RowObjective`).
    ``row_groups``: ``(R,)`` group id of each row; a group's rows are always in the same chunk.
    ``length``: ``T``, tokens per row (hidden is ``(R * T, H)``, row-major).
    ``opts``: how logits are formed and chunked (:class:`LogitOptions`).
    ``wanted``: whether autograd can ask for the gradient of ``(hidden, weight, bias)`` (read outside the
    Function: ``needs_input_grad`` is True under ``torch.no_grad()`` too).
    """

    objective: RowObjective
    row_groups: tuple[int, ...]
    length: int
    opts: LogitOptions
    wanted: tuple[bool, bool, bool]


def _chunks_of_groups(counts: list[int], row_groups: tuple[int, ...], per_chunk: int) -> list[int]:
    """Chunk index of each row: consecutive groups (in order of first row) until ``per_chunk`` tokens."""
    group_tokens: dict[int, int] = {}
    for row, group in enumerate(row_groups):
        group_tokens[group] = group_tokens.get(group, 0) + counts[row]
    chunk_of_group, chunk, filled = {}, 0, 0
    for group, tokens in group_tokens.items():
        if filled and filled + tokens > per_chunk:
            chunk, filled = chunk + 1, 0
        chunk_of_group[group] = chunk
        filled += tokens
    return [chunk_of_group[group] for group in row_groups]


def _row_gradient(objective: RowObjective, sums: torch.Tensor, n_tokens: torch.Tensor, logit_sum: torch.Tensor):
    """``dL/ds (R,)`` at ``sums`` (fp32); zeros where the loss does not depend on ``s``."""
    with torch.enable_grad():
        s = sums.detach().requires_grad_(True)
        loss = objective(s, n_tokens, logit_sum)
        if not loss.requires_grad:
            return torch.zeros_like(sums)
        (grad,) = torch.autograd.grad(loss, s, allow_unused=True)
    return torch.zeros_like(sums) if grad is None else grad.float()


class SequenceObjectiveFunction(torch.autograd.Function):
    """``L`` of :class:`SequenceObjective` on ``hidden (R*T, H) @ weight.T + bias`` against ``target (R*T,)``.

    Returns ``(loss, sum_logps, n_tokens, logit_sum)``: the 0-d fp32 loss (differentiable) and the
    per-row statistics ``(R,)`` fp32 (no gradient), from which the caller reads its metrics.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, spec: SequenceObjective):
        opts = spec.opts
        passes = opts.row_passes(use_triton(hidden, weight, impl=opts.impl))
        dtype = compute_dtype(hidden, weight)
        rows, length, vocab = len(spec.row_groups), spec.length, weight.shape[0]
        device = hidden.device
        valid = target != opts.ignore_index
        n_tokens = valid.view(rows, length).sum(1)
        out_of_range = valid & ((target < 0) | (target >= vocab))
        read = torch.cat((n_tokens, out_of_range.sum().reshape(1))).tolist()  # the one host sync
        counts, n_bad = read[:rows], read[rows]
        if n_bad:
            raise_bad_targets(target, out_of_range, n_bad, vocab=vocab, ignore_index=opts.ignore_index)
        n_valid = sum(counts)
        n_tokens = n_tokens.float()
        # Per-token values, summed per row after each chunk (a deterministic order, unlike index_add_).
        token_logps = torch.zeros(rows * length, device=device, dtype=torch.float32)
        token_means = torch.zeros_like(token_logps)
        sum_logps = token_logps.new_zeros(rows)
        logit_sum = token_logps.new_zeros(rows)
        needs = tuple(n and w for n, w in zip(ctx.needs_input_grad[:3], spec.wanted))
        needs = (needs[0], needs[1], needs[2] and bias is not None)
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if needs[0] else None
        grad_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if needs[2] else None
        per_chunk = chunk_rows(max(n_valid, 1), vocab, dtype, opts.chunk_bytes)
        chunk_of_row = _chunks_of_groups(counts, spec.row_groups, per_chunk)
        n_chunks = max(chunk_of_row) + 1 if n_valid else 0
        chunk_tokens = [0] * n_chunks
        for row, chunk in enumerate(chunk_of_row if n_valid else ()):
            chunk_tokens[chunk] += counts[row]
        grad_weight = None
        if needs[1]:
            grad_weight = GradWeightSum(
                vocab, weight.shape[1], dtype=weight.dtype, device=device, n_chunks=max(n_chunks, 1),
                triton_path=passes.triton, chunk_dtype=dtype,
            )
        if n_valid:
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            chunk_id = torch.tensor(chunk_of_row, device=device)
            positions = torch.nonzero_static(valid, size=n_valid).squeeze(1)
            order = torch.argsort(chunk_id.index_select(0, positions // length), stable=True)
            positions = positions.index_select(0, order)
            buffer = torch.empty(max(chunk_tokens) * vocab, device=device, dtype=dtype)
            start = 0
            for chunk, size in enumerate(chunk_tokens):
                if size == 0:
                    continue
                tokens = positions[start : start + size]
                start += size
                h_chunk = hidden.index_select(0, tokens).to(dtype)
                chunk_target = target.index_select(0, tokens)
                logits = project(h_chunk, w, b, buffer[: size * vocab].view(size, vocab))
                stats = RowStats(size, device)
                passes.fold(stats, logits, chunk_target, 0)
                lse = stats.lse()
                token_logps.index_copy_(0, tokens, stats.target_logit - lse)
                token_means.index_copy_(0, tokens, stats.logit_sum / vocab)
                sum_logps = token_logps.view(rows, length).sum(1)
                logit_sum = token_means.view(rows, length).sum(1)
                if not any(needs):
                    continue
                # logits <- onehot - p (the gradient of the token's log-prob), then the products that do not
                # need dL/ds, so that the GPU has work while the host evaluates the objective's gradient.
                passes.grad(logits, chunk_target, lse, torch.ones_like(lse), torch.zeros_like(lse), vocab_start=0,
                            vocab=vocab)
                unscaled_hidden = mm_fp32(logits, w) if grad_hidden is not None else None
                row_of_token = tokens // length
                seen = torch.where(chunk_id <= chunk, sum_logps, -n_tokens)  # rows not seen yet: mean log-prob -1
                coef = _row_gradient(spec.objective, seen, n_tokens, logit_sum).index_select(0, row_of_token)[:, None]
                if unscaled_hidden is not None:
                    grad_hidden.index_copy_(0, tokens, (unscaled_hidden * coef).to(grad_hidden.dtype))
                if grad_weight is not None:
                    grad_weight.add_(logits, (h_chunk * coef).to(dtype))
                if grad_bias is not None:
                    grad_bias += mm_fp32(coef.t().to(dtype), logits).squeeze(0)
        loss = spec.objective(sum_logps, n_tokens, logit_sum).float().reshape(())
        stored = (
            grad_hidden,
            None if grad_weight is None else grad_weight.result(),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        save_gradients(ctx, stored)
        ctx.mark_non_differentiable(sum_logps, n_tokens, logit_sum)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (unused) gradients
        return loss, sum_logps, n_tokens, logit_sum

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        grads = scaled_gradients(ctx, grad_loss, "a fused loss")
        return grads[0], grads[1], grads[2], None, None


def sequence_objective(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None, *,
    objective: RowObjective, row_groups: tuple[int, ...], opts: LogitOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, sum_logps, n_tokens, logit_sum)`` of ``hidden (R, T, H)``, ``target (R, T)`` by the 3-product path.

    The caller has checked the inputs (shapes, dtypes, devices); ``row_groups`` ``(R,)`` as in
    :class:`SequenceObjective`.
    """
    rows, length, width = hidden.shape
    if len(row_groups) != rows:
        raise ValueError(f"row_groups must give one group per row: {rows} rows, got {len(row_groups)}")
    wanted = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    spec = SequenceObjective(objective, tuple(int(g) for g in row_groups), length, opts, wanted)
    return SequenceObjectiveFunction.apply(
        hidden.reshape(rows * length, width), weight, bias, target.reshape(-1).long(), spec
    )


def sequence_strategy(
    strategy: str, hidden: torch.Tensor, weight: torch.Tensor, *, separable: bool, group_rows: int,
    opts: LogitOptions, max_extra_bytes: int | None = None,
) -> str:
    """``"grad_in_forward"`` (3 products) or ``"recompute"`` (4 products) for a sequence loss on
    ``hidden (R, T, H)``: :func:`~._strategy.choose_strategy` with a chunk of at least ``group_rows`` whole rows."""
    rows, length = hidden.shape[0], hidden.shape[1]
    dtype = compute_dtype(hidden.reshape(-1, hidden.shape[-1]), weight)
    wanted = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    extra = grad_in_forward_extra_bytes(
        rows * length, weight, dtype, group_tokens=group_rows * length, chunk_bytes=opts.chunk_bytes,
        weight_grad=weight.requires_grad,
    )
    return choose_strategy(
        strategy, separable=separable, wanted=wanted, extra_bytes=extra, device=hidden.device,
        max_extra_bytes=max_extra_bytes,
        not_separable="needs an objective separable over pairs/rows; this loss configuration is not (it couples the "
                      "batch's rows): use strategy='recompute' or 'auto'",
    )
