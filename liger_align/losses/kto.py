"""KTO: Model Alignment as Prospect Theoretic Optimization (Ethayarajh et al., 2024, arXiv:2402.01306).

Unpaired: each row is a desirable or an undesirable completion. As TRL 1.16's ``KTOTrainer``, with
``rho = logp - ref_logp`` (summed completion log-probs) and ``z`` the batch's KL estimate:

- ``kto``: desirable ``1 - sigmoid(beta (rho - z))``, undesirable ``1 - sigmoid(beta (z - rho))``;
- ``apo_zero_unpaired`` (APO, arXiv:2408.06266): desirable ``1 - sigmoid(beta rho)``, undesirable
  ``sigmoid(beta rho)`` (no KL term);

weighted by ``desirable_weight`` / ``undesirable_weight`` and averaged over all rows.

``average_log_prob=True`` (Liger-Kernel's option; default False, TRL's sums) makes every sequence
log-prob the average over its valid tokens: the policy's and ``ref_hidden``'s, and the KL rows' (policy
and ``ref_kl_hidden``). Precomputed ``ref_logps``, ``ref_kl_logps`` and ``kl`` are used as given.
A precomputed ``kl`` is clamped at 0 as TRL does (Liger-Kernel uses it unclamped).

Who uses this module: custom training loops. ``LigerKTOTrainer`` does not: it runs TRL's own
KTO loss code over our per-token log-probs (:func:`liger_align.kernels.head.linear_logprobs`, through TRL's
fused-LM-head protocol); see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import Unpack

from .._checks import check_choice, check_flag, check_non_negative, check_positive, check_real
from .._tokens import IGNORE_INDEX
from ..kernels import check_linear_inputs
from ..kernels.head.linear_logprobs import LogitOptions
from ._module import FusedLossModule
from ._paired import (
    LogitKwargs,
    check_vector,
    logit_options,
    logits_mean,
    reference_logps,
    sequence_logps,
)
from ._sequences import SequenceStats, check_rows, fused_sequence_loss, sequence_stats

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def check_kto_config(
    *, beta: float, desirable_weight: float, undesirable_weight: float, loss_type: str
) -> dict[str, Any]:
    """The KTO settings checked (``ValueError`` naming the setting) and normalised.

    ``beta > 0``, ``desirable_weight`` and ``undesirable_weight`` finite and ``>= 0``, ``loss_type`` one of
    :data:`KTO_LOSS_TYPES`.
    """
    return dict(
        beta=check_positive("beta", beta),
        desirable_weight=check_non_negative("desirable_weight", desirable_weight),
        undesirable_weight=check_non_negative("undesirable_weight", undesirable_weight),
        loss_type=check_choice("loss_type", loss_type, KTO_LOSS_TYPES),
    )


def check_kl(kl: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    """The KL estimate ``z`` as a detached 0-d fp32 tensor on ``device`` (None: 0).

    A number must be finite; a tensor must hold one value (the batch's estimate, not one per row).
    """
    if kl is None:
        return torch.zeros((), device=device)
    if isinstance(kl, torch.Tensor):
        if kl.numel() != 1:
            raise ValueError(
                f"kl must be a scalar (a float or a 0-d tensor: the batch's KL estimate), "
                f"got a tensor of shape {tuple(kl.shape)}"
            )
        if kl.is_complex() or kl.dtype == torch.bool:
            raise TypeError(f"kl must be a real scalar, got dtype {kl.dtype}")
        return kl.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(check_real("kl", kl), device=device)


def kto_objective(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    preference_labels: torch.Tensor,
    *,
    beta: float = 0.1,
    kl: torch.Tensor | float | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO-family loss from per-row summed log-probs.

    Args:
        logps, ref_logps: ``(R,)`` policy and reference (no gradient) completion log-probs.
        preference_labels: ``(R,)`` bool (or 0/1): True for a desirable completion.
        kl: the KL estimate ``z`` (0-d or float, used without gradient, clamped at 0 as TRL does, by
            design unlike Liger-Kernel, which uses it unclamped); None means 0. Unused by ``apo_zero_unpaired``.
        beta, desirable_weight, undesirable_weight, loss_type: as in TRL's ``KTOConfig``.

    Returns:
        ``(loss, metrics)``: 0-d mean over the R rows of the weighted per-row losses; metrics (detached)
        ``rewards = beta * rho`` ``(R,)`` and ``kl`` (0-d).
    """
    config = check_kto_config(
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, loss_type=loss_type
    )
    beta, desirable_weight = config["beta"], config["desirable_weight"]
    undesirable_weight = config["undesirable_weight"]
    desirable = preference_labels.to(device=logps.device, dtype=torch.bool)
    rho = logps.float() - ref_logps.float()
    z = check_kl(kl, logps.device)
    z = z.clamp(min=0) if loss_type == "kto" else torch.zeros_like(z)
    if loss_type == "kto":
        desirable_loss = 1 - torch.sigmoid(beta * (rho - z))
        undesirable_loss = 1 - torch.sigmoid(beta * (z - rho))
    else:
        desirable_loss = 1 - torch.sigmoid(beta * rho)
        undesirable_loss = torch.sigmoid(beta * rho)
    per_row = torch.where(desirable, desirable_weight * desirable_loss, undesirable_weight * undesirable_loss)
    return per_row.mean(), {"rewards": beta * rho.detach(), "kl": z}


def kl_estimate(
    lin_weight: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LogitOptions,
    *,
    kl_hidden: torch.Tensor,
    kl_target: torch.Tensor,
    ref_kl_hidden: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    reference_free: bool,
    average_log_prob: bool = False,
) -> torch.Tensor:
    """TRL's KL term ``mean_j (logp(y'_j) - ref_logp(y'_j))`` over mismatched completions, without gradient.

    ``average_log_prob``: per-token average log-probs of the KL rows instead of sums.
    """
    check_rows(kl_hidden, kl_target, lin_weight, paired=False, names=("kl_hidden", "kl_target"))
    check_linear_inputs(kl_hidden.reshape(-1, kl_hidden.shape[-1]), lin_weight, kl_target.reshape(-1), bias,
                        names=("kl_hidden", "lin_weight", "kl_target", "bias"))
    with torch.no_grad():
        kl_stats = sequence_stats(kl_hidden.detach(), lin_weight.detach(), kl_target, _detach(bias), opts)
        kl_logps = sequence_logps(kl_stats, average_log_prob)
    ref = reference_logps(
        kl_target, opts, ref_hidden=ref_kl_hidden, ref_weight=ref_weight if ref_kl_hidden is not None else None,
        ref_bias=ref_bias if ref_kl_hidden is not None else None, policy_weight=lin_weight, policy_bias=bias,
        names=("ref_kl_hidden", "ref_weight", "kl_target", "ref_bias"),
    )
    if ref is not None:
        ref_kl = sequence_logps(ref, average_log_prob)
    elif ref_kl_logps is not None:
        ref_kl = check_vector("ref_kl_logps", ref_kl_logps, kl_target.shape[0]).to(kl_logps.device)
    elif reference_free:
        ref_kl = torch.zeros_like(kl_logps)
    else:
        raise ValueError("kl_hidden needs a reference: pass ref_kl_hidden or ref_kl_logps, or set reference_free=True")
    return (kl_logps - ref_kl).mean()


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def fused_linear_kto_loss(
    hidden: torch.Tensor,
    lin_weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    preference_labels: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    kl_hidden: torch.Tensor | None = None,
    kl_target: torch.Tensor | None = None,
    ref_kl_hidden: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    reference_free: bool = False,
    average_log_prob: bool = False,
    **logit_kwargs: Unpack[LogitKwargs],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO on ``hidden @ lin_weight.T + bias`` without materialising the logits; any mix of labels.

    Args:
        hidden: ``(R, T, H)``; target ``(R, T)`` already shifted; preference_labels ``(R,)`` bool.
        lin_weight: ``(V, H)``; bias ``(V,)`` or None.
        ref_hidden: ``(R, T, H_ref)`` reference hidden states, through ``ref_weight``/``ref_bias``
            (default: the policy's head) without gradient; or ``ref_logps`` ``(R,)`` precomputed;
            with neither, ``reference_free=True`` uses 0, else ``ValueError``.
        kl: a precomputed KL estimate (0-d); or ``kl_hidden (R', T', H)``, ``kl_target (R', T')`` of
            mismatched completions with ``ref_kl_hidden`` or ``ref_kl_logps (R',)``, estimated as TRL
            does (``mean(logp - ref_logp)``, no gradient). None of these: 0.
        beta, desirable_weight, undesirable_weight, loss_type: see :func:`kto_objective`.
        average_log_prob: per-token average log-probs instead of sums (see the module docstring).
        **logit_kwargs: the logit keywords of :class:`~liger_align.losses._paired.LogitKwargs`: ``ignore_index``,
            ``temperature``, ``softcap``, ``logit_scale``, ``chunk_bytes``, ``impl``, ``strategy``.

    Returns:
        ``(loss, out)``: 0-d fp32 loss and detached metrics: ``logps``, ``rewards`` ``(R,)``;
        ``chosen_logps``, ``chosen_rewards`` over desirable rows and ``rejected_logps``,
        ``rejected_rewards`` over undesirable rows (variable length); ``chosen_logits_mean``,
        ``rejected_logits_mean`` (over valid tokens only, by design; Liger-Kernel's average every
        position) and ``kl`` (0-d, clamped at 0).
    """
    check_rows(hidden, target, lin_weight, paired=False)
    average_log_prob = check_flag("average_log_prob", average_log_prob)
    check_kto_config(
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, loss_type=loss_type
    )
    rows = hidden.shape[0]
    if not isinstance(preference_labels, torch.Tensor) or preference_labels.shape != (rows,):
        raise ValueError(
            f"preference_labels must have shape (R,) = ({rows},) like hidden, "
            f"got {tuple(getattr(preference_labels, 'shape', ()))}"
        )
    opts, strategy = logit_options(**logit_kwargs)
    if ref_hidden is not None and ref_logps is not None:
        raise ValueError("pass either ref_hidden or ref_logps, not both")
    ref_stats = reference_logps(
        target, opts, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        policy_weight=lin_weight, policy_bias=bias,
    )
    if ref_stats is not None:
        ref = sequence_logps(ref_stats, average_log_prob)
    elif ref_logps is not None:
        ref = check_vector("ref_logps", ref_logps, rows).to(hidden.device)
    elif reference_free:
        ref = torch.zeros(rows, device=hidden.device)
    else:
        raise ValueError(
            f"loss_type {loss_type!r} needs a reference: pass ref_hidden (with ref_weight) or ref_logps, "
            "or set reference_free=True"
        )
    if kl_hidden is not None or kl_target is not None:
        if kl is not None or kl_hidden is None or kl_target is None:
            raise ValueError("pass kl, or kl_hidden with kl_target (and ref_kl_hidden or ref_kl_logps), not both")
        kl = kl_estimate(
            lin_weight, bias, opts, kl_hidden=kl_hidden, kl_target=kl_target, ref_kl_hidden=ref_kl_hidden,
            ref_kl_logps=ref_kl_logps, ref_weight=ref_weight, ref_bias=ref_bias, reference_free=reference_free,
            average_log_prob=average_log_prob,
        )
    else:
        check_kl(kl, hidden.device)
    desirable = preference_labels.to(device=hidden.device, dtype=torch.bool)

    def objective(stats: SequenceStats) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_logps = sequence_logps(stats, average_log_prob)
        loss, metrics = kto_objective(
            policy_logps, ref, desirable, beta=beta, kl=kl, desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight, loss_type=loss_type,
        )
        return loss, {"logps": policy_logps.detach(), **metrics}

    def split_metrics(stats: SequenceStats, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logps, rewards = out["logps"], out["rewards"]
        return {
            "logps": logps,
            "chosen_logps": logps[desirable],
            "rejected_logps": logps[~desirable],
            "chosen_rewards": rewards[desirable],
            "rejected_rewards": rewards[~desirable],
            "chosen_logits_mean": logits_mean(_rows_where(stats, desirable)),
            "rejected_logits_mean": logits_mean(_rows_where(stats, ~desirable)),
            **{k: v for k, v in out.items() if k != "logps"},
        }

    # Separable over rows: the KL estimate is computed before, without gradient.
    return fused_sequence_loss(
        hidden, lin_weight, target, bias, opts, objective, row_groups=tuple(range(rows)), separable=True,
        strategy=strategy, metrics=split_metrics,
    )


def _rows_where(stats: SequenceStats, mask: torch.Tensor) -> SequenceStats:
    """``stats`` with the rows outside ``mask`` zeroed (no host synchronisation)."""
    return SequenceStats(*(torch.where(mask, t, torch.zeros_like(t)) for t in stats))


class LigerFusedLinearKTOLoss(FusedLossModule):
    """KTO (Ethayarajh et al., 2024) as in TRL's ``KTOTrainer``, without materialising the logits.

    ``loss_fn(lin_weight, hidden, target, bias=None, *, preference_labels, ref_hidden=None, ref_weight=None,
    ref_bias=None, ref_logps=None, kl=None, kl_hidden=None, kl_target=None, ref_kl_hidden=None,
    ref_kl_logps=None) -> (loss, out)``; see :func:`fused_linear_kto_loss`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        loss_type: str = "kto",
        *,
        reference_free: bool = False,
        average_log_prob: bool = False,
        ignore_index: int = IGNORE_INDEX,
        **logit_kwargs: Unpack[LogitKwargs],
    ) -> None:
        config = check_kto_config(
            beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, loss_type=loss_type
        )
        super().__init__(
            dict(
                config, reference_free=bool(reference_free),
                average_log_prob=check_flag("average_log_prob", average_log_prob),
            ),
            ignore_index=ignore_index, **logit_kwargs,
        )

    def forward(
        self,
        lin_weight: torch.Tensor,
        hidden: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        preference_labels: torch.Tensor,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        kl: torch.Tensor | float | None = None,
        kl_hidden: torch.Tensor | None = None,
        kl_target: torch.Tensor | None = None,
        ref_kl_hidden: torch.Tensor | None = None,
        ref_kl_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fused_linear_kto_loss(
            hidden, lin_weight, target, bias, preference_labels=preference_labels,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps, kl=kl,
            kl_hidden=kl_hidden, kl_target=kl_target, ref_kl_hidden=ref_kl_hidden, ref_kl_logps=ref_kl_logps,
            **self.config, **self.logit_kwargs,
        )

