"""ORPO: Monolithic Preference Optimization without Reference Model (Hong et al., 2024, arXiv:2403.07691).

``loss = NLL(chosen) - beta * mean_b log sigmoid(log_odds_b)`` with
``log_odds = (c - r) - (log(1 - exp(c)) - log(1 - exp(r)))`` on the *average* per-token log-probs
``c``, ``r`` of the chosen and rejected completions, as TRL 1.16's ``ORPOTrainer`` computes it.

The clamp: ``log(1 - exp(x))`` is ``-inf`` at ``x = 0`` (a completion of probability 1, e.g. any
completion when V = 1) and its derivative ``-1 / (1 - exp(-x))`` diverges as ``x -> 0``, so TRL's
form gives an infinite log-odds, a NaN loss and NaN gradients there. Here the argument of
``log(1 - exp(.))`` is clamped to at most :data:`LOG1MEXP_MAX` ``= -1e-6``: below it (every
realistic mean log-prob: ``p < 0.999999``) the value is TRL's to fp32 rounding; above it each odds
is capped at ``1e6`` (a log-odds of at most about 13.8 in magnitude) and only the ``c - r`` term
carries gradient, so loss and gradients stay finite.

``compute_nll_loss=False`` (Liger-Kernel's option) drops the NLL term: ``loss = -beta * mean_b log
sigmoid(log_odds_b)``; the ``nll_loss`` metric is still reported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from typing_extensions import Unpack

from .._checks import check_flag, check_non_negative
from .._tokens import IGNORE_INDEX
from ._module import FusedLossModule
from ._paired import LogitKwargs, logit_options, logits_mean, sequence_logps, split_pairs
from ._sequences import SequenceStats, check_rows, fused_sequence_loss

#: Largest argument of :func:`log1mexp` (see the module docstring): ``log(1 - exp(-1e-6)) ~ -13.8``.
LOG1MEXP_MAX = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2``, with ``x`` clamped to ``<= -1e-6``.

    The clamp (:data:`LOG1MEXP_MAX`) keeps the value and the gradient finite at and near ``x = 0``;
    above it the gradient is 0. Both branches of the ``where`` are finite, so no NaN leaks into the
    gradient of the branch not taken.
    """
    x = x.clamp(max=LOG1MEXP_MAX)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def check_orpo_config(beta: float) -> float:
    """``beta`` (ORPO's ``lambda``, the odds-ratio weight; 0 is plain SFT) as a finite float ``>= 0``."""
    return check_non_negative("beta", beta)


