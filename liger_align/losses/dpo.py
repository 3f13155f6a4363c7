"""DPO: Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290) and its variants.

Every ``loss_type`` of TRL 1.16's ``DPOTrainer`` on *summed* completion log-probs, weighted and
added when several are given (RPO is ``["sigmoid", "sft"]``, MPO ``["sigmoid", "bco_pair", "sft"]``).
With ``s_c = logp_c - ref_logp_c`` and ``s_r`` likewise (mapped through the f-divergence, f-DPO),
``delta = s_c - s_r``:

- ``sigmoid`` (DPO): ``-log sigmoid(beta * delta)``; ``hinge`` (SLiC): ``relu(1 - beta * delta)``;
- ``ipo`` (IPO, Azar et al.): ``(delta_avg - 1 / (2 beta))^2`` on per-token averages;
- ``exo_pair`` (EXO), ``nca_pair`` (NCA), ``robust`` (rDPO), ``bco_pair`` (BCO), ``sppo_hard`` (SPPO),
  ``aot`` / ``aot_unpaired`` (AOT), ``apo_zero`` / ``apo_down`` (APO), ``discopop`` (DiscoPOP),
  ``sigmoid_norm`` (DPO on per-token averages), ``sft`` (NLL of the chosen tokens).

``average_log_prob=True`` (Liger-Kernel's option) makes every sequence log-prob, policy and reference,
the average over its valid tokens instead of the sum; ``ipo`` and ``sigmoid_norm``, which already read
averages, then do not divide again (the same loss under ``reverse_kl``; under another f-divergence the
average is taken before ``f`` instead of after), and ``sft`` stays the NLL averaged over chosen tokens.

Who uses this module: custom training loops. ``LigerDPOTrainer`` does not: it runs TRL's own
DPO loss code over our per-token log-probs (:func:`liger_align.kernels.head.linear_logprobs`, through TRL's
fused-LM-head protocol); see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from typing_extensions import Unpack

from .._checks import as_real, check_choice, check_flag, check_positive, check_real, check_weights
from .._tokens import IGNORE_INDEX
from ._dpo_objectives import _F_DIVERGENCE_LOSS_TYPES, DPO_LOSS_TYPES, F_DIVERGENCES, f_scores, one_dpo_loss
from ._module import FusedLossModule
from ._paired import (
    LogitKwargs,
    check_vector,
    logit_options,
    logits_mean,
    reference_logps,
    sequence_logps,
    split_pairs,
)
from ._sequences import SequenceStats, check_rows, fused_sequence_loss

#: Loss types whose per-pair value depends on the other pairs (AOT sorts the batch's log-ratios).
_COUPLED_LOSS_TYPES = {"aot", "aot_unpaired"}


def check_dpo_config(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    *,
    label_smoothing: float,
    f_divergence_type: str,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
    f_alpha_divergence_coef: float = 0.5,
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validate the configuration (``ValueError`` naming the setting); return ``(loss_types, loss_weights)``.

    ``loss_type``: one name or a non-empty list of names; ``loss_weights``: one finite weight ``>= 0``
    per loss type; ``beta > 0`` (``ipo`` and ``sppo_hard`` divide by it); ``label_smoothing`` in
    ``[0, 1]`` (``[0, 0.5)`` for ``robust``, ``(0, 1)`` for ``exo_pair``); ``discopop_tau > 0``;
    ``f_alpha_divergence_coef`` finite.
    """
    if isinstance(loss_type, str):
        loss_types = (loss_type,)
    elif isinstance(loss_type, Sequence) or (hasattr(loss_type, "__iter__") and not isinstance(loss_type, dict)):
        loss_types = tuple(loss_type)
    else:
        raise ValueError(
            f"loss_type must be one of {list(DPO_LOSS_TYPES)} or a list of them, got {type(loss_type).__name__} "
            f"{loss_type!r}"
        )
    if not loss_types:
        raise ValueError(f"loss_type must name at least one of {list(DPO_LOSS_TYPES)}, got {loss_type!r}")
    for name in loss_types:
        check_choice("loss_type", name, DPO_LOSS_TYPES)
    weights = check_weights("loss_weights", loss_weights, len(loss_types)) if loss_weights is not None else (
        (1.0,) * len(loss_types)
    )
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= _F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} supports only loss_type in {sorted(_F_DIVERGENCE_LOSS_TYPES)}, "
            f"got {list(loss_types)}"
        )
    check_positive("beta", beta, context=f" (loss_type {list(loss_types)})")
    label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type 'robust', got {label_smoothing}")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in (0, 1) for loss_type 'exo_pair', got {label_smoothing}")
    check_positive("discopop_tau", discopop_tau)
    check_real("f_alpha_divergence_coef", f_alpha_divergence_coef)
    return loss_types, weights


