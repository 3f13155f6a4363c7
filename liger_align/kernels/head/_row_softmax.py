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

Options of the cross-entropy, each behind a ``tl.constexpr`` flag (off: the kernels compile to the
plain ones): per-class weights ``c_v`` make the row pass also fold ``wsum_i = sum_v c_v z_iv`` and
the gradient pass use ``b_i * c_v / V`` in place of ``b_i / V``; a per-row coefficient ``g_i`` adds
``g_i * p_iv`` to the gradient (the z-loss ``2 s lse_i``, the weighted smoothing's ``p`` term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._dispatch import triton_available

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
        z_sum_exp_ptr, sq_sum_exp_ptr, weighted_sum_ptr, class_weight_ptr,
        vocab_start, n_cols, logit_scale, softcap, inv_temperature, argmax_ptr,
        HAS_SOFTCAP: tl.constexpr, DISTRIBUTION: tl.constexpr, BLOCK: tl.constexpr,
        HAS_CLASS_WEIGHT: tl.constexpr = False, ARGMAX: tl.constexpr = False,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride
        running_max = tl.load(max_ptr + row)
        sum_exp = tl.load(sum_exp_ptr + row)
        logit_sum = tl.load(logit_sum_ptr + row)
        z_sum_exp = tl.load(z_sum_exp_ptr + row)
        sq_sum_exp = tl.load(sq_sum_exp_ptr + row)
        if HAS_CLASS_WEIGHT:
            weighted_sum = tl.load(weighted_sum_ptr + row)
        if ARGMAX:
            best = tl.load(argmax_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < n_cols
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            z = _transform(z, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
            z_or_zero = tl.where(in_row, z, 0.0)
            logit_sum += tl.sum(z_or_zero, axis=0)
            if HAS_CLASS_WEIGHT:
                c = tl.load(class_weight_ptr + vocab_start + cols, mask=in_row, other=0.0)
                weighted_sum += tl.sum(z_or_zero * c, axis=0)
            z = tl.where(in_row, z, -float("inf"))
            block_max = tl.max(z, axis=0)
            if ARGMAX:  # the first maximal column; a later block wins only with a strictly larger maximum
                first = tl.min(tl.where(z == block_max, cols, n_cols), axis=0)
                best = tl.where(block_max > running_max, (first + vocab_start).to(tl.int64), best)
            new_max = tl.maximum(running_max, block_max)
            rescale = tl.exp(running_max - new_max)
            e = tl.exp(z - new_max)
            sum_exp = sum_exp * rescale + tl.sum(e, axis=0)
            if DISTRIBUTION:
                z_sum_exp = z_sum_exp * rescale + tl.sum(e * z_or_zero, axis=0)
                sq_sum_exp = sq_sum_exp * rescale * rescale + tl.sum(e * e, axis=0)
            running_max = new_max
        tl.store(max_ptr + row, running_max)
        tl.store(sum_exp_ptr + row, sum_exp)
        tl.store(logit_sum_ptr + row, logit_sum)
        if HAS_CLASS_WEIGHT:
            tl.store(weighted_sum_ptr + row, weighted_sum)
        if ARGMAX:
            tl.store(argmax_ptr + row, best)
        if DISTRIBUTION:
            tl.store(z_sum_exp_ptr + row, z_sum_exp)
            tl.store(sq_sum_exp_ptr + row, sq_sum_exp)
        local = tl.load(target_ptr + row) - vocab_start
        if (local >= 0) & (local < n_cols):
            z_target = tl.load(row_ptr + local).to(tl.float32)
            z_target = _transform(z_target, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
            tl.store(target_logit_ptr + row, z_target)

    @triton.jit
    def _row_grad_kernel(
        logits_ptr, stride, target_ptr, lse_ptr, a_ptr, b_ptr, g_ptr, class_weight_ptr,
        vocab_start, n_cols, vocab, logit_scale, softcap, inv_temperature,
        HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
        HAS_G: tl.constexpr = False, HAS_CLASS_WEIGHT: tl.constexpr = False,
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
        if HAS_CLASS_WEIGHT:
            c = tl.load(class_weight_ptr + vocab_start + cols, mask=in_row, other=0.0)
            grad = tl.where(is_target, a, 0.0) + b * c / vocab - (a + b) * p
        else:
            grad = tl.where(is_target, a, 0.0) + b / vocab - (a + b) * p
        if HAS_G:
            grad += tl.load(g_ptr + row) * p
        grad = grad * inv_temperature
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        grad = grad * logit_scale
        tl.store(ptrs, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


_STATS_BLOCK = 4096
_GRAD_BLOCK = 4096
_WEIGHTED = {"HAS_CLASS_WEIGHT": True}


def _grad_flags(g: torch.Tensor | None, class_weight: torch.Tensor | None) -> dict:
    """The constexpr flags of the options that are on (none: the plain kernel's launch)."""
    flags = {}
    if g is not None:
        flags["HAS_G"] = True
    if class_weight is not None:
        flags["HAS_CLASS_WEIGHT"] = True
    return flags


def _torch_transform(raw: torch.Tensor, logit_scale: float, softcap: float | None, temperature: float):
    z = raw.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


class RowStats:
    """Running softmax statistics of ``M`` rows, each ``(M,)`` fp32, folded one vocabulary slice at a time.

    With ``distribution=True`` it also folds ``sum_v exp(z_v - max) z_v`` and ``sum_v exp(2 (z_v - max))``
    for the entropy and ``log sum_v p_v^2`` (metrics; no gradient flows through them). With
    ``weighted=True``, ``weighted_logit_sum`` folds ``sum_v c_v z_v`` (``class_weight`` of the fold). With
    ``argmax=True``, ``argmax`` (int64) holds the vocabulary id of each row's first maximal logit.
    """

    def __init__(self, rows: int, device: torch.device, *, distribution: bool = False, weighted: bool = False,
                 argmax: bool = False) -> None:
        self.distribution = distribution
        self.argmax = torch.zeros(rows, device=device, dtype=torch.int64) if argmax else None
        self.weighted_logit_sum = torch.zeros(rows, device=device) if weighted else None
        self.running_max = torch.full((rows,), float("-inf"), device=device)
        self.sum_exp = torch.zeros(rows, device=device)
        self.target_logit = torch.zeros(rows, device=device)
        self.logit_sum = torch.zeros(rows, device=device)
        self.z_sum_exp = torch.zeros(rows, device=device)
        self.sq_sum_exp = torch.zeros(rows, device=device)

    def lse(self) -> torch.Tensor:
        """``log sum_v exp(z_v)`` per row, once every slice has been folded."""
        return self.running_max + torch.log(self.sum_exp)

    def entropy(self) -> torch.Tensor:
        """``-sum_v p_v log p_v = lse - sum_v p_v z_v`` per row (needs ``distribution=True``)."""
        return self.lse() - self.z_sum_exp / self.sum_exp

    def log_sum_sq_probs(self) -> torch.Tensor:
        """``log sum_v p_v^2`` per row (needs ``distribution=True``)."""
        return torch.log(self.sq_sum_exp) - 2.0 * torch.log(self.sum_exp)

    def is_top1(self) -> torch.Tensor:
        """Whether the target's logit is the largest of its row (bool)."""
        return self.target_logit >= self.running_max


def _fold_row_stats_(
    stats: RowStats, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, *, logit_scale: float,
    softcap: float | None, temperature: float, triton_path: bool, class_weight: torch.Tensor | None = None,
) -> None:
    """:meth:`RowPasses.fold` on the path ``triton_path`` says."""
    rows, n_cols = logits.shape
    if (class_weight is None) != (stats.weighted_logit_sum is None):
        raise ValueError("class_weight must be given exactly when the RowStats were built with weighted=True")
    if not triton_path:
        z = _torch_transform(logits, logit_scale, softcap, temperature)
        block_max, first = z.max(1)
        if stats.argmax is not None:  # torch.max returns the first maximal index; later slices need a larger max
            stats.argmax.copy_(torch.where(block_max > stats.running_max, first + vocab_start, stats.argmax))
        new_max = torch.maximum(stats.running_max, block_max)
        rescale = torch.exp(stats.running_max - new_max)
        e = torch.exp(z - new_max[:, None])
        stats.sum_exp.mul_(rescale).add_(e.sum(1))
        if stats.distribution:
            stats.z_sum_exp.mul_(rescale).add_((e * z).sum(1))
            stats.sq_sum_exp.mul_(rescale * rescale).add_((e * e).sum(1))
        stats.running_max.copy_(new_max)
        stats.logit_sum.add_(z.sum(1))
        if class_weight is not None:
            # element-wise, not a matmul: autocast would round a product to bf16
            stats.weighted_logit_sum.add_((z * class_weight[vocab_start : vocab_start + n_cols]).sum(1))
        local = target - vocab_start
        inside = (local >= 0) & (local < n_cols)
        picked = z.gather(1, local.clamp(0, n_cols - 1)[:, None]).squeeze(1)
        stats.target_logit.copy_(torch.where(inside, picked, stats.target_logit))
        return
    _row_stats_kernel[(rows,)](
        logits, logits.stride(0), target, stats.running_max, stats.sum_exp, stats.target_logit, stats.logit_sum,
        stats.z_sum_exp, stats.sq_sum_exp,
        # unused pointers when off (the constexpr flag removes their loads)
        stats.logit_sum if class_weight is None else stats.weighted_logit_sum,
        stats.logit_sum if class_weight is None else class_weight,
        vocab_start, n_cols, float(logit_scale), float(softcap or 1.0), 1.0 / temperature,
        stats.running_max if stats.argmax is None else stats.argmax,  # unused pointer when off
        HAS_SOFTCAP=softcap is not None, DISTRIBUTION=stats.distribution,
        BLOCK=min(_STATS_BLOCK, triton.next_power_of_2(n_cols)), **({} if class_weight is None else _WEIGHTED),
        **({"ARGMAX": True} if stats.argmax is not None else {}),
    )


def _row_grad_(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
    vocab_start: int, vocab: int, logit_scale: float, softcap: float | None, temperature: float, triton_path: bool,
    g: torch.Tensor | None = None, class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """:meth:`RowPasses.grad` on the path ``triton_path`` says."""
    rows, n_cols = logits.shape
    if not triton_path:
        raw = logits.float() * logit_scale
        tanh = torch.tanh(raw / softcap) if softcap is not None else None
        z = (softcap * tanh if tanh is not None else raw) / temperature
        p = torch.exp(z - lse[:, None])
        if class_weight is None:
            grad = (b / vocab)[:, None] - (a + b)[:, None] * p
        else:
            grad = (b / vocab)[:, None] * class_weight[vocab_start : vocab_start + n_cols] - (a + b)[:, None] * p
        if g is not None:
            grad += g[:, None] * p
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
        lse if g is None else g, lse if class_weight is None else class_weight,  # unused pointers when off
        vocab_start, n_cols, vocab, float(logit_scale), float(softcap or 1.0), 1.0 / temperature,
        HAS_SOFTCAP=softcap is not None, BLOCK=block, **_grad_flags(g, class_weight),
    )
    return logits


@dataclass(frozen=True)
class RowPasses:
    """The two row passes of one call: the Triton kernels or their PyTorch twins, picked once per call
    (``triton``), with the call's logit transform bound (``z = softcap * tanh(logit_scale * raw / softcap)
    / temperature``, no tanh when ``softcap`` is None)."""

    triton: bool
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def fold(
        self, stats: RowStats, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, *,
        class_weight: torch.Tensor | None = None,
    ) -> None:
        """Fold the logits ``(M, Vc)`` of vocabulary ids ``[vocab_start, vocab_start + Vc)`` into ``stats``.

        ``target (M,)`` holds vocabulary ids in ``[0, V)``; a row's target logit is taken from the slice
        that contains it. ``class_weight``: ``(V,)`` fp32 (all classes), folded into
        ``stats.weighted_logit_sum`` (the stats must be built with ``weighted=True``).
        """
        _fold_row_stats_(stats, logits, target, vocab_start, class_weight=class_weight, **self._transform())

    def grad(
        self, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
        vocab_start: int, vocab: int, g: torch.Tensor | None = None, class_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Overwrite ``logits (M, Vc)`` with the gradient of ``a * log p[target] + b * mean_v log p`` per row.

        The columns are vocabulary ids ``[vocab_start, vocab_start + Vc)`` of a vocabulary of ``vocab``;
        ``lse``, ``a`` and ``b`` are ``(M,)`` fp32. Options: ``g (M,)`` fp32 adds ``g_i * p_iv``;
        ``class_weight (V,)`` fp32 turns the ``b_i / V`` term into ``b_i * c_v / V``. Returns ``logits``,
        now holding the gradient with respect to the raw (untransformed) logits, in the logits' dtype.
        """
        return _row_grad_(logits, target, lse, a, b, vocab_start=vocab_start, vocab=vocab, g=g,
                          class_weight=class_weight, **self._transform())

    def _transform(self) -> dict:
        return dict(logit_scale=self.logit_scale, softcap=self.softcap, temperature=self.temperature,
                    triton_path=self.triton)
