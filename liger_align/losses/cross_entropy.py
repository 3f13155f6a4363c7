"""Fused linear cross-entropy as an ``nn.Module``: ``CE(hidden @ lin_weight.T + bias, target)`` without logits."""

from __future__ import annotations

import torch

from ..kernels._checks import check_choice, check_real
from ..kernels.fused_linear_cross_entropy import REDUCTIONS, fused_linear_cross_entropy
from ._module import FusedLossModule


class LigerFusedLinearCrossEntropyLoss(FusedLossModule):
    """Cross-entropy of the lm_head output, matching ``F.cross_entropy`` on the materialised logits.

    ``loss_fn(lin_weight, hidden, target, bias=None, *, num_items_in_batch=None)`` with lin_weight
    ``(V, H)``, hidden ``(N, H)`` or ``(B, T, H)``, target ``(N,)`` or ``(B, T)`` already shifted, bias
    ``(V,)`` or None. Returns a 0-d loss (``reduction="mean"`` over valid tokens, or over
    ``num_items_in_batch`` when given; ``"sum"``), or per-token losses shaped like target (``"none"``).
    See :func:`liger_align.kernels.fused_linear_cross_entropy`.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        softcap: float | None = None,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        chunk_bytes: int | None = None,
        impl: str | None = None,
    ) -> None:
        check_choice("reduction", reduction, REDUCTIONS)
        label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
        super().__init__(
            dict(reduction=reduction, label_smoothing=label_smoothing),
            ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
            chunk_bytes=chunk_bytes, impl=impl,
        )

    def forward(
        self,
        lin_weight: torch.Tensor,
        hidden: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_cross_entropy(
            hidden, lin_weight, target, bias, num_items_in_batch=num_items_in_batch, **self.config,
            **self.logit_kwargs,
        )

