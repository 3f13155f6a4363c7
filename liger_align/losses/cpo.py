"""CPO: Contrastive Preference Optimization (Xu et al., 2024, arXiv:2401.08417), SimPO and AlphaPO.

As TRL 1.16's ``CPOTrainer``: with ``u = logp_c - logp_r`` (or, for AlphaPO with ``alpha != 0``,
``u = r_c - r_r``, ``r = (1 - p^-alpha) / alpha``), ``eps = label_smoothing``:

- ``sigmoid``: ``-(1 - eps) log sigmoid(beta u) - eps log sigmoid(-beta u)`` (summed log-probs);
- ``hinge``: ``relu(1 - beta u)`` (summed); ``ipo``: ``(u - 1 / (2 beta))^2`` (averaged);
- ``simpo`` (SimPO, Meng et al., 2024, arXiv:2405.14734): ``sigmoid`` on ``u - gamma / beta`` (averaged);
- ``alphapo`` (AlphaPO, arXiv:2501.03884): ``simpo`` with ``cpo_alpha = 0`` (set ``alpha`` too).

``loss = mean_b loss_b + cpo_alpha * NLL(chosen)``, the NLL averaged over the chosen completion tokens.

``average_log_prob`` (Liger-Kernel's option) chooses the per-sequence log-probs: None (the default) keeps
TRL's convention above (averages for ``ipo``/``simpo``/``alphapo``, sums for ``sigmoid``/``hinge``); True
averages and False sums for every loss type. SimPO's own entry points default to True (False sums).
The NLL term is a token average either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from typing_extensions import Unpack

from .._checks import check_choice, check_flag, check_non_negative, check_positive, check_real
from .._tokens import IGNORE_INDEX
from ._module import FusedLossModule
from ._paired import (
    LogitKwargs,
    logit_options,
    logits_mean,
    sequence_logps,
    split_pairs,
    token_mean_nll,
)
from ._sequences import SequenceStats, check_rows, fused_sequence_loss

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def cpo_config(loss_type: str, cpo_alpha: float) -> tuple[str, float]:
    """``(loss_type, cpo_alpha)`` after validation; ``alphapo`` becomes ``simpo`` with ``cpo_alpha = 0`` as in TRL."""
    check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    cpo_alpha = check_non_negative("cpo_alpha", cpo_alpha)
    return ("simpo", 0.0) if loss_type == "alphapo" else (loss_type, cpo_alpha)


def check_cpo_config(
    *, beta: float, loss_type: str, cpo_alpha: float, label_smoothing: float, simpo_gamma: float, alpha: float
) -> dict[str, Any]:
    """Every CPO-family setting checked (``ValueError`` naming it) and normalised; ``alphapo`` as :func:`cpo_config`.

    ``beta > 0`` (``ipo`` and ``simpo`` divide by it), ``label_smoothing`` in ``[0, 1]``, ``cpo_alpha >= 0``,
    ``simpo_gamma`` and ``alpha`` finite.
    """
    loss_type, cpo_alpha = cpo_config(loss_type, cpo_alpha)
    return dict(
        beta=check_positive("beta", beta, context=f" for loss_type {loss_type!r}"),
        loss_type=loss_type,
        cpo_alpha=cpo_alpha,
        label_smoothing=check_real("label_smoothing", label_smoothing, low=0.0, high=1.0),
        simpo_gamma=check_real("simpo_gamma", simpo_gamma),
        alpha=check_real("alpha", alpha),
    )


def cpo_averages_logps(loss_type: str, average_log_prob: bool | None = None) -> bool:
    """Whether the loss reads per-token average log-probs rather than sums.

    ``average_log_prob``: True or False decides; None (``ValueError``/``TypeError`` for anything else) takes
    ``loss_type``'s TRL convention: averages for ``ipo`` and ``simpo`` (``alphapo``), sums otherwise.
    """
    if average_log_prob is not None:
        return check_flag("average_log_prob", average_log_prob)
    return loss_type in ("ipo", "simpo", "alphapo")


def cpo_objective(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_loss: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPO-family loss from per-sequence log-probs (averaged for ``ipo``/``simpo``, summed otherwise).

    Args:
        chosen_logps, rejected_logps: ``(B,)``, see :func:`cpo_averages_logps`.
        nll_loss: 0-d NLL of the chosen tokens (ignored when ``cpo_alpha == 0``).
        beta, loss_type, cpo_alpha, label_smoothing, simpo_gamma, alpha: as in TRL's ``CPOConfig``.

    Returns:
        ``(loss, metrics)``: 0-d ``mean_b loss_b + cpo_alpha * nll_loss``; metrics (detached)
        ``nll_loss`` (0 when ``cpo_alpha == 0``), ``chosen_rewards``, ``rejected_rewards`` ``(B,)``
        (``beta * logps``, or ``beta * r`` for AlphaPO).
    """
    config = check_cpo_config(
        beta=beta, loss_type=loss_type, cpo_alpha=cpo_alpha, label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma, alpha=alpha,
    )
    beta, loss_type, cpo_alpha = config["beta"], config["loss_type"], config["cpo_alpha"]
    label_smoothing, simpo_gamma, alpha = config["label_smoothing"], config["simpo_gamma"], config["alpha"]
    c, r = chosen_logps.float(), rejected_logps.float()
    if alpha != 0.0:
        # AlphaPO reward r = (1 - p^-alpha) / alpha, written with expm1 for accuracy
        c = -torch.expm1(-alpha * c) / alpha
        r = -torch.expm1(-alpha * r) / alpha
    u = c - r
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            u = u - simpo_gamma / beta
        losses = -F.logsigmoid(beta * u) * (1 - eps) - F.logsigmoid(-beta * u) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * u)
    else:  # ipo
        losses = (u - 1 / (2 * beta)) ** 2
    nll = nll_loss if cpo_alpha != 0 else torch.zeros_like(losses[0])
    loss = losses.mean() + cpo_alpha * nll
    metrics = {
        "nll_loss": nll.detach(),
        "chosen_rewards": beta * c.detach(),
        "rejected_rewards": beta * r.detach(),
    }
    return loss, metrics


