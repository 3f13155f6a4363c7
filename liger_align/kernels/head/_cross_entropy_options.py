"""The options of the fused cross-entropy beyond the plain loss: class weights, z-loss, token accuracy.

Per valid token ``i`` with target ``y`` (``z`` the transformed logits, ``lse_i = log sum_v exp z_iv``,
``c`` the class weights, all 1 without ``ce_weight``, ``eps`` the label smoothing, ``s`` the z-loss
scale), exactly ``torch.nn.functional.cross_entropy(weight=c, label_smoothing=eps)`` plus the z-loss::

    loss_i = (1 - eps) * c_y * (lse_i - z_iy) + (eps / V) * sum_v c_v * (lse_i - z_iv) + s * lse_i**2

The row pass folds ``sum_v c_v z_iv`` (only when ``c`` and ``eps > 0``); the gradient pass writes
``d loss_i / d z_iv = a_i onehot_iv + b_i c_v / V - (a_i + b_i) p_iv + g_i p_iv`` with
``a_i = -(1 - eps) c_y u_i``, ``b_i = -eps u_i`` and ``g_i = b_i (1 - C / V) + 2 s lse_i u_i``
(``C = sum_v c_v``, ``u_i`` the upstream factor); each option is off (no extra work) when unused.

Token scaling (Liger-Kernel's ``use_token_scaling``): ``loss_i`` (z-loss included) is multiplied by
``q_i = p_i[y] = exp(z_iy - lse_i)``, the target's probability, held constant (detached), so the
gradient is ``q_i`` times the one above: ``u_i`` becomes ``q_i u_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..._checks import check_non_negative
from ._row_softmax import RowStats

_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CrossEntropyOutput(NamedTuple):
    """What :func:`~liger_align.kernels.head.fused_linear_cross_entropy` returns when ``return_z_loss`` or
    ``return_token_accuracy`` is set; a field not asked for is None.

    ``loss``: the loss (z-loss included), 0-d or shaped like target (``reduction="none"``).
    ``z_loss``: ``s * lse_i**2`` reduced as the loss (same denominator), without gradient (its gradient
    is in ``loss``). ``token_accuracy``: 0-d fp32, the fraction of valid tokens whose target is the argmax
    (a tie counts as a hit; 0 when every token is ignored). ``is_top1``: as with ``return_top1``.
    ``predicted_tokens``: int64 shaped like target, each token's argmax vocabulary id (the first maximal
    one), ``-1`` where ignored.
    """

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    predicted_tokens: torch.Tensor | None = None


def check_lse_square_scale(value: object) -> float:
    """The z-loss scale: a finite number ``>= 0``."""
    return check_non_negative("lse_square_scale", value)


def check_ce_weight(ce_weight: object, weight: torch.Tensor) -> torch.Tensor | None:
    """``ce_weight`` as a contiguous fp32 ``(V,)`` tensor (detached: no gradient flows to it), checked.

    Raises ``TypeError`` (not a floating-point tensor) or ``ValueError`` (shape other than ``(V,)``,
    another device than ``weight``, a negative or non-finite entry: one host read when it is on an
    accelerator).
    """
    if ce_weight is None:
        return None
    if not isinstance(ce_weight, torch.Tensor):
        raise TypeError(f"ce_weight must be a torch.Tensor of shape (V,) or None, got {type(ce_weight).__name__}")
    if ce_weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"ce_weight must be a floating-point tensor, got dtype {ce_weight.dtype}")
    if ce_weight.shape != weight.shape[:1]:
        raise ValueError(f"ce_weight must have shape (V,) = ({weight.shape[0]},), got {tuple(ce_weight.shape)}")
    if ce_weight.device != weight.device:
        raise ValueError(f"ce_weight must be on the weight's device {weight.device}, got {ce_weight.device}")
    c = ce_weight.detach().to(torch.float32).contiguous()
    bad = ~(torch.isfinite(c) & (c >= 0))
    n_bad, first = torch.stack([bad.sum(), bad.to(torch.int64).argmax()]).tolist()
    if n_bad:
        raise ValueError(
            f"ce_weight must hold finite numbers >= 0; {n_bad} entries do not, e.g. ce_weight[{first}] = "
            f"{ce_weight[first].item()!r}"
        )
    return c


@dataclass(frozen=True)
class CrossEntropyTerms:
    """The per-row terms of the loss above for one call: ``alpha = -(1 - eps)``, ``beta = -eps``.

    ``class_weight``: ``(V,)`` fp32 or None; ``z_scale``: ``s``; ``want_z``: report the z-loss part;
    ``want_top1``: fill ``is_top1`` (the recomputing op otherwise fills it with the distribution stats only);
    ``token_scaling``: scale each token's loss by its detached target probability (module docstring);
    ``want_argmax``: fold each row's argmax id (``predicted_tokens``).
    """

    alpha: float
    beta: float
    class_weight: torch.Tensor | None = None
    z_scale: float = 0.0
    want_z: bool = False
    want_top1: bool = False
    token_scaling: bool = False
    want_argmax: bool = False

    @property
    def weighted_smoothing(self) -> bool:
        """Whether the row pass needs ``sum_v c_v z_v`` and the gradient pass a per-column weight."""
        return self.class_weight is not None and self.beta != 0.0

    def row_stats(self, rows: int, device: torch.device, *, distribution: bool = False) -> RowStats:
        return RowStats(rows, device, distribution=distribution, weighted=self.weighted_smoothing,
                        argmax=self.want_argmax)

    def token_scale(self, stats: RowStats, lse: torch.Tensor) -> torch.Tensor | None:
        """``q_i = exp(z_iy - lse_i)`` ``(M,)`` fp32 (no gradient) with token scaling, else None."""
        return torch.exp(stats.target_logit - lse) if self.token_scaling else None

    def fold_kwargs(self) -> dict:
        return {"class_weight": self.class_weight} if self.weighted_smoothing else {}

    def target_weight(self, target: torch.Tensor) -> torch.Tensor | None:
        """``c_y (M,)`` of valid targets, or None without class weights."""
        return None if self.class_weight is None else self.class_weight.index_select(0, target)

    def value(self, stats: RowStats, lse: torch.Tensor, target: torch.Tensor, vocab: int) -> torch.Tensor:
        """``loss_i`` of the module docstring, ``(M,)`` fp32, for rows whose stats are complete."""
        if self.class_weight is None:
            # alpha * (zt - lse) + beta * (zsum / V - lse), in as few element-wise passes as the plain op
            out = self.alpha * stats.target_logit
            if self.beta:
                out = out + (self.beta / vocab) * stats.logit_sum
            k = -(self.alpha + self.beta)  # 1 for the cross-entropy
            out = lse + out if k == 1.0 else out + k * lse
        else:
            out = self.alpha * self.target_weight(target) * (stats.target_logit - lse)
            if self.weighted_smoothing:
                out = out + self.beta * (stats.weighted_logit_sum / vocab - (self.class_weight.sum() / vocab) * lse)
        return out + self.z_scale * lse * lse if self.z_scale else out

    def grad_coefficients(
        self, target: torch.Tensor, lse: torch.Tensor, upstream: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(a, b, options)`` for :meth:`RowPasses.grad`, each ``(M,)`` fp32: ``upstream`` is ``(M,)`` or 0-d."""
        rows = lse.shape[0]
        a = (self.alpha * upstream).expand(rows).contiguous()
        b = (self.beta * upstream).expand(rows).contiguous()
        c_y = self.target_weight(target)
        if c_y is not None:
            a = a * c_y
        g = None
        if self.weighted_smoothing:
            g = b * (1.0 - self.class_weight.sum() / self.class_weight.shape[0])
        if self.z_scale:
            z_term = (2.0 * self.z_scale) * lse * upstream
            g = z_term if g is None else g + z_term
        options = {} if g is None else {"g": g}
        if self.weighted_smoothing:
            options["class_weight"] = self.class_weight
        return a, b, options
