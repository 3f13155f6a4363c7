"""Row-wise softmax statistics and gradients over one chunk of logits ``(C, V)``.

These are the only element-wise passes of the fused linear ops (``linear_logprobs`` and the fused
cross-entropy): the matrix products around them run in cuBLAS. Each op has a Triton kernel and a
plain-PyTorch twin with the same contract.

The logits go through the transform users of other libraries rely on, in this order:
``z = logit_scale * raw``; with softcapping ``z = softcap * tanh(z / softcap)`` (Gemma 2);
``z = z / temperature``.

Statistics per row ``i`` (fp32): ``lse_i = log sum_v exp(z_iv)``, ``zt_i = z_i[target_i]`` and
``zsum_i = sum_v z_iv``.

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
        logits_ptr, stride, target_ptr, lse_ptr, target_logit_ptr, logit_sum_ptr,
        n_cols, logit_scale, softcap, inv_temperature,
        HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride
        running_max = -float("inf")
        sum_exp = 0.0
        logit_sum = 0.0
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
        target = tl.load(target_ptr + row)
        z_target = tl.load(row_ptr + target).to(tl.float32)
        z_target = _transform(z_target, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        tl.store(lse_ptr + row, running_max + tl.log(sum_exp))
        tl.store(target_logit_ptr + row, z_target)
        tl.store(logit_sum_ptr + row, logit_sum)

    @triton.jit
    def _row_grad_kernel(
        logits_ptr, stride, target_ptr, lse_ptr, a_ptr, b_ptr,
        n_cols, logit_scale, softcap, inv_temperature,
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
        is_target = cols == tl.load(target_ptr + row)
        grad = tl.where(is_target, a, 0.0) + b / n_cols - (a + b) * p
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


def row_stats(
    logits: torch.Tensor, target: torch.Tensor, *, logit_scale: float, softcap: float | None,
    temperature: float, triton_path: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(lse, target_logit, logit_sum)``, each ``(C,)`` fp32, of transformed ``logits (C, V)``.

    Every ``target`` must lie in ``[0, V)``: masked tokens were dropped before the product.
    """
    rows, n_cols = logits.shape
    if not triton_path:
        z = _torch_transform(logits, logit_scale, softcap, temperature)
        return torch.logsumexp(z, dim=1), z.gather(1, target[:, None]).squeeze(1), z.sum(1)
    lse, target_logit, logit_sum = (torch.empty(rows, device=logits.device, dtype=torch.float32) for _ in range(3))
    _row_stats_kernel[(rows,)](
        logits, logits.stride(0), target, lse, target_logit, logit_sum,
        n_cols, float(logit_scale), float(softcap or 1.0), 1.0 / temperature,
        HAS_SOFTCAP=softcap is not None, BLOCK=min(_STATS_BLOCK, triton.next_power_of_2(n_cols)),
    )
    return lse, target_logit, logit_sum


def row_grad_(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
    logit_scale: float, softcap: float | None, temperature: float, triton_path: bool,
) -> torch.Tensor:
    """Overwrite ``logits (C, V)`` with the gradient of ``a * log p[target] + b * mean_v log p`` per row.

    ``lse``, ``a`` and ``b`` are ``(C,)`` fp32. Returns ``logits``, now holding the gradient with
    respect to the raw (untransformed) logits, in the logits' dtype.
    """
    rows, n_cols = logits.shape
    if not triton_path:
        raw = logits.float() * logit_scale
        tanh = torch.tanh(raw / softcap) if softcap is not None else None
        z = (softcap * tanh if tanh is not None else raw) / temperature
        p = torch.exp(z - lse[:, None])
        grad = (b / n_cols)[:, None] - (a + b)[:, None] * p
        grad.scatter_add_(1, target[:, None], a[:, None])
        grad = grad / temperature
        if tanh is not None:
            grad = grad * (1.0 - tanh * tanh)
        logits.copy_(grad * logit_scale)
        return logits
    block = min(_GRAD_BLOCK, triton.next_power_of_2(n_cols))
    _row_grad_kernel[(rows, math.ceil(n_cols / block))](
        logits, logits.stride(0), target, lse, a, b,
        n_cols, float(logit_scale), float(softcap or 1.0), 1.0 / temperature,
        HAS_SOFTCAP=softcap is not None, BLOCK=block,
    )
    return logits