def needs_reference(loss_types: Sequence[str]) -> bool:
    """Whether any of ``loss_types`` reads the reference log-probs (all but ``sft``)."""
    return any(name != "sft" for name in loss_types)




def dpo_objective(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_n_tokens: torch.Tensor | None = None,
    rejected_n_tokens: torch.Tensor | None = None,
    average_log_prob: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss from per-sequence *summed* log-probs, as TRL 1.16's ``DPOTrainer``.

    Args:
        chosen_logps, rejected_logps: ``(B,)`` policy log-probs summed over each completion (averaged
            per token with ``average_log_prob``).
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the reference's (no gradient; zeros when reference-free).
        beta, loss_type, loss_weights, label_smoothing, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef: as in TRL's ``DPOConfig``.
        chosen_n_tokens, rejected_n_tokens: ``(B,)`` completion lengths, for ``ipo``, ``sigmoid_norm``
            and ``sft`` (default: 1 each).
        average_log_prob: the log-probs are per-token averages: ``ipo`` and ``sigmoid_norm`` use them
            as they are, ``sft`` multiplies them back by ``chosen_n_tokens`` (see the module docstring).

    Returns:
        ``(loss, metrics)``: 0-d ``sum_k loss_weights[k] * mean_b loss_k``; metrics (detached)
        ``chosen_rewards = beta * (chosen_logps - ref_chosen_logps)`` and ``rejected_rewards`` ``(B,)``.
    """
    loss_types, weights = check_dpo_config(
        loss_type, loss_weights, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type, beta=beta,
        discopop_tau=discopop_tau, f_alpha_divergence_coef=f_alpha_divergence_coef,
    )
    average_log_prob = check_flag("average_log_prob", average_log_prob)
    beta, label_smoothing = float(as_real("beta", beta)), float(as_real("label_smoothing", label_smoothing))
    discopop_tau = float(as_real("discopop_tau", discopop_tau))
    f_alpha_divergence_coef = float(as_real("f_alpha_divergence_coef", f_alpha_divergence_coef))
    c, r = chosen_logps.float(), rejected_logps.float()
    ref_c, ref_r = ref_chosen_logps.float(), ref_rejected_logps.float()
    c_ratio, r_ratio = c - ref_c, r - ref_r
    ones = torch.ones_like(c)
    terms = dict(
        c=c, r=r, ref_c=ref_c, ref_r=ref_r, c_ratio=c_ratio, r_ratio=r_ratio,
        c_score=f_scores(c_ratio, f_divergence_type, f_alpha_divergence_coef),
        r_score=f_scores(r_ratio, f_divergence_type, f_alpha_divergence_coef),
        n_c=ones if chosen_n_tokens is None else chosen_n_tokens.float(),
        n_r=ones if rejected_n_tokens is None else rejected_n_tokens.float(),
    )
    loss = c.new_zeros(())
    for name, weight in zip(loss_types, weights):
        per_pair = one_dpo_loss(
            name, beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau, average=average_log_prob,
            **terms,
        )
        loss = loss + weight * per_pair.mean()
    metrics = {"chosen_rewards": beta * c_ratio.detach(), "rejected_rewards": beta * r_ratio.detach()}
    return loss, metrics


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    lin_weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    reference_free: bool = False,
    average_log_prob: bool = False,
    **logit_kwargs: Unpack[LogitKwargs],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (any TRL 1.16 ``loss_type``) on ``hidden @ lin_weight.T + bias`` without materialising the logits.

    Args:
        hidden: ``(2B, T, H)``, B chosen rows then B rejected rows; target ``(2B, T)`` already shifted.
        lin_weight: ``(V, H)``; bias ``(V,)`` or None.
        ref_hidden: ``(2B, T, H_ref)`` reference hidden states, projected without gradient through
            ``ref_weight (V, H_ref)`` and ``ref_bias`` (default: ``lin_weight`` and ``bias``).
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` precomputed reference log-probs, instead (used as
            given: sums, or per-token averages when ``average_log_prob``).
        reference_free: with no reference given, use 0 for the reference log-probs; otherwise a loss
            type that reads the reference (all but ``sft``) raises ``ValueError``.
        average_log_prob: per-token average log-probs (policy and ``ref_hidden``'s) instead of sums;
            see the module docstring. Default False, TRL's sums.
        beta, loss_type, loss_weights, label_smoothing, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef: see :func:`dpo_objective`.
        **logit_kwargs: the logit keywords of :class:`~liger_align.losses._paired.LogitKwargs`: ``ignore_index``,
            ``temperature``, ``softcap``, ``logit_scale``, ``chunk_bytes``, ``impl``, ``strategy``.

    Returns:
        ``(loss, out)``: 0-d fp32 loss and detached metrics ``chosen_logps``, ``rejected_logps``,
        ``ref_chosen_logps``, ``ref_rejected_logps``, ``chosen_rewards``, ``rejected_rewards`` ``(B,)``,
        ``chosen_logits_mean`` and ``rejected_logits_mean`` (over completion tokens only, by design;
        Liger-Kernel's average every position).
    """
    check_rows(hidden, target, lin_weight, paired=True)
    average_log_prob = check_flag("average_log_prob", average_log_prob)
    loss_types, weights = check_dpo_config(
        loss_type, loss_weights, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type, beta=beta,
        discopop_tau=discopop_tau, f_alpha_divergence_coef=f_alpha_divergence_coef,
    )
    opts, strategy = logit_options(**logit_kwargs)
    half = hidden.shape[0] // 2
    if ref_hidden is not None and (ref_chosen_logps is not None or ref_rejected_logps is not None):
        raise ValueError("pass either ref_hidden or ref_chosen_logps/ref_rejected_logps, not both")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must be given together")
    ref_stats = reference_logps(
        target, opts, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        policy_weight=lin_weight, policy_bias=bias,
    )
    if ref_stats is not None:
        ref_logps = sequence_logps(ref_stats, average_log_prob)
        ref_c, ref_r = ref_logps[:half], ref_logps[half:]
    elif ref_chosen_logps is not None:
        ref_c = check_vector("ref_chosen_logps", ref_chosen_logps, half).to(hidden.device)
        ref_r = check_vector("ref_rejected_logps", ref_rejected_logps, half).to(hidden.device)
    elif reference_free or not needs_reference(loss_types):
        ref_c = ref_r = torch.zeros(half, device=hidden.device)
    else:
        raise ValueError(
            f"loss_type {list(loss_types)} needs a reference: pass ref_hidden (with ref_weight), or "
            "ref_chosen_logps and ref_rejected_logps, or set reference_free=True"
        )
    def objective(stats: SequenceStats) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = split_pairs(stats)
        chosen_logps = sequence_logps(policy.chosen, average_log_prob)
        rejected_logps = sequence_logps(policy.rejected, average_log_prob)
        loss, metrics = dpo_objective(
            chosen_logps, rejected_logps, ref_c, ref_r,
            beta=beta, loss_type=loss_types, loss_weights=weights, label_smoothing=label_smoothing,
            discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            chosen_n_tokens=policy.chosen.n_tokens, rejected_n_tokens=policy.rejected.n_tokens,
            average_log_prob=average_log_prob,
        )
        return loss, {
            "chosen_logps": chosen_logps.detach(),
            "rejected_logps": rejected_logps.detach(),
            "ref_chosen_logps": ref_c.detach(),
            "ref_rejected_logps": ref_r.detach(),
            "chosen_logits_mean": logits_mean(policy.chosen),
            "rejected_logits_mean": logits_mean(policy.rejected),
            **metrics,
        }

    # AOT sorts the batch's log-ratios, which couples the pairs: only it needs the recomputing path.
    separable = not set(loss_types) & _COUPLED_LOSS_TYPES
    return fused_sequence_loss(
        hidden, lin_weight, target, bias, opts, objective, row_groups=tuple(range(half)) * 2, separable=separable,
        strategy=strategy,
    )


class LigerFusedLinearDPOLoss(FusedLossModule):
    """DPO and its TRL 1.16 variants (Rafailov et al., 2023) on the lm_head output, without logits.

    ``loss_fn(lin_weight, hidden, target, bias=None, *, ref_hidden=None, ref_weight=None, ref_bias=None,
    ref_chosen_logps=None, ref_rejected_logps=None) -> (loss, out)``; see :func:`fused_linear_dpo_loss`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        loss_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        *,
        discopop_tau: float = 0.05,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        reference_free: bool = False,
        average_log_prob: bool = False,
        ignore_index: int = IGNORE_INDEX,
        **logit_kwargs: Unpack[LogitKwargs],
    ) -> None:
        loss_types, weights = check_dpo_config(
            loss_type, loss_weights, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type, beta=beta,
            discopop_tau=discopop_tau, f_alpha_divergence_coef=f_alpha_divergence_coef,
        )
        super().__init__(
            dict(
                beta=beta, loss_type=loss_types, loss_weights=weights, label_smoothing=label_smoothing,
                discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
                f_alpha_divergence_coef=f_alpha_divergence_coef, reference_free=reference_free,
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
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fused_linear_dpo_loss(
            hidden, lin_weight, target, bias,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
            ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            **self.config, **self.logit_kwargs,
        )

