"""Per-sequence log-probabilities from hidden states, through the fused base (no logits).

Every preference loss reduces its rows to these statistics and applies its objective to them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels.linear_logprobs import LogitOptions, linear_token_objective

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
    *,
    names: tuple[str, str, str, str] = POLICY_NAMES,
) -> SequenceStats:
    """Reduce ``hidden (R, T, H)`` and ``target (R, T)`` to :class:`SequenceStats` through the fused base.

    ``names``: the caller's names of ``(hidden, weight, target, bias)``, used in the error messages.
    """
    rows, length, width = hidden.shape
    logps, logit_mean, *_ = linear_token_objective(
        hidden.reshape(rows * length, width), weight, target.reshape(-1), bias, alpha=1.0, beta=0.0, opts=opts,
        names=names,
    )
    valid = (target != opts.ignore_index).float()
    return SequenceStats(
        sum_logps=logps.view(rows, length).sum(1),
        n_tokens=valid.sum(1),
        logit_sum=logit_mean.view(rows, length).sum(1),
    )