def fused_linear_cpo_loss(
    hidden: torch.Tensor,
    lin_weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    cpo_alpha: float = 1.0,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    average_log_prob: bool | None = None,
    **logit_kwargs: Unpack[LogitKwargs],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPO / SimPO / AlphaPO on ``hidden @ lin_weight.T + bias`` without materialising the logits.

    Args:
        hidden: ``(2B, T, H)``, B chosen rows then B rejected rows; target ``(2B, T)`` already shifted.
        lin_weight: ``(V, H)``; bias ``(V,)`` or None.
        beta, loss_type, cpo_alpha, label_smoothing, simpo_gamma, alpha: see :func:`cpo_objective`.
        average_log_prob: None (the loss type's TRL convention), True (averages) or False (sums); see
            :func:`cpo_averages_logps`.
        **logit_kwargs: the logit keywords of :class:`~liger_align.losses._paired.LogitKwargs`: ``ignore_index``,
            ``temperature``, ``softcap``, ``logit_scale``, ``chunk_bytes``, ``impl``, ``strategy``.

    Returns:
        ``(loss, out)``: 0-d fp32 loss and detached metrics ``chosen_logps``, ``rejected_logps`` ``(B,)``
        (averaged or summed as the loss reads them), ``chosen_logits_mean``, ``rejected_logits_mean``
        (over valid tokens only, by design; Liger-Kernel's average every position) and those of
        :func:`cpo_objective`.
    """
    check_rows(hidden, target, lin_weight, paired=True)
    config = check_cpo_config(
        beta=beta, loss_type=loss_type, cpo_alpha=cpo_alpha, label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma, alpha=alpha,
    )
    average = cpo_averages_logps(config["loss_type"], average_log_prob)
    opts, strategy = logit_options(**logit_kwargs)
    def objective(stats: SequenceStats) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = split_pairs(stats)
        chosen_logps = sequence_logps(policy.chosen, average)
        rejected_logps = sequence_logps(policy.rejected, average)
        loss, metrics = cpo_objective(chosen_logps, rejected_logps, token_mean_nll(policy.chosen), **config)
        return loss, {
            "chosen_logps": chosen_logps.detach(),
            "rejected_logps": rejected_logps.detach(),
            "chosen_logits_mean": logits_mean(policy.chosen),
            "rejected_logits_mean": logits_mean(policy.rejected),
            **metrics,
        }

    half = hidden.shape[0] // 2
    return fused_sequence_loss(
        hidden, lin_weight, target, bias, opts, objective, row_groups=tuple(range(half)) * 2, separable=True,
        strategy=strategy,
    )


def fused_linear_simpo_loss(
    hidden: torch.Tensor,
    lin_weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    average_log_prob: bool = True,
    **logit_kwargs: Unpack[LogitKwargs],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al., 2024): ``-log sigmoid(beta (avg_logp_c - avg_logp_r) - gamma)``, no reference, no NLL.

    The same as :func:`fused_linear_cpo_loss` with ``loss_type="simpo"``, ``cpo_alpha=0`` and
    ``simpo_gamma=gamma``; shapes and outputs as there. ``average_log_prob=False`` uses summed log-probs.
    """
    return fused_linear_cpo_loss(
        hidden, lin_weight, target, bias, beta=beta, loss_type="simpo", cpo_alpha=0.0,
        label_smoothing=label_smoothing, simpo_gamma=gamma,
        average_log_prob=check_flag("average_log_prob", average_log_prob), **logit_kwargs,
    )


class LigerFusedLinearCPOLoss(FusedLossModule):
    """CPO (Xu et al., 2024), SimPO and AlphaPO as in TRL's ``CPOTrainer``, without materialising the logits.

    ``loss_fn(lin_weight, hidden, target, bias=None) -> (loss, out)``; see :func:`fused_linear_cpo_loss`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        cpo_alpha: float = 1.0,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        alpha: float = 0.0,
        *,
        average_log_prob: bool | None = None,
        ignore_index: int = IGNORE_INDEX,
        **logit_kwargs: Unpack[LogitKwargs],
    ) -> None:
        config = check_cpo_config(
            beta=beta, loss_type=loss_type, cpo_alpha=cpo_alpha, label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma, alpha=alpha,
        )
        cpo_averages_logps(config["loss_type"], average_log_prob)  # checked here, at construction
        super().__init__(
            dict(config, average_log_prob=average_log_prob),
            ignore_index=ignore_index, **logit_kwargs,
        )

    def forward(
        self, lin_weight: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fused_linear_cpo_loss(hidden, lin_weight, target, bias, **self.config, **self.logit_kwargs)


class LigerFusedLinearSimPOLoss(FusedLossModule):
    """SimPO (Meng et al., 2024, arXiv:2405.14734) without materialising the logits.

    ``loss_fn(lin_weight, hidden, target, bias=None) -> (loss, out)``; see :func:`fused_linear_simpo_loss`.
    """

    def __init__(
        self,
        beta: float = 2.0,
        gamma: float = 0.5,
        label_smoothing: float = 0.0,
        *,
        average_log_prob: bool = True,
        ignore_index: int = IGNORE_INDEX,
        **logit_kwargs: Unpack[LogitKwargs],
    ) -> None:
        config = check_cpo_config(
            beta=beta, loss_type="simpo", cpo_alpha=0.0, label_smoothing=label_smoothing, simpo_gamma=gamma, alpha=0.0
        )
        super().__init__(
            dict(
                beta=config["beta"], gamma=config["simpo_gamma"], label_smoothing=config["label_smoothing"],
                average_log_prob=check_flag("average_log_prob", average_log_prob),
            ),
            ignore_index=ignore_index, **logit_kwargs,
        )

    def forward(
        self, lin_weight: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fused_linear_simpo_loss(hidden, lin_weight, target, bias, **self.config, **self.logit_kwargs)

