"""The per-pair math of every DPO ``loss_type`` (see :mod:`.dpo`), plain torch on ``(B,)`` tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_F_DIVERGENCE_LOSS_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}


def f_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """``f'(pi / pi_ref)`` of the f-DPO paper (Wang et al., 2023) from ``log(pi / pi_ref)``."""
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        return (torch.exp(((alpha - 1.0) * logratios).clamp(max=80.0)) - 1.0) / (alpha - 1.0)
    return logratios


def one_dpo_loss(
    name, *, beta, label_smoothing, discopop_tau, c, r, ref_c, ref_r, c_ratio, r_ratio, c_score, r_score, n_c, n_r,
    average,
):
    """Per-pair loss ``(B,)`` of one loss type (the symbols of :func:`~.dpo.dpo_objective`).

    ``average``: the log-probs already are per-token averages (``average_log_prob=True``), so ``ipo`` and
    ``sigmoid_norm`` do not divide by the lengths again and ``sft`` turns them back into token sums.
    """
    delta = c_score - r_score
    ls = label_smoothing
    if name in ("ipo", "sigmoid_norm") and not average:
        c_score, r_score = c_score / n_c.clamp(min=1), r_score / n_r.clamp(min=1)
    if name == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if name == "hinge":
        return torch.relu(1 - beta * delta)
    if name == "ipo":
        return (c_score - r_score - 1 / (2 * beta)) ** 2
    if name == "sigmoid_norm":
        return -F.logsigmoid(beta * (c_score - r_score))
    if name == "exo_pair":
        z = beta * delta
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(ls)
        )
    if name == "nca_pair":
        return -F.logsigmoid(beta * c_ratio) - 0.5 * F.logsigmoid(-beta * c_ratio) - 0.5 * F.logsigmoid(-beta * r_ratio)
    if name == "robust":
        z = beta * delta
        return (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    if name == "bco_pair":
        return -F.logsigmoid(beta * c_ratio) - F.logsigmoid(-beta * r_ratio)
    if name == "sppo_hard":
        return (c_ratio - 0.5 / beta) ** 2 + (r_ratio + 0.5 / beta) ** 2
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            d = torch.sort(c - r).values - torch.sort(ref_c - ref_r).values
        else:
            d = torch.sort(c_ratio).values - torch.sort(r_ratio).values
        return -F.logsigmoid(beta * d) * (1 - ls) - F.logsigmoid(-beta * d) * ls
    if name == "apo_zero":
        return 1 - torch.sigmoid(beta * c_ratio) + torch.sigmoid(beta * r_ratio)
    if name == "apo_down":
        return torch.sigmoid(beta * c_ratio) + 1 - torch.sigmoid(beta * (c_ratio - r_ratio))
    if name == "discopop":
        z = beta * delta
        mix = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
    if name == "sft":
        chosen_sum = (c * n_c).sum() if average else c.sum()
        return (-chosen_sum / n_c.sum().clamp(min=1)).expand(c.shape[0])
    raise ValueError(f"loss_type must be one of {list(DPO_LOSS_TYPES)}, got {name!r}")
