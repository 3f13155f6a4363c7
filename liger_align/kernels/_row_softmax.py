"""Row-wise softmax statistics and gradients over one chunk of logits ``(M, Vc)``.

These are the only element-wise passes of the fused linear ops (``linear_logprobs`` and the fused
cross-entropy): the matrix products around them run in cuBLAS. Each op has a Triton kernel and a
plain-PyTorch twin with the same contract.

The logits go through the transform users of other libraries rely on, in this order:
``z = logit_scale * raw``; with softcapping ``z = softcap * tanh(z / softcap)`` (Gemma 2);
``z = z / temperature``.

Statistics per row ``i`` (fp32), folded over vocabulary slices with an online log-sum-exp:
``lse_i = log sum_v exp(z_iv)``, ``zt_i = z_i[target_i]`` and ``zsum_i = sum_v z_iv``.

Gradient per row, for an objective ``a_i * log p_i[target_i] + b_i * mean_v log p_iv``:
``d/dz_iv = a_i * onehot_iv + b_i / V - (a_i + b_i) * p_iv``, chained through the transform and
written in place over the logits.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _transform(raw, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
        z = raw * logit_scale
        if HAS_SOFTCAP:
            # tanh(x) = 2 * sigmoid(2x) - 1
            z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
        return z * inv_temperature

    @triton.jit
    def _row_stats_kernel(
        logits_ptr, stride, target_ptr, max_ptr, sum_exp_ptr, target_logit_ptr, logit_sum_ptr,
        vocab_start, n_cols, logit_scale, softcap, inv_temperature,
        HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride
        running_max = tl.load(max_ptr + row)
        sum_exp = tl.load(sum_exp_ptr + row)
        logit_sum = tl.load(logit_sum_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < n_cols
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            z = _transform(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
            logit_sum += tl.sum(tl.where(in_row, z, 0.0), axis=0)
            z = tl.where(in_row, z, -float("inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            running_max = new_max
        tl.store(max_ptr + row, running_max)
        tl.store(sum_exp_ptr + row, sum_exp)
        tl.store(logit_sum_ptr + row, logit_sum)
        local = tl.load(target_ptr + row) - vocab_start
        if (local >= 0) & (local < n_cols):
            z_target = tl.load(row_ptr + local).to(tl.float32)
            z_target = _transform(z_target, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
            tl.store(target_logit_ptr + row, z_target)

    @triton.jit
    def _row_grad_kernel(
        logits_ptr, stride, target_ptr, lse_ptr, a_ptr, b_ptr,
        vocab_start, n_cols, vocab, logit_scale, softcap, inv_temperature,
        HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        ptrs = logits_ptr + row * stride + cols
        raw = tl.load(ptrs, mask=in_row, other=0.0).to(tl.float32)
        y = raw * logit_scale
        if HAS_SOFTCAP:
            t = 2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0
            z = softcap * t * inv_temperature
        else:
            z = y * inv_temperature
        p = tl.exp(z - tl.load(lse_ptr + row))
        a = tl.load(a_ptr + row)
        b = tl.load(b_ptr + row)
        is_target = (cols + vocab_start) == tl.load(target_ptr + row)
        grad = tl.where(is_target, a, 0.0) + b / vocab - (a + b) * p
        grad = grad * inv_temperature
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        grad = grad * logit_scale
        tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


_STATS_BLOCK = 4096
_GRAD_BLOCK = 4096


def _torch_transform(raw: torch.Tensor, logit_scale: float, softcap: float | None, temperature: float):
    z = raw.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


class RowStats:
    """Running softmax statistics of ``M`` rows, each ``(M,)`` fp32, folded one vocabulary slice at a time."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.running_max = torch.full((rows,), float("-inf"), device=device)
        self.sum_exp = torch.zeros(rows, device=device)
        self.target_logit = torch.zeros(rows, device=device)
        self.logit_sum = torch.zeros(rows, device=device)

    def lse(self) -> torch.Tensor:
        """``log sum_v exp(z_v)`` per row, once every slice has been folded."""
        return self.running_max + torch.log(self.sum_exp)


def fold_row_stats_(
    stats: RowStats, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, *, logit_scale: float,
    softcap: float | None, temperature: float, triton_path: bool,
) -> None:
    """Fold the logits ``(M, Vc)`` of vocabulary ids ``[vocab_start, vocab_start + Vc)`` into ``stats``.

    ``target (M,)`` holds vocabulary ids in ``[0, V)``; a row's target logit is taken from the slice
    that contains it.
    """
    rows, n_cols = logits.shape
    if not triton_path:
        z = _torch_transform(logits, logit_scale, softcap, temperature)
        new_max = torch.maximum(stats.running_max, z.amax(1))
        stats.sum_exp.mul_(torch.exp(stats.running_max - new_max)).add_(torch.exp(z - new_max[:, None]).sum(1))
        stats.running_max.copy_(new_max)
        stats.logit_sum.add_(z.sum(1))
        local = target - vocab_start
        inside = (local >= 0) & (local < n_cols)
        picked = z.gather(1, local.clamp(0, n_cols - 1)[:, None]).squeeze(1)
        stats.target_logit.copy_(torch.where(inside, picked, stats.target_logit))
        return
    _row_stats_kernel[(rows,)](
        logits, logits.stride(0), target, stats.running_max, stats.sum_exp, stats.target_logit, stats.logit_sum,
        vocab_start, n_cols, float(logit_scale), float(softcap or 1.0), 1.0 / temperature,
        HAS_SOFTCAP=softcap is not None, BLOCK=min(_STATS_BLOCK, triton.next_power_of_2(n_cols)),
    )


def row_grad_(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
    vocab_start: int, vocab: int, logit_scale: float, softcap: float | None, temperature: float, triton_path: bool,
) -> torch.Tensor:
    """Overwrite ``logits (M, Vc)`` with the gradient of ``a * log p[target] + b * mean_v log p`` per row.

    The columns are vocabulary ids ``[vocab_start, vocab_start + Vc)`` of a vocabulary of ``vocab``;
    ``lse``, ``a`` and ``b`` are ``(M,)`` fp32. Returns ``logits``, now holding the gradient with
    respect to the raw (untransformed) logits, in the logits' dtype.
    """
    rows, n_cols = logits.shape
    if not triton_path:
        raw = logits.float() * logit_scale
        tanh = torch.tanh(raw / softcap) if softcap is not None else None
        z = (softcap * tanh if tanh is not None else raw) / temperature
        p = torch.exp(z - lse[:, None])
        grad = (b / vocab)[:, None] - (a + b)[:, None] * p
        local = target - vocab_start
        inside = (local >= 0) & (local < n_cols)
        grad.scatter_add_(1, local.clamp(0, n_cols - 1)[:, None], torch.where(inside, a, 0.0)[:, None])
        grad = grad / temperature
        if tanh is not None:
            grad = grad * (1.0 - tanh * tanh)
        logits.copy_(grad * logit_scale)
        return logits
    block = min(_GRAD_BLOCK, triton.next_power_of_2(n_cols))
    _row_grad_kernel[(rows, math.ceil(n_cols / block))](
        logits, logits.stride(0), target, lse, a, b,
        vocab_start, n_cols, vocab, float(logit_scale), float(softcap or 1.0), 1.0 / temperature,
        HAS_SOFTCAP=softcap is not None, BLOCK=block,
    )
    return logits
