"""Per-sequence log-probabilities from hidden states, through the fused base (no logits).

Every preference loss reduces its rows to these statistics and applies its objective to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..kernels import check_linear_inputs
from ..kernels.head.linear_logprobs import LogitOptions, linear_token_objective
from ..kernels.head.sequence_objective import sequence_objective, sequence_strategy

#: The losses' names of ``(hidden, weight, target, bias)``, as their error messages spell them.
POLICY_NAMES = ("hidden", "lin_weight", "target", "bias")


class SequenceStats(NamedTuple):
    """Per-row statistics of ``R`` sequences, each ``(R,)`` fp32.

    ``sum_logps``: sum over the row's valid tokens of ``log p(target)`` (differentiable).
    ``n_tokens``: number of valid tokens (no gradient).
    ``logit_sum``: sum over valid tokens of the vocabulary-mean logit (no gradient); a batch's
    "logits mean" metric is ``logit_sum.sum() / n_tokens.sum()``.
    """

    sum_logps: torch.Tensor
    n_tokens: torch.Tensor
    logit_sum: torch.Tensor

    def mean_logps(self) -> torch.Tensor:
        """Average log-prob per valid token, 0 for an all-masked row."""
        return self.sum_logps / self.n_tokens.clamp(min=1)


def check_rows(
    hidden: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *, paired: bool,
    names: tuple[str, str] = ("hidden", "target"),
) -> None:
    """hidden ``(R, T, H)``, target ``(R, T)``; ``R`` even when ``paired`` (chosen rows, then rejected).

    ``names``: the caller's names of ``(hidden, target)`` (e.g. ``kl_hidden``, ``kl_target``).
    """
    h_name, t_name = names
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"{h_name} must have shape (R, T, H), got {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(target, torch.Tensor) or target.shape != hidden.shape[:2]:
        raise ValueError(
            f"{t_name} must have shape (R, T) = {tuple(hidden.shape[:2])} like {h_name}, "
            f"got {tuple(getattr(target, 'shape', ()))}"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"lin_weight must have shape (V, H) with H={hidden.shape[2]}, got {tuple(getattr(weight, 'shape', ()))}"
        )
    if hidden.shape[0] == 0:
        raise ValueError(f"{h_name} is empty: expected at least one row")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{t_name} must be an integer tensor (int64), got dtype {target.dtype}")
    if paired and hidden.shape[0] % 2:
        raise ValueError(
            f"{h_name} must hold 2B rows (B chosen, then B rejected), got an odd number of rows: {hidden.shape[0]}"
        )


def sequence_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogitOptions,
) -> SequenceStats:
    """Reduce ``hidden (R, T, H)`` and ``target (R, T)`` to :class:`SequenceStats` through the fused base.

    The caller has checked the inputs under its own argument names (:func:`check_linear_inputs`).
    """
    rows, length, width = hidden.shape
    logps, logit_mean, *_ = linear_token_objective(
        hidden.reshape(rows * length, width), weight, target.reshape(-1), bias, target_weight=1.0, mean_weight=0.0,
        opts=opts,
    )
    valid = (target != opts.ignore_index).float()
    return SequenceStats(
        sum_logps=logps.view(rows, length).sum(1),
        n_tokens=valid.sum(1),
        logit_sum=logit_mean.view(rows, length).sum(1),
    )


#: A loss of per-row statistics: ``objective(stats) -> (0-d loss, detached metrics)``.
StatsObjective = Callable[[SequenceStats], tuple[torch.Tensor, dict[str, Any]]]


def fused_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogitOptions,
    objective: StatsObjective,
    *,
    row_groups: tuple[int, ...],
    separable: bool,
    strategy: str = "auto",
    metrics: Callable[[SequenceStats, dict[str, Any]], dict[str, Any]] | None = None,
    names: tuple[str, str, str, str] = POLICY_NAMES,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``objective`` of the statistics of ``hidden (R, T, H)``, ``target (R, T)``, by the 3- or the 4-product path.

    ``row_groups`` ``(R,)``: the group of each row (rows whose gradients couple: a pair, ORPO's chosen
    row with its NLL rows); ``separable``: whether ``objective`` is a sum over those groups (given the
    token counts, which are known up front) — only then can the gradient be formed chunk by chunk
    (:mod:`liger_align.kernels.head.sequence_objective`). ``strategy``: ``"auto"`` (by memory, see
    :func:`~liger_align.kernels.head.sequence_objective.sequence_strategy`), ``"grad_in_forward"`` (3 products)
    or ``"recompute"`` (4 products, any objective, several backwards allowed). ``metrics(stats, out)``
    (optional) completes ``objective``'s detached outputs once, after the pass: the place for metrics that
    would cost a host synchronisation (boolean indexing), since the 3-product path evaluates ``objective``
    once per chunk.
    """
    check_linear_inputs(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), bias, names=names)
    group_rows = max(row_groups.count(g) for g in set(row_groups)) if row_groups else 1
    path = sequence_strategy(strategy, hidden, weight, separable=separable, group_rows=group_rows, opts=opts)
    if path == "recompute":
        stats = sequence_stats(hidden, weight, target, bias, opts)
        loss, out = objective(stats)
        return loss, out if metrics is None else metrics(stats, out)

    def loss_of(sums: torch.Tensor, n_tokens: torch.Tensor, logit_sum: torch.Tensor) -> torch.Tensor:
        return objective(SequenceStats(sums, n_tokens, logit_sum))[0]

    loss, sums, n_tokens, logit_sum = sequence_objective(
        hidden, weight, target, bias, objective=loss_of, row_groups=row_groups, opts=opts
    )
    stats = SequenceStats(sums, n_tokens, logit_sum)
    with torch.no_grad():
        _, out = objective(stats)
    return loss, out if metrics is None else metrics(stats, out)