def orpo_objective(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_loss: torch.Tensor,
    *,
    beta: float,
    pair_mask: torch.Tensor | None = None,
    compute_nll_loss: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO's loss from per-sequence average log-probs.

    Args:
        chosen_logps, rejected_logps: ``(B,)`` average log-prob per completion token (negative).
        nll_loss: 0-d cross-entropy of the chosen sequences (averaged over their tokens).
        beta: weight ``lambda`` of the odds-ratio term.
        pair_mask: ``(B,)`` bool; pairs marked False (a row with no valid token) add 0 to the loss
            and get no gradient instead of an infinite log-odds.
        compute_nll_loss: False leaves ``nll_loss`` out of the loss (it stays in the metrics).

    Returns:
        ``(loss, metrics)``: 0-d ``loss = nll_loss - beta * mean_b log sigmoid(log_odds_b)`` (without
        ``nll_loss`` when ``compute_nll_loss`` is False); metrics
        (detached) ``nll_loss``, ``log_odds_ratio`` (mean log sigmoid), ``log_odds_chosen`` (mean
        log-odds), ``chosen_rewards`` and ``rejected_rewards`` ``(B,) = beta * logps``.
    """
    beta = check_orpo_config(beta)
    compute_nll_loss = check_flag("compute_nll_loss", compute_nll_loss)
    chosen, rejected = chosen_logps.float(), rejected_logps.float()
    if pair_mask is not None:
        chosen = torch.where(pair_mask, chosen, torch.full_like(chosen, -1.0))
        rejected = torch.where(pair_mask, rejected, torch.full_like(rejected, -1.0))
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    if pair_mask is not None:
        ratio = torch.where(pair_mask, ratio, torch.zeros_like(ratio))
        log_odds = torch.where(pair_mask, log_odds, torch.zeros_like(log_odds))
    loss = (nll_loss if compute_nll_loss else 0.0) - beta * ratio.mean()
    metrics = {
        "nll_loss": nll_loss.detach(),
        "log_odds_ratio": ratio.mean().detach(),
        "log_odds_chosen": log_odds.mean().detach(),
        "chosen_rewards": beta * chosen_logps.detach().float(),
        "rejected_rewards": beta * rejected_logps.detach().float(),
    }
    return loss, metrics


def fused_linear_orpo_loss(
    hidden: torch.Tensor,
    lin_weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    nll_target: torch.Tensor | None = None,
    beta: float = 0.1,
    compute_nll_loss: bool = True,
    **logit_kwargs: Unpack[LogitKwargs],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO on ``hidden @ lin_weight.T + bias`` without materialising the logits.

    Args:
        hidden: ``(2B, T, H)``, the B chosen rows first, then the B rejected rows.
        lin_weight: ``(V, H)`` lm_head weight; bias ``(V,)`` or None.
        target: ``(2B, T)`` integer, already shifted; ``ignore_index`` on prompt and padding.
        nll_target: ``(B, T)`` (or ``(2B, T)``, of which the chosen half is used) targets of the NLL
            term; TRL's trainer uses prompt + completion there. Default: the chosen half of ``target``.
        beta: weight of the odds-ratio term.
        compute_nll_loss: False drops the NLL term from the loss; the ``nll_loss`` metric is still
            reported (from ``nll_target`` when given, whose extra rows are then computed for it alone).
        **logit_kwargs: the logit keywords of :class:`~liger_align.losses._paired.LogitKwargs`: ``ignore_index``,
            ``temperature``, ``softcap``, ``logit_scale``, ``chunk_bytes``, ``impl``, ``strategy``.

    Returns:
        ``(loss, out)``: 0-d fp32 loss and detached metrics: ``chosen_logps``, ``rejected_logps``
        ``(B,)`` (average log-probs), ``chosen_logits_mean``, ``rejected_logits_mean`` (over valid
        tokens only, by design; Liger-Kernel's average every position) and those of :func:`orpo_objective`.
    """
    check_rows(hidden, target, lin_weight, paired=True)
    beta = check_orpo_config(beta)
    compute_nll_loss = check_flag("compute_nll_loss", compute_nll_loss)
    opts, strategy = logit_options(**logit_kwargs)
    half = hidden.shape[0] // 2
    rows_hidden, rows_target = hidden, target
    if nll_target is not None:
        nll_target = _chosen_nll_target(nll_target, target, half)
        # One pass over [policy rows | chosen rows with the NLL-only tokens | chosen rows with the
        # policy-only tokens]: tokens shared by target and nll_target are computed once.
        chosen_target = target[:half]
        extra = torch.where(nll_target != chosen_target, nll_target, opts.ignore_index)
        missing = torch.where(nll_target != chosen_target, chosen_target, opts.ignore_index)
        rows_hidden = torch.cat((hidden, hidden[:half], hidden[:half]))
        rows_target = torch.cat((target, extra, missing))
        nll_count = (nll_target != opts.ignore_index).sum().float()

    def objective(stats: SequenceStats) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = split_pairs(SequenceStats(*(t[: 2 * half] for t in stats)))
        if nll_target is None:
            nll_sum, count = policy.chosen.sum_logps.sum(), policy.chosen.n_tokens.sum()
        else:
            sums = stats.sum_logps
            nll_sum, count = sums[:half].sum() + sums[2 * half : 3 * half].sum() - sums[3 * half :].sum(), nll_count
        nll_loss = -nll_sum / count.clamp(min=1)
        chosen_logps, rejected_logps = sequence_logps(policy.chosen, True), sequence_logps(policy.rejected, True)
        pair_mask = (policy.chosen.n_tokens > 0) & (policy.rejected.n_tokens > 0)
        loss, metrics = orpo_objective(
            chosen_logps, rejected_logps, nll_loss, beta=beta, pair_mask=pair_mask, compute_nll_loss=compute_nll_loss
        )
        return loss, {
            "chosen_logps": chosen_logps.detach(),
            "rejected_logps": rejected_logps.detach(),
            "chosen_logits_mean": logits_mean(policy.chosen),
            "rejected_logits_mean": logits_mean(policy.rejected),
            **metrics,
        }

    # Separable over pairs: a pair's gradient needs its two rows (and its NLL rows) and batch-wide counts only.
    groups = tuple(range(half)) * (rows_hidden.shape[0] // half)
    return fused_sequence_loss(
        rows_hidden, lin_weight, rows_target, bias, opts, objective, row_groups=groups, separable=True,
        strategy=strategy,
    )


def _chosen_nll_target(nll_target: torch.Tensor, target: torch.Tensor, half: int) -> torch.Tensor:
    """The ``(B, T)`` NLL targets of the chosen rows, from ``nll_target`` of shape ``(B, T)`` or ``(2B, T)``."""
    shapes = ((half, target.shape[1]), tuple(target.shape))
    if not isinstance(nll_target, torch.Tensor) or tuple(nll_target.shape) not in shapes:
        raise ValueError(
            f"nll_target must have shape (B, T) = {shapes[0]} or (2B, T) = {shapes[1]}, "
            f"got {tuple(getattr(nll_target, 'shape', ()))}"
        )
    if nll_target.dtype.is_floating_point or nll_target.dtype == torch.bool:
        raise TypeError(f"nll_target must be an integer tensor, got dtype {nll_target.dtype}")
    return nll_target[:half].to(device=target.device, dtype=target.dtype)


class LigerFusedLinearORPOLoss(FusedLossModule):
    """ORPO (Hong et al., 2024) on the lm_head output, without materialising the logits.

    ``loss_fn(lin_weight, hidden, target, bias=None, *, nll_target=None) -> (loss, out)``; see
    :func:`fused_linear_orpo_loss` for shapes and outputs.
    """

    def __init__(
        self,
        beta: float = 0.1,
        ignore_index: int = IGNORE_INDEX,
        *,
        compute_nll_loss: bool = True,
        **logit_kwargs: Unpack[LogitKwargs],
    ) -> None:
        super().__init__(
            dict(beta=check_orpo_config(beta), compute_nll_loss=check_flag("compute_nll_loss", compute_nll_loss)),
            ignore_index=ignore_index, **logit_kwargs,
        )

    def forward(
        self,
        lin_weight: torch.Tensor,
        hidden: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        nll_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fused_linear_orpo_loss(
            hidden, lin_weight, target, bias, nll_target=nll_target, **self.config, **self.logit_kwargs
        )

